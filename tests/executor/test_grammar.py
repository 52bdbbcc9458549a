"""The grammar compiler and the sampler's token mask, on SmolLM2's real tokenizer (no model)."""

from __future__ import annotations

import pytest
import torch

from shoal.workers.engine.sampling_params import InvalidParam, SamplingParams
from shoal.workers.engine.structured_outputs import StructuredOutputs
from shoal.workers.executor.grammar import GrammarCompiler
from shoal.workers.executor.sampler import Sampler, SamplingRow, apply_token_mask
from shoal.workers.tokenizer import Tokenizer

VOCAB = 49152
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return Tokenizer.from_path(smollm2_path)


def compiler(tok, cache_size: int = 256) -> GrammarCompiler:
    return GrammarCompiler(tok.to_json(), VOCAB, sorted(tok.eos_token_ids), max_num_seqs=8, cache_size=cache_size)


def allowed(mask, row: int) -> set[int]:
    bits = (mask.bitmask[row].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten()[:VOCAB].nonzero().flatten().tolist())


def test_compiled_once_per_constraint_within_a_bounded_cache(tok):
    g = compiler(tok, cache_size=2)
    a, b, c = (StructuredOutputs("regex", r) for r in ("a+", "b+", "c+"))
    first = g.compile(a)
    assert g.compile(StructuredOutputs("regex", "a+")) is first  # equal constraints share one
    g.compile(b)
    g.compile(a)  # a is now the most recent: c evicts b
    g.compile(c)
    assert g.compile(a) is first
    with pytest.raises(InvalidParam) as e:
        g.compile(StructuredOutputs.json_schema({"type": "object", "properties": {"x": {"type": "nope"}}}))
    assert e.value.field == "structured_outputs.json" and "nope" in str(e.value)


def test_mask_rows_follow_the_grammar_and_leave_unconstrained_rows_alone(tok):
    g = compiler(tok)
    choice = StructuredOutputs("choice", choices=("yes", "no"))
    seq = g.start(choice)
    mask = g.fill([None, seq, None], CPU)
    assert mask.rows.tolist() == [1]
    ok = allowed(mask, 0)
    assert ok and all(tok.decode([t]) in ("y", "ye", "yes", "n", "no") for t in ok), [tok.decode([t]) for t in ok]
    logits = torch.randn(3, VOCAB)
    masked = apply_token_mask(logits.clone(), mask)
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    keep[list(ok)] = True
    assert torch.equal(masked[1][keep], logits[1][keep]) and torch.isinf(masked[1][~keep]).all()
    # The sampler applies it: greedy and random rows alike pick allowed tokens only.
    rows = [SamplingRow(SamplingParams(temperature=t), [], []) for t in (0.0, 1.0, 1.0)]
    ids = Sampler(torch.Generator().manual_seed(0)).sample_ids(logits, rows, mask).tolist()
    assert ids[1] in ok


def test_a_finished_grammar_and_a_rebuilt_one(tok):
    g = compiler(tok)
    spec = StructuredOutputs("regex", "[0-9]{3}")
    ids = tok.encode("123", add_special_tokens=False)
    seq = g.start(spec)
    for t in ids[:-1]:
        seq.accept(t)
        assert not seq.finished
    rebuilt = g.start(spec, ids[:-1])  # what a resumed (preempted) request gets
    assert allowed(g.fill([seq], CPU), 0) == allowed(g.fill([rebuilt], CPU), 0)
    seq.accept(ids[-1])
    assert seq.finished and not seq.error
    bad = g.start(spec)
    bad.accept(tok.encode("x", add_special_tokens=False)[0])  # a token the mask forbids
    assert bad.finished and bad.error
