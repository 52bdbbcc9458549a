"""Persistent input buffers: a step's flattened batch is built in numpy on the host, copied once into
fixed device tensors, and the model reads views of them (the same memory CUDA graphs captured).
Block tables stay on the device between steps (:mod:`.block_tables`): only new block ids are uploaded.

The host staging is one set of pinned tensors whose copies are queued, not waited for. Under async
scheduling the host stages step N+1 while step N may not have started on the device yet, so
``fill`` first waits for the previous step's copies (an event recorded after them; by then the
device has finished step N-1, so the wait is the copies' own few microseconds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shoal.workers.models.ops import AttentionMetadata

from .block_tables import BlockTableStore

# One batch row: (token ids, first position, query length, block ids, its BlockTableStore row; None:
# all block 0, for rows that write nothing).
Row = tuple[list[int], int, int, list[int], "int | None"]


@dataclass
class StepInputs:
    """One step's batch as device views of the persistent buffers."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling]
    num_tokens: int
    num_seqs: int
    is_decode_only: bool


class InputBuffers:
    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 device: torch.device):
        self.device = device
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        pin = device.type == "cuda"

        def host(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        # host staging (pinned on GPU machines so the copies are asynchronous)
        self.h_input_ids = host(max_num_tokens, dtype=torch.int64)
        self.h_positions = host(max_num_tokens, dtype=torch.int64)
        self.h_slots = host(max_num_tokens, dtype=torch.int64)
        self.h_qsl = host(max_num_seqs + 1, dtype=torch.int32)
        self.h_seq_lens = host(max_num_seqs, dtype=torch.int32)
        self.h_logits_idx = host(max_num_seqs, dtype=torch.int64)
        self.h_gather = host(2, max_num_seqs, dtype=torch.int64)  # (token position, source row) pairs
        # device buffers the model (and captured graphs) read; on CPU they are the host buffers
        self._copy = device.type != "cpu"
        dev = (lambda h: torch.zeros_like(h, device=device)) if self._copy else (lambda h: h)
        self.input_ids, self.positions, self.slots = dev(self.h_input_ids), dev(self.h_positions), dev(self.h_slots)
        self.qsl, self.seq_lens = dev(self.h_qsl), dev(self.h_seq_lens)
        self.tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        # Rows for twice the batch: under async scheduling a finished request's row is closed a step late.
        self.block_tables = BlockTableStore(2 * max_num_seqs, max_blocks_per_seq, max_num_seqs, device)
        self.logits_idx = dev(self.h_logits_idx)
        self.gather = dev(self.h_gather)
        self._staged = None  # CUDA event after the last queued copies out of the host staging

    def fill(self, rows: list[Row], block_size: int, pad_to: int | None = None) -> tuple[int, int, int, int]:
        """Stage ``rows`` (see :data:`Row`) into the host buffers and the block tables' staging.

        With ``pad_to``, dummy decode rows (query length 1, slot -1 so nothing is written, context 1)
        fill the batch up to a captured graph size. Returns (num_tokens, num_seqs, max query len,
        max seq len).
        """
        if self._staged is not None:
            self._staged.synchronize()  # the last step's copies have read the staging we overwrite
            self._staged = None
        ids, pos, slots = self.h_input_ids.numpy(), self.h_positions.numpy(), self.h_slots.numpy()
        qsl, lens = self.h_qsl.numpy(), self.h_seq_lens.numpy()
        # Per-row numpy calls cost microseconds each: build plain lists (decode rows are one token)
        # and hand numpy a few whole arrays.
        tok: list[int] = []
        p_list: list[int] = []
        s_list: list[int] = []
        q_list = [0]
        l_list: list[int] = []
        table_rows: list[tuple[int | None, list[int]]] = []
        for tokens, start, n, blocks, table_row in rows:
            if n == 1:
                tok.append(tokens[0])
                p_list.append(start)
                s_list.append(blocks[start // block_size] * block_size + start % block_size)
            else:
                tok.extend(tokens)
                for q in range(start, start + n):
                    p_list.append(q)
                    s_list.append(blocks[q // block_size] * block_size + q % block_size)
            q_list.append(q_list[-1] + n)
            l_list.append(start + n)
            table_rows.append((table_row, blocks))
        t = len(tok)
        ids[:t] = tok
        pos[:t] = p_list
        slots[:t] = s_list
        qsl[:len(q_list)] = q_list
        lens[:len(l_list)] = l_list
        max_q = max((r[2] for r in rows), default=0)
        max_s = max(l_list, default=0)
        num_seqs = len(rows)
        extra = pad_to - num_seqs if pad_to is not None and pad_to > num_seqs else 0
        self.block_tables.stage(table_rows, extra)
        if extra:
            ids[t:t + extra] = 0
            pos[t:t + extra] = 0
            slots[t:t + extra] = -1
            qsl[num_seqs + 1:pad_to + 1] = np.arange(t + 1, t + extra + 1)
            lens[num_seqs:pad_to] = 1
            t += extra
            num_seqs = pad_to
        return t, num_seqs, max_q, max_s

    def upload(self, num_tokens: int, num_seqs: int, logits_indices: list[int], max_q: int,
               max_s: int, width: int) -> StepInputs:
        """Copy the staged host data to the device buffers and return views of them."""
        n_logits = len(logits_indices)
        self.h_logits_idx.numpy()[:n_logits] = logits_indices
        if self._copy:
            nb = True  # pinned host memory: the copies are queued, not waited for
            for dst, src in ((self.input_ids, self.h_input_ids), (self.positions, self.h_positions),
                             (self.slots, self.h_slots)):
                dst[:num_tokens].copy_(src[:num_tokens], non_blocking=nb)
            self.qsl[:num_seqs + 1].copy_(self.h_qsl[:num_seqs + 1], non_blocking=nb)
            self.seq_lens[:num_seqs].copy_(self.h_seq_lens[:num_seqs], non_blocking=nb)
            self.logits_idx[:n_logits].copy_(self.h_logits_idx[:n_logits], non_blocking=nb)
        self.block_tables.apply(self.tables, num_seqs)
        if self._copy:
            self._mark_staged()
        meta = AttentionMetadata(
            slot_mapping=self.slots[:num_tokens], query_start_loc=self.qsl[:num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs], block_tables=self.tables[:num_seqs, :width],
            max_query_len=max_q, max_seq_len=max_s)
        return StepInputs(self.input_ids[:num_tokens], self.positions[:num_tokens], meta,
                          self.logits_idx[:n_logits], num_tokens, num_seqs,
                          is_decode_only=max_q == 1)

    def gather_ids(self, positions: list[int], rows: list[int], sampled: torch.Tensor) -> None:
        """On the device: ``input_ids[positions[i]] = sampled[rows[i]]`` (after :meth:`upload`).

        The decode tokens of async scheduling whose ids the host does not know yet: the previous
        step sampled them into ``sampled`` ([num_sampled] int64, on this device), and the copy is
        queued behind that step, so the host never waits for it.
        """
        k = len(positions)
        staged = self.h_gather.numpy()
        staged[0, :k] = positions
        staged[1, :k] = rows
        if self._copy:
            self.gather[:, :k].copy_(self.h_gather[:, :k], non_blocking=True)
            self._mark_staged()
        self.input_ids.index_copy_(0, self.gather[0, :k], sampled.index_select(0, self.gather[1, :k]))

    def _mark_staged(self) -> None:
        if self.device.type == "cuda":
            self._staged = torch.cuda.Event()
            self._staged.record()
