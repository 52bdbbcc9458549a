"""KV transfer for disaggregated serving: a prefill engine hands a prompt's paged KV blocks to a
decode engine, which publishes them in its prefix cache under the same block hashes.

``import_blocks``: gather/scatter of blocks and the block ownership on each side (``KVSource``,
``KVSink``). ``transfer``: the transports (``transfer_in_process``, ``P2PKVChannel`` over gloo).
"""

from .import_blocks import (ExportedPrefix, KVGeometry, KVSink, KVSource, KVTransferError, PendingImport,
                            gather_blocks, scatter_blocks, transferable_hashes)
from .transfer import DECODE_RANK, PREFILL_RANK, P2PKVChannel, TransferStats, transfer_in_process

__all__ = ["DECODE_RANK", "ExportedPrefix", "KVGeometry", "KVSink", "KVSource", "KVTransferError",
           "P2PKVChannel", "PREFILL_RANK", "PendingImport", "TransferStats", "gather_blocks",
           "scatter_blocks", "transfer_in_process", "transferable_hashes"]
