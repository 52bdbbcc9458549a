"""Moving a prompt's KV blocks from a prefill engine to a decode engine: in one process, or over p2p.

One transfer, either way:

1. decode: ``KVSink.begin`` reserves blocks for the prompt blocks it lacks (``missing`` indices);
2. decode -> prefill: the missing indices;
3. prefill: gathers those blocks from its pinned ``ExportedPrefix``;
   prefill -> decode: a status, then the data ``[num_layers, 2, n, block_size, kv_heads, head_dim]``;
4. decode: ``KVSink.commit`` writes and publishes them (or ``abort`` on any failure: nothing leaks).

:class:`P2PKVChannel` is one connection between two processes (rank 0: prefill, rank 1: decode): a
gloo process group of its own (not the default group, so it coexists with a tensor-parallel group in
the same process), met through a TCPStore on 127.0.0.1. Every operation waits at most ``timeout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from .import_blocks import ExportedPrefix, KVGeometry, KVSink, KVSource, KVTransferError

PREFILL_RANK, DECODE_RANK = 0, 1
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_STATUS_OK, _STATUS_ERROR = 0, 1


@dataclass(frozen=True)
class TransferStats:
    num_blocks: int  # transferable blocks of the prompt
    num_sent: int  # of those, sent (the decode side lacked them)

    @property
    def num_skipped(self) -> int:
        return self.num_blocks - self.num_sent


def transfer_in_process(source: KVSource, sink: KVSink, exported: ExportedPrefix,
                        prompt_token_ids: Sequence[int], extra_keys: tuple = ()) -> TransferStats:
    """Two engines in one process: the same protocol with a plain tensor copy as the transport."""
    source.geometry.check_same(sink.geometry)
    pending = sink.begin(prompt_token_ids, extra_keys)
    try:
        if pending.hashes != exported.hashes:
            raise KVTransferError("the exported prefix is of a different prompt than the import")
        data = source.gather(exported, pending.missing)
    except BaseException:
        sink.abort(pending)
        raise
    sink.commit(pending, data)
    return TransferStats(pending.num_blocks, len(pending.missing))


class P2PKVChannel:
    """A two-process link for KV blocks over torch.distributed point-to-point (gloo on CPU).

    Construct it in both processes with the same ``store`` address; the constructor exchanges the
    caches' geometry and refuses a mismatch (different model, block size, dtype or TP size).
    """

    def __init__(self, rank: int, store: dist.Store, geometry: KVGeometry,
                 timeout: timedelta = timedelta(seconds=30)):
        if rank not in (PREFILL_RANK, DECODE_RANK):
            raise ValueError(f"rank must be {PREFILL_RANK} (prefill) or {DECODE_RANK} (decode), got {rank}")
        if geometry.dtype not in _DTYPE_CODES:
            raise ValueError(f"KV dtype must be one of {sorted(map(str, _DTYPE_CODES))}, got {geometry.dtype}")
        self.rank, self.peer = rank, 1 - rank
        self.geometry, self.timeout = geometry, timeout
        self._tag = 0
        self._broken: str | None = None  # a failed operation leaves the two sides out of step
        self._store = None
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("shoal/kv", store), rank, 2, timeout)
        mine = self._geometry_tensor(geometry)
        theirs = torch.empty_like(mine)
        self._exchange(mine, theirs)
        if not torch.equal(mine, theirs):
            raise ValueError(f"KV cache geometry differs between prefill and decode: "
                             f"{mine.tolist()} vs {theirs.tolist()} "
                             f"(layers, block_size, kv_heads, head_dim, dtype)")

    @classmethod
    def connect(cls, rank: int, host: str, port: int, geometry: KVGeometry,
                timeout: timedelta = timedelta(seconds=30)) -> "P2PKVChannel":
        """Join the TCPStore at ``host:port`` as a client. Whoever pairs the two engines hosts that
        store (a launcher, later the router or etcd-backed rendezvous; in tests the parent process)."""
        store = dist.TCPStore(host, port, 2, is_master=False, timeout=timeout)
        channel = cls(rank, store, geometry, timeout)
        channel._store = store  # keep the client connection as long as the channel
        return channel

    # -- prefill side -----------------------------------------------------------------------------
    def send_prefix(self, source: KVSource, exported: ExportedPrefix) -> TransferStats:
        """Answer one decode-side request for blocks of ``exported``; the caller releases it after."""
        self._require(PREFILL_RANK)
        count = self._recv(torch.empty(1, dtype=torch.int64))
        indices = self._recv(torch.empty(int(count), dtype=torch.int64)).tolist() if count else []
        try:
            data = source.gather(exported, indices)
        except BaseException:
            self._send(torch.tensor([_STATUS_ERROR], dtype=torch.int64))
            raise
        self._send(torch.tensor([_STATUS_OK], dtype=torch.int64))
        if indices:
            self._send(data.cpu())  # gloo moves host memory; NCCL would send the device tensor
        return TransferStats(len(exported.hashes), len(indices))

    # -- decode side ------------------------------------------------------------------------------
    def recv_prefix(self, sink: KVSink, prompt_token_ids: Sequence[int], extra_keys: tuple = ()) -> TransferStats:
        """Ask for the blocks of the prompt this engine lacks, receive them, publish them."""
        self._require(DECODE_RANK)
        pending = sink.begin(prompt_token_ids, extra_keys)
        try:
            missing = torch.tensor(pending.missing, dtype=torch.int64)
            self._send(torch.tensor([len(missing)], dtype=torch.int64))
            if len(missing):
                self._send(missing)
            status = int(self._recv(torch.empty(1, dtype=torch.int64)))
            if status != _STATUS_OK:
                raise KVTransferError("the prefill side could not gather the requested blocks")
            data = torch.empty(self.geometry.data_shape(len(missing)), dtype=self.geometry.dtype)
            if len(missing):
                self._recv(data)
        except BaseException:
            sink.abort(pending)
            raise
        sink.commit(pending, data)
        return TransferStats(pending.num_blocks, len(pending.missing))

    def close(self) -> None:
        self.group = None
        self._store = None

    # -- plumbing ---------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.group is None:
            raise KVTransferError("the KV channel is closed")
        if self._broken is not None:
            raise KVTransferError(f"the KV channel failed earlier ({self._broken}); open a new one")

    def _send(self, t: torch.Tensor) -> None:
        self._check_usable()
        self._wait(self.group.send([t.contiguous()], self.peer, self._next_tag()), "send")

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        self._check_usable()
        self._wait(self.group.recv([t], self.peer, self._next_tag()), "recv")
        return t

    def _exchange(self, mine: torch.Tensor, theirs: torch.Tensor) -> None:
        # The lower rank sends first, so the two sides' tags stay in step.
        if self.rank == PREFILL_RANK:
            self._send(mine), self._recv(theirs)
        else:
            self._recv(theirs), self._send(mine)

    def _next_tag(self) -> int:
        # Both sides run the same sequence of operations, so the n-th send matches the n-th recv.
        self._tag += 1
        return self._tag

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            self._broken = f"{what}: {e}"
            raise KVTransferError(f"KV transfer {what} to/from rank {self.peer} failed or timed out "
                                  f"after {self.timeout.total_seconds():.0f} s: {e}") from e

    def _require(self, rank: int) -> None:
        if self.rank != rank:
            raise ValueError(f"this channel end is rank {self.rank}; the call needs rank {rank}")

    @staticmethod
    def _geometry_tensor(g: KVGeometry) -> torch.Tensor:
        return torch.tensor([g.num_layers, g.block_size, g.num_kv_heads, g.head_dim, _DTYPE_CODES[g.dtype]],
                            dtype=torch.int64)
