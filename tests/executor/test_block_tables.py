"""The device block tables: rows persist across steps, only new ids move, padding reads block 0."""

from __future__ import annotations

import random

import pytest
import torch

from shoal.workers.executor.block_tables import BlockTableStore


def gathered(store: BlockTableStore, batch: list[tuple[int | None, list[int]]], num_pad: int = 0) -> torch.Tensor:
    tables = torch.full((len(batch) + num_pad, store.max_blocks), -7, dtype=torch.int32)
    store.stage(batch, num_pad)
    store.apply(tables, len(batch) + num_pad)
    return tables


def matches(tables: torch.Tensor, batch, num_pad: int) -> bool:
    """Each row starts with its blocks (what a kernel reads: the entries of its sequence's length;
    a reused row's tail past them is stale, as a step's table always was); padding rows are all 0."""
    for i, (row, blocks) in enumerate(batch):
        want = torch.tensor(blocks, dtype=torch.int32)
        if not torch.equal(tables[i, :len(blocks)], want if row is not None else torch.zeros_like(want)):
            return False
    return bool((tables[len(batch):len(batch) + num_pad] == 0).all())


def test_rows_grow_reorder_and_get_reused_like_a_running_batch():
    """A random walk of a running batch: requests join with prefix blocks, grow a block now and then,
    change order, leave, and their rows go to new requests; every step's table is exactly the blocks."""
    rng = random.Random(0)
    width = 12
    store = BlockTableStore(8, width, 16, torch.device("cpu"))
    live: dict[str, list[int]] = {}
    rows: dict[str, int] = {}
    next_id = 0
    for step in range(300):
        if len(live) < 8 and rng.random() < 0.4:
            rid = f"r{next_id}"
            next_id += 1
            live[rid] = [rng.randrange(100) for _ in range(rng.randrange(1, 6))]
            rows[rid] = store.open(rid)
        for rid, blocks in live.items():
            if len(blocks) < width and rng.random() < 0.3:
                blocks.append(rng.randrange(100))
        if live and rng.random() < 0.15:
            gone = rng.choice(sorted(live))
            del live[gone]
            store.close(gone)
        order = sorted(live, key=lambda _: rng.random())
        batch = [(rows[r], list(live[r])) for r in order] + [(None, [0, 0])]
        num_pad = rng.randrange(3)
        assert matches(gathered(store, batch, num_pad), batch, num_pad), step


def test_staging_twice_before_applying_loses_nothing():
    store = BlockTableStore(2, 4, 4, torch.device("cpu"))
    row = store.open("a")
    store.stage([(row, [5])])
    assert torch.equal(gathered(store, [(row, [5, 6])])[0], torch.tensor([5, 6, 0, 0], dtype=torch.int32))


def test_limits_are_clear_errors():
    store = BlockTableStore(1, 2, 2, torch.device("cpu"))
    row = store.open("a")
    with pytest.raises(RuntimeError, match="already has block-table row"):
        store.open("a")
    with pytest.raises(RuntimeError, match="no block-table row left for request b"):
        store.open("b")
    with pytest.raises(ValueError, match="holds 3 blocks, more than the table's 2"):
        store.stage([(row, [1, 2, 3])])
    with pytest.raises(ValueError, match="a step of 1 \\+ 2 padding rows is more than 2"):
        store.stage([(row, [1])], 2)
    store.close("a")
    store.close("a")  # twice is harmless
    assert store.open("b") == row
