"""The sampler against its definitions: exact logit transforms, exact logprobs, and empirical
distributions that match the renormalised restricted distribution computed independently here."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.executor.sampler import (
    Sampler,
    SamplingRow,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
)


def row(prompt=(), output=(), seed=None, eos=(), **params) -> SamplingRow:
    p = SamplingParams(seed=seed, **params)
    gen = make_generator(seed) if seed is not None else None
    return SamplingRow(p, tuple(prompt), tuple(output), gen, frozenset(eos))


def log_probs(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


# --- reference: the restricted distribution, written out token by token on a small vocab ----------


def reference_distribution(
    logits: list[float], temperature=1.0, min_p=0.0, top_k=-1, top_p=1.0
) -> list[float]:
    """Renormalised probabilities after temperature → min_p → top_k → top_p, in plain Python."""
    scaled = [x / temperature for x in logits]
    keep = set(range(len(scaled)))

    def probs_of(ids):
        m = max(scaled[i] for i in ids)
        w = {i: math.exp(scaled[i] - m) for i in ids}
        z = sum(w.values())
        return {i: w[i] / z for i in ids}

    p = probs_of(keep)
    keep = {i for i in keep if p[i] >= min_p * max(p.values())}
    if top_k > 0:
        keep = set(sorted(keep, key=lambda i: -scaled[i])[:top_k])
    p = probs_of(keep)
    kept, mass = set(), 0.0
    for i in sorted(keep, key=lambda i: -p[i]):
        if mass >= top_p:
            break
        kept.add(i)
        mass += p[i]
    p = probs_of(kept)
    return [p.get(i, 0.0) for i in range(len(logits))]


# --- greedy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax_and_consumes_no_randomness(dtype):
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows = [row(temperature=0.0, seed=7 if i % 2 else None) for i in range(6)]
    states = [r.generator.get_state() for r in rows if r.generator is not None]
    out = Sampler()(logits, rows)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6
    for r, state in zip([r for r in rows if r.generator is not None], states):
        assert torch.equal(r.generator.get_state(), state)


def test_greedy_rows_unaffected_by_random_rows_in_the_batch():
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(2))
    rows = [row(temperature=0.0), row(temperature=1.0, top_p=0.5), row(temperature=0.0), row(temperature=2.0)]
    out = Sampler(make_generator(0))(logits, rows)
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[2] == int(logits[2].argmax())


# --- seeded rows -----------------------------------------------------------------------------------


def _seeded_tokens(seed: int, position: int, crowd: int, steps: int = 12, vocab: int = 300) -> list[int]:
    """A seeded row driven for several steps at ``position`` among ``crowd`` other rows.

    Its logits depend only on the step; the other rows (greedy, filtered, penalised, seeded, unseeded)
    get fresh random logits each step.
    """
    params = SamplingParams(seed=seed, temperature=0.9, top_k=50, top_p=0.9)
    gen = make_generator(seed)
    others = [row(temperature=0.0), row(temperature=1.5, min_p=0.1), row(seed=99, temperature=0.5),
              row(presence_penalty=1.0, output=(1, 2)), row(top_p=0.3)][:crowd]
    sampler = Sampler(make_generator(5))
    tokens: list[int] = []
    for step in range(steps):
        mine = torch.randn(1, vocab, generator=torch.Generator().manual_seed(100 + step))
        me = SamplingRow(params, (), tuple(tokens), gen)
        rows = others[:position] + [me] + others[position:]
        logits = torch.cat([torch.randn(position, vocab), mine, torch.randn(len(others) - position, vocab)])
        tokens.append(sampler(logits, rows).token_ids[position])
    return tokens


def test_seeded_row_reproducible_whatever_the_batch_and_its_position():
    alone = _seeded_tokens(1234, position=0, crowd=0)
    assert _seeded_tokens(1234, position=3, crowd=5) == alone
    assert _seeded_tokens(1234, position=5, crowd=5) == alone
    assert _seeded_tokens(4321, position=0, crowd=0) != alone  # the seed matters


def test_unseeded_rows_follow_the_injected_generator():
    logits = torch.zeros(8, 1000)
    rows = [row() for _ in range(8)]
    a = Sampler(make_generator(3))(logits, rows).token_ids
    b = Sampler(make_generator(3))(logits, rows).token_ids
    c = Sampler(make_generator(4))(logits, rows).token_ids
    assert a == b != c


# --- filters: support and distribution -------------------------------------------------------------

SMALL_LOGITS = [2.0, 1.5, 1.2, 1.0, 0.7, 0.3, 0.0, -0.4, -1.0, -2.0, -3.0, 0.9]

FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=4),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.3, min_p=0.3),
    dict(temperature=0.8, top_k=6, top_p=0.8),
    dict(temperature=1.0, min_p=0.1, top_k=5, top_p=0.7),
    dict(temperature=1.3, min_p=0.3, top_p=0.8),  # min_p first: top_p sees the renormalised rest
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("seeded", [False, True], ids=["shared-rng", "seeded"])
def test_filters_sample_the_renormalised_restricted_distribution(filters, seeded):
    n = 12000 if not seeded else 3000
    expected = torch.tensor(reference_distribution(SMALL_LOGITS, **filters))
    logits = torch.tensor(SMALL_LOGITS).expand(n, -1)
    rows = [row(seed=i if seeded else None, **filters) for i in range(n)]
    ids = torch.tensor(Sampler(make_generator(11))(logits, rows).token_ids)
    counts = torch.bincount(ids, minlength=len(SMALL_LOGITS)).double()
    assert counts[expected == 0].sum() == 0, "sampled outside the allowed support"
    tv = 0.5 * (counts / n - expected).abs().sum().item()
    assert tv < (0.03 if seeded else 0.02), (tv, counts.tolist(), expected.tolist())


def test_top_k_top_p_masks_exactly():
    base = log_probs([0.4, 0.3, 0.2, 0.1])  # [4]
    cases = [  # (top_k, top_p) -> kept ids
        ((-1, 0.6), {0, 1}),
        ((-1, 0.75), {0, 1, 2}),
        ((-1, 0.3), {0}),
        ((2, 1.0), {0, 1}),
        ((3, 0.75), {0, 1}),  # top_p acts on the renormalised top-3: 0.444 + 0.333 >= 0.75
        ((0, 1.0), {0, 1, 2, 3}),
    ]
    logits = base.expand(len(cases), -1).clone()
    out = apply_top_k_top_p(logits, [k for (k, _), _ in cases], [p for (_, p), _ in cases])
    for i, (_, kept) in enumerate(cases):
        finite = {j for j in range(4) if math.isfinite(out[i, j].item())}
        assert finite == kept, (cases[i], out[i])
        assert torch.equal(out[i][list(kept)], base[list(kept)])


def test_top_k_alone_and_top_p_one_keep_the_whole_tail():
    # Row 1 has top_p = 1 next to a row that triggers the sort path: float rounding must not trim it.
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(3)) * 6
    out = apply_top_k_top_p(logits.clone(), [-1, -1, 10], [0.5, 1.0, 1.0])
    assert torch.equal(out[1], logits[1])
    assert torch.isfinite(out[2]).sum() == 10
    only_k = apply_top_k_top_p(logits.clone(), [-1, 3, 7], None)
    assert torch.equal(only_k[0], logits[0])
    assert torch.equal(torch.isfinite(only_k[1]).nonzero().flatten(), logits[1].topk(3).indices.sort().values)
    assert torch.equal(only_k, apply_top_k_top_p(logits.clone(), [-1, 3, 7], [1.0, 1.0, 1.0]))


# --- penalties -------------------------------------------------------------------------------------


def test_penalties_change_logits_exactly_as_defined():
    vocab = 10
    logits = torch.linspace(-2.0, 2.5, vocab).expand(4, -1).clone()  # negative and positive logits
    rows = [
        row(prompt=[1, 8], output=[8, 5, 5], repetition_penalty=1.3),
        row(prompt=[2, 9], output=[3, 3, 3, 7], frequency_penalty=0.5, presence_penalty=0.25),
        row(prompt=[0], output=[4, 0, 4], repetition_penalty=0.8, frequency_penalty=-0.5,
            presence_penalty=1.0),
        row(prompt=[1, 2], output=[3]),  # no penalty: untouched
    ]
    got = apply_penalties(logits, rows)

    expected = logits.clone()
    for b, r in enumerate(rows):
        p = r.params
        for t in range(vocab):
            x = expected[b, t].item()
            if p.repetition_penalty != 1.0 and (t in r.prompt_token_ids or t in r.output_token_ids):
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            c = r.output_token_ids.count(t)
            x -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
            expected[b, t] = x
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got[3], logits[3])
    # Spot checks of the definitions themselves.
    assert got[0, 8] == pytest.approx(logits[0, 8].item() / 1.3)  # positive, seen in prompt+output
    assert got[0, 1] == pytest.approx(logits[0, 1].item() * 1.3)  # negative, seen in prompt only
    assert got[1, 3] == pytest.approx(logits[1, 3].item() - 3 * 0.5 - 0.25)
    assert got[1, 2] == logits[1, 2]  # prompt tokens carry no presence / frequency penalty


def test_penalties_accept_arrays_and_tensors_of_token_ids():
    import numpy as np

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(5))
    as_list = row(prompt=[3, 4, 40], output=[4, 7, 7], repetition_penalty=1.5, frequency_penalty=0.3)
    variants = [
        SamplingRow(as_list.params, np.array([3, 4, 40]), np.array([4, 7, 7])),
        SamplingRow(as_list.params, torch.tensor([3, 4, 40]), torch.tensor([4, 7, 7])),
    ]
    want = apply_penalties(logits, [as_list])
    assert not torch.equal(want, logits)
    for r in variants:
        assert torch.equal(apply_penalties(logits, [r]), want)


def test_penalised_logits_drive_the_greedy_choice():
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0]])
    assert Sampler()(logits, [row(temperature=0.0, output=[1], presence_penalty=0.5)]).token_ids == [2]
    assert Sampler()(logits, [row(temperature=0.0, prompt=[1], repetition_penalty=1.1)]).token_ids == [2]
    assert Sampler()(logits, [row(temperature=0.0, prompt=[1], presence_penalty=2.0)]).token_ids == [1]


def test_penalty_token_ids_out_of_vocab_are_refused():
    with pytest.raises(ValueError, match="output_token_ids"):
        apply_penalties(torch.zeros(1, 10), [row(output=[10], presence_penalty=1.0)])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        apply_penalties(torch.zeros(1, 10), [row(prompt=[-1], repetition_penalty=1.2)])


# --- min_tokens ------------------------------------------------------------------------------------


def test_min_tokens_suppresses_eos_and_stop_ids():
    logits = torch.zeros(4, 8)
    logits[:, 0] = 50.0  # eos
    logits[:, 5] = 40.0  # a stop id
    rows = [
        row(output=[1, 2], min_tokens=3, eos=[0], stop_token_ids=[5]),  # under: both masked
        row(output=[1, 2, 3], min_tokens=3, eos=[0], stop_token_ids=[5]),  # reached: none masked
        row(output=[], min_tokens=2, eos=[0], stop_token_ids=[5, 99], ignore_eos=True),  # eos kept
        row(output=[], eos=[0], stop_token_ids=[5]),  # min_tokens 0
    ]
    masked = apply_min_tokens(logits.clone(), rows)
    assert torch.isinf(masked[0, [0, 5]]).all() and torch.isfinite(masked[0, 1:5]).all()
    assert torch.equal(masked[1], logits[1]) and torch.equal(masked[3], logits[3])
    assert masked[2, 0] == 50.0 and torch.isinf(masked[2, 5])
    greedy = [SamplingRow(r.params.replace(temperature=0.0), r.prompt_token_ids, r.output_token_ids, None,
                          r.eos_token_ids) for r in rows]
    assert Sampler()(logits, greedy).token_ids[:3] == [1, 0, 0]
    # Random rows never draw a suppressed id even when it dominates the distribution.
    many = [rows[0]] * 2000
    ids = Sampler(make_generator(0))(logits[:1].expand(2000, -1), many).token_ids
    assert not {0, 5} & set(ids)


# --- logprobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_rank_and_top_n_match_log_softmax_of_raw_logits(dtype):
    vocab = 64
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(4)).to(dtype)
    rows = [
        row(logprobs=3, temperature=0.0),
        row(logprobs=0, temperature=1.0),
        row(logprobs=None),
        row(logprobs=5, temperature=1.0, top_k=10, presence_penalty=2.0, output=[1, 2, 3]),
        row(logprobs=vocab + 5, temperature=0.0, repetition_penalty=2.0, prompt=list(range(32))),
    ]
    out = Sampler(make_generator(0))(logits, rows)
    ref = logits.float().log_softmax(dim=-1)
    assert out.logprobs[2] is None
    for b in (0, 1, 3, 4):
        lp, tok = out.logprobs[b], out.token_ids[b]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(ref[b, tok].item(), abs=1e-6)  # raw: before penalties/filters
        assert lp.rank == int((ref[b] >= ref[b, tok]).sum())
        n = min(rows[b].params.logprobs, vocab)
        want = ref[b].topk(n)
        assert [t for t, _ in lp.top] == want.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=1e-6)
    assert out.logprobs[0].rank == 1 and out.logprobs[1].top == ()
    # Row 4 is greedy on *penalised* logits, yet reports raw logprobs: its rank may exceed 1.
    assert out.token_ids[4] == int(apply_penalties(logits, rows)[4].argmax())


def test_logits_shape_is_checked_and_input_left_untouched():
    logits = torch.randn(2, 16)
    before = logits.clone()
    Sampler()(logits, [row(presence_penalty=1.0, output=[1], top_p=0.5), row(min_tokens=1, eos=[3])])
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(logits, [row()])
    assert Sampler()(torch.zeros(0, 16), []).token_ids == []
