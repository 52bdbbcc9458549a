"""The sampler's token filters: logit_bias, allowed_token_ids and bad words (vLLM's rule), each acting
on the rows that set it and leaving the others' logits bit for bit."""

from __future__ import annotations

import pytest
import torch

from shoal.workers.engine.sampling_params import SamplingParams, bad_words_token_ids
from shoal.workers.executor.sampler import (
    Sampler,
    SamplingRow,
    apply_allowed_token_ids,
    apply_bad_words,
    apply_logit_bias,
    bad_word_bans,
)

VOCAB = 12


def row(output=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), (), tuple(output))


def logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed))


def test_logit_bias_pushes_a_token_to_be_chosen_greedily_and_only_in_its_row():
    x = logits(3)
    worst = int(x[1].argmin())
    rows = [row(temperature=0), row(temperature=0, logit_bias={str(worst): 100}), row(temperature=0)]
    out = Sampler()(x, rows)
    assert out.token_ids[1] == worst
    assert out.token_ids[0] == int(x[0].argmax()) and out.token_ids[2] == int(x[2].argmax())
    biased = apply_logit_bias(x.clone(), rows)
    assert torch.equal(biased[0], x[0]) and torch.equal(biased[2], x[2])
    expected = x[1].clone()
    expected[worst] += 100
    assert torch.equal(biased[1], expected)


def test_negative_bias_bans_the_greedy_choice_and_logprobs_stay_raw():
    x = logits(1, seed=3)
    best = int(x[0].argmax())
    out = Sampler()(x, [row(temperature=0, logit_bias={best: -100}, logprobs=1)])
    assert out.token_ids[0] != best
    assert out.logprobs[0].top[0][0] == best  # logprobs describe the model, as vLLM v1's default


def test_allowed_token_ids_only_those_are_sampled():
    x = logits(4, seed=1)
    allowed = (2, 5, 7)
    rows = [row(allowed_token_ids=allowed, seed=i) for i in range(3)] + [row(temperature=0)]
    sampler = Sampler(torch.Generator().manual_seed(0))
    for _ in range(30):
        out = sampler(x, rows)
        assert all(t in allowed for t in out.token_ids[:3])
        assert out.token_ids[3] == int(x[3].argmax())
    masked = apply_allowed_token_ids(x.clone(), rows)
    assert torch.equal(masked[3], x[3])
    assert torch.isinf(masked[0, [i for i in range(VOCAB) if i not in allowed]]).all()
    assert torch.equal(masked[0, list(allowed)], x[0, list(allowed)])


def test_bad_words_single_token_always_masked_multi_token_only_after_its_prefix():
    words = ((4,), (7, 8, 9))
    assert bad_word_bans([row(bad_words_token_ids=words)]) == ([0], [4])
    assert bad_word_bans([row(output=(1, 7), bad_words_token_ids=words)]) == ([0], [4])  # prefix (7, 8) not there
    assert bad_word_bans([row(output=(1, 7, 8), bad_words_token_ids=words)]) == ([0, 0], [4, 9])
    assert bad_word_bans([row(output=(8,), bad_words_token_ids=((8, 9),))]) == ([0], [9])
    x = logits(2, seed=2)
    x[0, 9] = 50.0  # the greedy choice completes the bad word (7, 8, 9) ...
    x[1, 9] = 50.0
    rows = [row(output=(7, 8), temperature=0, bad_words_token_ids=words), row(output=(7, 8), temperature=0)]
    out = Sampler()(x, rows)
    assert out.token_ids == [int(apply_bad_words(x.clone(), rows)[0].argmax()), 9]  # ... so row 0 takes another
    assert out.token_ids[0] not in (4, 9)
    assert torch.equal(apply_bad_words(x.clone(), rows)[1], x[1])


def test_bad_words_token_ids_follow_vllms_prefix_space_rule():
    vocab = {"Paris": (1,), " Paris": (2,), "New York": (3, 4), " New York": (5, 4), "Madrid": (6, 7),
             " Madrid": (8,)}
    ids = bad_words_token_ids(["Paris", " New York", "Madrid"], lambda text: vocab[text])
    # a word's bare tokens, plus its leading-space tokens when they start differently with as many
    # tokens (" Madrid" is one token against two: vLLM does not add it)
    assert ids == ((1,), (2,), (3, 4), (5, 4), (6, 7))


@pytest.mark.parametrize("kwargs, field", [
    (dict(logit_bias={"abc": 1}), "logit_bias"),
    (dict(logit_bias={"-3": 1}), "logit_bias"),
    (dict(logit_bias={"3": 100.5}), "logit_bias"),
    (dict(logit_bias={"3": float("nan")}), "logit_bias"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[-1]), "allowed_token_ids"),
    (dict(bad_words=[""]), "bad_words"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
])
def test_bad_filter_values_name_their_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_filters_are_hashable_and_vocab_checked():
    p = SamplingParams(logit_bias={"5": 1, 2: -3.5}, allowed_token_ids=[3, 1])
    assert p.logit_bias == ((2, -3.5), (5, 1.0)) and p.allowed_token_ids == (3, 1)
    hash(p)
    p.check_vocab(6)
    with pytest.raises(ValueError, match="logit_bias: token id 5 is outside the vocabulary"):
        p.check_vocab(5)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[9]).check_vocab(5)


def test_filters_come_before_the_penalties_as_in_vllm():
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    r = SamplingRow(SamplingParams(logit_bias={1: 4.5}, allowed_token_ids=(0, 1, 2), repetition_penalty=2.0,
                                   temperature=0), (1,), (1,))
    # token 3 is not allowed; token 1: (-2 + 4.5) / 2 = 1.25 beats token 0's 1.0 (penalising first would
    # give -2 * 2 + 4.5 = 0.5, and token 0)
    assert Sampler()(x, [r]).token_ids == [1]
