"""Block tables kept on the device between steps: a step uploads only the block ids that are new.

Each running request owns one row of a persistent ``[rows, max_blocks]`` table on the device
(:meth:`BlockTableStore.open` / :meth:`close`). Staging a step (:meth:`stage`, on the host) notes, per
batch row, which store row it reads and the block ids that row gained since the last step; applying
it (:meth:`apply`, queued on the device) writes those ids into the store and gathers the batch's rows
into the step's block table. A decode step of 256 requests with 60 blocks each then moves 256 row
indices and a few new ids instead of 15,000 ids built in Python every step.

The last store row is all zeros: padding rows (a CUDA graph's dummy decode rows, or a profiling
step's) read it and attend to block 0. Order on the device is the stream's: a store row reused by a
new request is written after every earlier step that read it was queued.
"""

from __future__ import annotations

import torch


class BlockTableStore:
    def __init__(self, max_requests: int, max_blocks: int, max_batch: int, device: torch.device) -> None:
        self.max_blocks = max_blocks
        self.device = device
        self.pad_row = max_requests
        self._pin = device.type == "cuda"
        self._copy = device.type != "cpu"
        self.store = torch.zeros(max_requests + 1, max_blocks, dtype=torch.int32, device=device)
        self._rows: dict[str, int] = {}
        self._free = list(range(max_requests - 1, -1, -1))
        self._known = [0] * max_requests  # block ids of each row already in the store
        self.max_batch = max_batch  # rows of one step's table, padding included
        self.h_order = torch.zeros(max_batch, dtype=torch.int64, pin_memory=self._pin)
        self.order = torch.zeros_like(self.h_order, device=device) if self._copy else self.h_order
        self._alloc_updates(max(4 * max_blocks, 1024))
        self._num_updates = 0

    # -- a request's row ------------------------------------------------------------------------

    def open(self, request_id: str) -> int:
        """A fresh row for ``request_id`` (its blocks get uploaded from the first)."""
        if request_id in self._rows:
            raise RuntimeError(f"request {request_id}: already has block-table row {self._rows[request_id]}")
        if not self._free:
            raise RuntimeError(f"no block-table row left for request {request_id}: "
                               f"{len(self._rows)} requests hold all {self.pad_row}")
        row = self._free.pop()
        self._rows[request_id] = row
        self._known[row] = 0
        return row

    def close(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    # -- one step -------------------------------------------------------------------------------

    def stage(self, rows: list[tuple[int | None, list[int]]], num_pad: int = 0) -> None:
        """Host: the batch's store rows in order (None: the zero padding row) and each row's new block
        ids; then ``num_pad`` padding rows. Call after the previous step's staging copies are done."""
        if len(rows) + num_pad > self.max_batch:
            raise ValueError(f"a step of {len(rows)} + {num_pad} padding rows is more than {self.max_batch}")
        order = self.h_order.numpy()
        idx: list[int] = []
        val: list[int] = []
        known = self._known
        width = self.max_blocks
        for i, (row, blocks) in enumerate(rows):
            if row is None:
                order[i] = self.pad_row
                continue
            order[i] = row
            k, n = known[row], len(blocks)
            if n > k:
                if n > width:
                    raise ValueError(f"a request holds {n} blocks, more than the table's {width}")
                base = row * width
                idx.extend(range(base + k, base + n))
                val.extend(blocks[k:])
                known[row] = n
        order[len(rows):len(rows) + num_pad] = self.pad_row
        # New ids add to those not applied yet (staging twice before one apply loses nothing).
        start, end = self._num_updates, self._num_updates + len(idx)
        if end > self.h_idx.shape[0]:
            self._alloc_updates(2 * end, keep=start)
        self.h_idx.numpy()[start:end] = idx
        self.h_val.numpy()[start:end] = val
        self._num_updates = end

    def apply(self, tables: torch.Tensor, num_seqs: int) -> None:
        """Device: write the staged new ids into the store, then ``tables[:num_seqs] = store[order]``."""
        u = self._num_updates
        if self._copy:
            self.order[:num_seqs].copy_(self.h_order[:num_seqs], non_blocking=True)
            if u:
                self.idx[:u].copy_(self.h_idx[:u], non_blocking=True)
                self.val[:u].copy_(self.h_val[:u], non_blocking=True)
        if u:
            self.store.view(-1).index_copy_(0, self.idx[:u], self.val[:u])
        torch.index_select(self.store, 0, self.order[:num_seqs], out=tables[:num_seqs])
        self._num_updates = 0

    def _alloc_updates(self, capacity: int, keep: int = 0) -> None:
        """(Re)allocate the update staging for ``capacity`` ids, keeping the first ``keep`` staged."""
        old = (self.h_idx[:keep], self.h_val[:keep]) if keep else None
        self.h_idx = torch.zeros(capacity, dtype=torch.int64, pin_memory=self._pin)
        self.h_val = torch.zeros(capacity, dtype=torch.int32, pin_memory=self._pin)
        if old is not None:
            self.h_idx[:keep], self.h_val[:keep] = old
        dev = (lambda h: torch.zeros_like(h, device=self.device)) if self._copy else (lambda h: h)
        self.idx, self.val = dev(self.h_idx), dev(self.h_val)
