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


# -- wire types between router and worker (the gRPC layer converts them to and from protobuf) --------

from dataclasses import dataclass, field  # noqa: E402

from shoal.workers.engine.sampling_params import SamplingParams  # noqa: E402  (torch-free)


@dataclass(frozen=True)
class GenerateRequest:
    """router -> worker: one completion (the router fans ``n > 1`` out into children)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int = 0
    kv_source: "KVHandle | None" = None  # disaggregated serving: where the prompt's KV blocks are


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """worker -> router: the tokens a request produced since the last delta."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | None = None  # the stop token id, when one ended it
    num_cached_tokens: int = 0
    error: str | None = None
    # With a request's first token, when it asked for prompt logprobs: prompt tokens 1.. (token 0 has none)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class WorkerLoad:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks held by requests, 0..1
    num_free_blocks: int
    num_total_blocks: int
    num_prefix_queries: int = 0  # prompt tokens looked up in the prefix cache since start
    num_prefix_hits: int = 0  # of those, tokens found cached
    # Block accounting, so a leak shows on a dashboard: at rest free == total; cached blocks are a
    # subset of free (evictable) or of the in-use ones; pinned and importing are disaggregation's.
    num_cached_blocks: int = 0
    num_pinned_blocks: int = 0
    num_importing_blocks: int = 0
    num_kv_fallbacks: int = 0  # since start: kv_source requests whose pull failed (prefilled locally)
    num_expired_pins: int = 0  # since start: prefilled prompts nobody pulled within the pin's TTL


@dataclass(frozen=True)
class WorkerTotals:
    """Counts since the worker started: a rate is a difference of two over the time between them (the
    autoscaler's arrival rate and request mix). The same figures as the worker's Prometheus counters."""

    num_finished: int = 0  # requests ended, any reason
    prompt_tokens: int = 0  # summed over the finished requests
    output_tokens: int = 0  # summed over the finished requests
    computed_tokens: int = 0  # prompt + generated tokens computed, finished requests or not
    # Not a count: the current wait of the request longest in the queue, s (the queue policy's trigger).
    oldest_wait_s: float = 0.0


@dataclass(frozen=True)
class KVEventBatch:
    """A worker's cached-block changes. ``kind == "snapshot"`` replaces the subscriber's whole view;
    ``seq`` grows by one per batch, so a gap tells the subscriber to resubscribe."""

    seq: int
    kind: str  # "snapshot" | "stored" | "removed"
    block_hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    model: str
    block_size: int
    max_model_len: int
    role: str = "unified"  # "unified" | "prefill" | "decode"
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class KVHandle:
    """prefill -> decode: where a prompt's computed KV blocks live (disaggregated serving)."""

    request_id: str
    source_worker: str
    block_ids: tuple[int, ...]
    num_tokens: int
    endpoint: str
    extra: dict = field(default_factory=dict)
