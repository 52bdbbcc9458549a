"""KV transfer for disaggregated serving: a prefill engine hands a prompt's paged KV blocks to a
decode engine, which publishes them in its prefix cache under the same block hashes.

``import_blocks``: gather/scatter of blocks and the block ownership on each side (``KVSource``,
``KVSink``). ``link``: ``KVLink``, a point-to-point torch.distributed connection (gloo / NCCL).
``transfer``: the two halves of one transfer over a link, and the in-process transfer.
"""

from .import_blocks import (CacheBlockIO, ExportedPrefix, KVGeometry, KVSink, KVSource, KVTransferError,
                            PendingImport, gather_blocks, scatter_blocks, transferable_hashes)
from .link import RECEIVER, SENDER, KVLink, LinkStore, backend_for
from .transfer import TransferStats, recv_blocks, send_blocks, transfer_in_process

from . import pipeline  # noqa: E402  (chunked transfers: pipeline.send_blocks / pipeline.recv_blocks)

__all__ = ["CacheBlockIO", "ExportedPrefix", "KVGeometry", "KVLink", "KVSink", "KVSource", "KVTransferError",
           "LinkStore", "PendingImport", "RECEIVER", "SENDER", "TransferStats", "backend_for", "gather_blocks",
           "recv_blocks", "scatter_blocks", "send_blocks", "transfer_in_process", "transferable_hashes"]
