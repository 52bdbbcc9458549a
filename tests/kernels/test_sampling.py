"""Triton sampling: greedy = argmax, the support restriction of top_k / top_p / min_p, reproducible
seeded draws whatever the batch, and the right distribution (checked statistically against
``reference.sampling_probs``; the kernel's random numbers are not torch's, so never draw by draw).

The interpreter runs one program per row at a few ms per pass over the row, so the statistical tests
use a tiny vocab and a few hundred rows (one draw each).
"""

from __future__ import annotations

import pytest
import torch

from shoal.kernels import reference
from shoal.kernels.sampling import sample, support_mask


def params(batch, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    full = lambda v, dt: v if isinstance(v, torch.Tensor) else torch.full((batch,), v, dtype=dt)  # noqa: E731
    return (full(temperature, torch.float32), full(top_k, torch.int32), full(top_p, torch.float32),
            full(min_p, torch.float32))


def test_greedy_is_first_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=g)
    logits[1, 812] = logits[1, 556] = logits[1, 300] = 50.0  # ties across tiles (556: 300's lane): first wins
    logits[2, 999] = 60.0  # the last column of a ragged last tile
    logits[3] = float("-inf")
    logits[3, 512] = -3.0
    logits[4, :5] = 40.0  # a tie inside one tile
    ids = sample(logits, *params(5, temperature=0.0, top_k=2, top_p=0.5), torch.arange(5), 0, block_v=256)
    assert ids.tolist() == [int(logits[0].argmax()), 300, 999, 512, 0]


# (top_k, top_p, min_p) per row: each filter alone, combinations, and filters that cut nothing.
FILTERS = [
    (1, 1.0, 0.0), (3, 1.0, 0.0), (40, 1.0, 0.0), (0, 0.3, 0.0), (-1, 0.9, 0.0), (0, 1.0, 0.2),
    (0, 1.0, 0.01), (10, 0.5, 0.0), (5, 0.95, 0.05), (300, 0.99, 0.0), (500, 1.0, 0.0), (0, 1.0, 0.0),
]


@pytest.mark.parametrize("temperature", [0.5, 1.3])
def test_support_matches_reference(temperature):
    # vocab 300 over tiles of 128, so every search pass crosses tile boundaries and a ragged tail
    g = torch.Generator().manual_seed(1)
    rows = len(FILTERS)
    logits = torch.randn(rows, 300, generator=g) * 3
    logits[:, 17] = float("-inf")  # a masked token is never drawn
    top_k = torch.tensor([f[0] for f in FILTERS], dtype=torch.int32)
    top_p = torch.tensor([f[1] for f in FILTERS])
    min_p = torch.tensor([f[2] for f in FILTERS])
    temp = torch.full((rows,), temperature)
    temp[-1] = 0.0  # greedy: the argmax alone
    want = reference.sampling_probs(logits, temp, top_k, top_p, min_p) > 0
    assert want.sum(1).tolist()[:3] == [1, 3, 40]
    got = support_mask(logits, temp, top_k, top_p, min_p, block_v=128)
    assert torch.equal(got[:, :17], want[:, :17]) and torch.equal(got[:, 18:], want[:, 18:]), (
        got.sum(1).tolist(), want.sum(1).tolist())
    # the masked token may sit in the support only where the filters cut nothing; it is never drawn
    ids = sample(logits, temp, top_k, top_p, min_p, torch.arange(rows) * 31 + 5, 0, block_v=128)
    assert want[torch.arange(rows), ids].all() and not (ids == 17).any()


def test_ties_at_the_cut_are_kept_together():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]] * 60)
    ids = sample(logits, *params(60, top_k=2), torch.arange(60), 0)
    # top_k = 2 keeps 3.0 and every 2.0: all four kept tokens are drawn, the rest never
    assert set(ids.tolist()) == {0, 2, 3, 4}


