"""Moving a prompt's KV blocks from a prefill engine to a decode engine: in one process, or over p2p.

One transfer, either way:

1. decode: ``KVSink.begin`` reserves blocks for the prompt blocks it lacks (``missing`` indices);
2. decode -> prefill: the missing indices (out of band: the workers' gRPC ``PullKV``, or a test);
3. prefill: gathers those blocks from its pinned ``ExportedPrefix`` and sends the data
   ``[num_layers, 2, n, block_size, kv_heads, head_dim]`` (:func:`send_blocks`);
4. decode: receives it and ``KVSink.commit`` writes and publishes the blocks (:func:`recv_blocks`),
   or ``abort`` on any failure: nothing leaks.

Across processes the data moves on a :class:`~.link.KVLink` (torch.distributed point-to-point).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .import_blocks import ExportedPrefix, KVSink, KVSource, KVTransferError, PendingImport
from .link import KVLink


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


def send_blocks(link: KVLink, source: KVSource, exported: ExportedPrefix, indices: Sequence[int],
                tag: int) -> TransferStats:
    """Prefill half over a link: gather the asked-for blocks of ``exported`` and send them.

    The caller agreed ``indices`` and ``tag`` with the decode side out of band; it releases
    ``exported`` after (the gather copied the data, so that may happen before the send completes).
    """
    if indices:
        link.send(source.gather(exported, indices), tag)
    return TransferStats(len(exported.hashes), len(indices))


def recv_blocks(link: KVLink, sink: KVSink, pending: PendingImport, tag: int) -> TransferStats:
    """Decode half over a link: receive the blocks ``pending`` lacks, then commit (publish) them.

    Any failure aborts ``pending`` (the reserved blocks return to the free pool) and re-raises.
    """
    try:
        data = None
        if pending.missing:
            data = torch.empty(sink.geometry.data_shape(len(pending.missing)), dtype=sink.geometry.dtype,
                               device=link.device)
            link.recv(data, tag)
    except BaseException:
        sink.abort(pending)
        raise
    sink.commit(pending, data)
    return TransferStats(pending.num_blocks, len(pending.missing))
