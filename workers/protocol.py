"""Torch-free types and functions shared by the worker and the router.

The block hash lives here so that the router predicts exactly the cache hits the engine will have:
both call :func:`block_hashes` on the same token ids with the same block size.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Sequence

# Seed of every hash chain. Changing it invalidates all router-side prefix indexes, so it is versioned.
_ROOT = hashlib.sha256(b"shoal-block-hash-v1").digest()[:16]


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_keys: Iterable[object] = ()) -> bytes:
    """The hash of one full KV block.

    It chains the parent block's hash, this block's token ids and any extra keys (LoRA name, cache
    salt, ...), so equal hashes mean equal prefixes, not merely equal blocks. 16 bytes of SHA-256:
    stable across processes and machines (Python's ``hash`` is salted per process).
    """
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for key in extra_keys:
        h.update(b"\x00" + repr(key).encode())
    return h.digest()[:16]


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Iterable[object] = (),
    start: int = 0,
    parent: bytes | None = None,
) -> list[bytes]:
    """Hashes of the full blocks of ``token_ids`` (a trailing partial block has none).

    ``start`` (a block index) and ``parent`` (the hash of block ``start - 1``) let a caller extend
    a chain it already has instead of rehashing the whole prefix.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    keys = tuple(extra_keys)
    out: list[bytes] = []
    for i in range(start, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], keys)
        out.append(parent)
    return out