def test_seeded_rows_ignore_the_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 64, generator=g)
    temp, top_k, top_p, min_p = params(6, temperature=1.0, top_p=0.9)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16])
    steps = torch.tensor([0, 3, 9, 2, 5, 7])
    ids = sample(logits, temp, top_k, top_p, min_p, seeds, steps)
    # the same rows, shuffled and in a smaller batch next to a stranger: the same tokens
    order = torch.tensor([4, 1, 0])
    stranger = torch.randn(1, 64, generator=g)
    sub_logits = torch.cat([logits[order], stranger])
    sub = sample(sub_logits, *params(4, temperature=1.0, top_p=0.9), torch.cat([seeds[order], torch.tensor([99])]),
                 torch.cat([steps[order], torch.tensor([0])]))
    assert sub[:3].tolist() == ids[order].tolist()
    # a scalar step is the same as that step on every row
    assert sample(logits, temp, top_k, top_p, min_p, seeds, 5)[4] == ids[4]
    # the tile size does not change a draw
    assert torch.equal(sample(logits, temp, top_k, top_p, min_p, seeds, steps, block_v=16), ids)


def test_steps_and_seeds_change_the_draw():
    logits = torch.zeros(40, 1000)  # uniform: repeats would be suspicious
    ids_by_step = sample(logits, *params(40), torch.full((40,), 7), torch.arange(40))
    ids_by_seed = sample(logits, *params(40), torch.arange(40), 3)
    assert len(set(ids_by_step.tolist())) > 30 and len(set(ids_by_seed.tolist())) > 30


def _empirical(logits_row, n, **kw):
    """n draws (one per row, distinct seeds) from one logits row, as frequencies over the vocab."""
    logits = logits_row.expand(n, -1).contiguous()
    ids = sample(logits, *params(n, **kw), torch.arange(n) * 7919 + 1, 0)
    return torch.bincount(ids, minlength=logits.shape[1]).float() / n


@pytest.mark.parametrize(
    "kw,n",
    [(dict(temperature=0.6), 200), (dict(temperature=1.5, top_k=4, top_p=0.9, min_p=0.05), 240)],
    ids=["temperature", "all-filters"],
)
def test_distribution_matches_reference(kw, n):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0]])
    freq = _empirical(logits, n, **kw)
    probs = reference.sampling_probs(logits, *params(1, **kw))[0]
    assert torch.all(freq[probs == 0] == 0)
    # total variation: ~0.05 expected at these n over <= 8 outcomes; a wrong temperature or a
    # wrong renormalisation moves it past 0.15
    tv = 0.5 * (freq - probs).abs().sum()
    assert tv < 0.12, (freq, probs)


def test_two_token_race_is_exact():
    # p = (2/3, 1/3): Gumbel-max draws the second token 1/3 of the time; the classic slip of adding
    # Exp(1) noise to the log-probs instead draws it 1/4 of the time (3.5 standard errors away)
    freq = _empirical(torch.log(torch.tensor([[2 / 3, 1 / 3]])), 400)
    assert abs(float(freq[1]) - 1 / 3) < 0.06, freq


def test_sample_reference_semantics():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0], [0.0, 0.0, 3.0, 0.0]])
    temp, top_k, top_p, min_p = params(2, temperature=1.0, top_k=2)
    temp[1] = 0.0
    probs = reference.sampling_probs(logits, temp, top_k, top_p, min_p)
    assert probs[0, 2:].sum() == 0 and abs(float(probs[0].sum()) - 1) < 1e-6
    assert probs[1].tolist() == [0.0, 0.0, 1.0, 0.0]
    ids = reference.sample_reference(logits, temp, top_k, top_p, min_p, torch.tensor([1, 2]), 0)
    assert ids[0] in (0, 1) and ids[1] == 2
    again = reference.sample_reference(logits, temp, top_k, top_p, min_p, torch.tensor([1, 2]), 0)
    assert torch.equal(ids, again)


def test_bad_inputs():
    logits = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="top_k"):
        sample(logits, *params(2)[:1], torch.zeros(3, dtype=torch.int32), *params(2)[2:], torch.arange(2), 0)
    with pytest.raises(ValueError, match="seeds must be int64"):
        sample(logits, *params(2), torch.arange(2, dtype=torch.int32), 0)
