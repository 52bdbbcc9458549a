"""Dataclass <-> protobuf conversion for the worker's wire types (no torch).

Each ``*_to_pb`` writes every field, so ``*_from_pb(*_to_pb(x)) == x`` for every value the
dataclass can hold. ``None`` travels as an absent ``optional`` field (or an absent message field),
never as a zero. Decoding re-runs the dataclasses' own validation: a bad ``SamplingParams`` from the
wire raises the same ``ValueError`` as one built in Python. Encoding a value the wire cannot carry
(a token id beyond int32, a non-JSON ``KVHandle.extra``) raises ``ValueError`` too.
"""

from __future__ import annotations

import json
from typing import Callable

from shoal.workers.engine.sampling_params import SamplingParams, StructuredOutputs
from shoal.workers.protocol import (
    GenerateRequest, KVEventBatch, KVHandle, TokenDelta, TokenLogprob, WorkerInfo, WorkerLoad,
)
from shoal.workers.rpc import worker_pb2 as pb

# Trailing metadata of an INVALID_ARGUMENT answer: the request field at fault (``InvalidParam.field``),
# carried as data so the router's 400 names it without parsing the message.
INVALID_PARAM_KEY = "shoal-invalid-param"

_KINDS = {"snapshot": pb.KVEventBatch.SNAPSHOT, "stored": pb.KVEventBatch.STORED,
          "removed": pb.KVEventBatch.REMOVED}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def _set_opt(msg, name: str, value) -> None:
    if value is not None:
        setattr(msg, name, value)


# -- SamplingParams -----------------------------------------------------------------------------
_SAMPLING_SCALARS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "min_tokens", "include_stop_str_in_output", "ignore_eos",
                     "skip_special_tokens")
_SAMPLING_OPTIONAL = ("seed", "max_tokens", "logprobs")


def sampling_params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(stop=p.stop, stop_token_ids=p.stop_token_ids,
                            **{name: getattr(p, name) for name in _SAMPLING_SCALARS})
    for name in _SAMPLING_OPTIONAL:
        _set_opt(msg, name, getattr(p, name))
    so = p.structured_outputs
    if so is not None:
        msg.structured_outputs.CopyFrom(pb.StructuredOutputs(kind=so.kind, value=so.value, choices=so.choices))
    msg.logit_bias.extend(pb.LogitBias(token_id=t, bias=b) for t, b in p.logit_bias)
    if p.allowed_token_ids is not None:
        msg.allowed_token_ids.CopyFrom(pb.TokenIds(ids=p.allowed_token_ids))
    msg.bad_words.extend(p.bad_words)
    msg.bad_words_token_ids.extend(pb.TokenIds(ids=w) for w in p.bad_words_token_ids)
    _set_opt(msg, "prompt_logprobs", p.prompt_logprobs)
    return msg


def sampling_params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    so = None
    if msg.HasField("structured_outputs"):
        m = msg.structured_outputs
        so = StructuredOutputs(m.kind, m.value, tuple(m.choices))
    allowed = tuple(msg.allowed_token_ids.ids) if msg.HasField("allowed_token_ids") else None
    return SamplingParams(stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids), structured_outputs=so,
                          logit_bias=tuple((b.token_id, b.bias) for b in msg.logit_bias),
                          allowed_token_ids=allowed, bad_words=tuple(msg.bad_words),
                          bad_words_token_ids=tuple(tuple(w.ids) for w in msg.bad_words_token_ids),
                          prompt_logprobs=_opt(msg, "prompt_logprobs"),
                          **{name: getattr(msg, name) for name in _SAMPLING_SCALARS},
                          **{name: _opt(msg, name) for name in _SAMPLING_OPTIONAL})


# -- KVHandle / GenerateRequest -----------------------------------------------------------------
def kv_handle_to_pb(h: KVHandle) -> pb.KVHandle:
    try:
        extra = json.dumps(h.extra, sort_keys=True) if h.extra else ""
    except TypeError as e:
        raise ValueError(f"KVHandle.extra must be JSON-serialisable: {e}") from None
    return pb.KVHandle(request_id=h.request_id, source_worker=h.source_worker, block_ids=h.block_ids,
                       num_tokens=h.num_tokens, endpoint=h.endpoint, extra_json=extra)


def kv_handle_from_pb(msg: pb.KVHandle) -> KVHandle:
    try:
        extra = json.loads(msg.extra_json) if msg.extra_json else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"KVHandle.extra_json is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"KVHandle.extra_json must be a JSON object, got {type(extra).__name__}")
    return KVHandle(msg.request_id, msg.source_worker, tuple(msg.block_ids), msg.num_tokens, msg.endpoint,
                    extra)


def generate_request_to_pb(r: GenerateRequest) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
                             sampling=sampling_params_to_pb(r.sampling), priority=r.priority)
    if r.kv_source is not None:
        msg.kv_source.CopyFrom(kv_handle_to_pb(r.kv_source))
    return msg


def generate_request_from_pb(msg: pb.GenerateRequest) -> GenerateRequest:
    if not msg.request_id:
        raise ValueError("request_id must not be empty")
    if not msg.HasField("sampling"):
        raise ValueError("sampling must be set")
    return GenerateRequest(msg.request_id, tuple(msg.prompt_token_ids), sampling_params_from_pb(msg.sampling),
                           msg.priority, kv_handle_from_pb(msg.kv_source) if msg.HasField("kv_source") else None)


# -- TokenDelta ---------------------------------------------------------------------------------
def token_logprob_to_pb(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def token_logprob_from_pb(msg: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, msg.rank, tuple((t.token_id, t.logprob) for t in msg.top))


def token_delta_to_pb(d: TokenDelta) -> pb.TokenDelta:
    msg = pb.TokenDelta(request_id=d.request_id, token_ids=d.token_ids,
                        logprobs=[token_logprob_to_pb(lp) for lp in d.logprobs],
                        num_cached_tokens=d.num_cached_tokens,
                        prompt_logprobs=[token_logprob_to_pb(lp) for lp in d.prompt_logprobs])
    _set_opt(msg, "finish_reason", d.finish_reason)
    _set_opt(msg, "stop_reason", d.stop_reason)
    _set_opt(msg, "error", d.error)
    return msg


def token_delta_from_pb(msg: pb.TokenDelta) -> TokenDelta:
    return TokenDelta(msg.request_id, tuple(msg.token_ids), tuple(token_logprob_from_pb(lp) for lp in msg.logprobs),
                      _opt(msg, "finish_reason"), _opt(msg, "stop_reason"), msg.num_cached_tokens,
                      _opt(msg, "error"), tuple(token_logprob_from_pb(lp) for lp in msg.prompt_logprobs))


# -- load, info, KV events ----------------------------------------------------------------------
def worker_load_to_pb(w: WorkerLoad) -> pb.WorkerLoad:
    return pb.WorkerLoad(num_running=w.num_running, num_waiting=w.num_waiting, kv_usage=w.kv_usage,
                         num_free_blocks=w.num_free_blocks, num_total_blocks=w.num_total_blocks,
                         num_prefix_queries=w.num_prefix_queries, num_prefix_hits=w.num_prefix_hits,
                         num_cached_blocks=w.num_cached_blocks, num_pinned_blocks=w.num_pinned_blocks,
                         num_importing_blocks=w.num_importing_blocks, num_kv_fallbacks=w.num_kv_fallbacks,
                         num_expired_pins=w.num_expired_pins)


def worker_load_from_pb(msg: pb.WorkerLoad) -> WorkerLoad:
    return WorkerLoad(msg.num_running, msg.num_waiting, msg.kv_usage, msg.num_free_blocks, msg.num_total_blocks,
                      msg.num_prefix_queries, msg.num_prefix_hits, msg.num_cached_blocks,
                      msg.num_pinned_blocks, msg.num_importing_blocks, msg.num_kv_fallbacks, msg.num_expired_pins)


def worker_info_to_pb(w: WorkerInfo) -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=w.worker_id, model=w.model, block_size=w.block_size,
                         max_model_len=w.max_model_len, role=w.role, tensor_parallel_size=w.tensor_parallel_size)


def worker_info_from_pb(msg: pb.WorkerInfo) -> WorkerInfo:
    return WorkerInfo(msg.worker_id, msg.model, msg.block_size, msg.max_model_len, msg.role,
                      msg.tensor_parallel_size)


def kv_event_batch_to_pb(b: KVEventBatch) -> pb.KVEventBatch:
    if b.kind not in _KINDS:
        raise ValueError(f"KVEventBatch.kind must be one of {sorted(_KINDS)}, got {b.kind!r}")
    return pb.KVEventBatch(seq=b.seq, kind=_KINDS[b.kind], block_hashes=b.block_hashes)


def kv_event_batch_from_pb(msg: pb.KVEventBatch) -> KVEventBatch:
    if msg.kind not in _KIND_NAMES:
        raise ValueError(f"KVEventBatch.kind must be SNAPSHOT, STORED or REMOVED, got {msg.kind}")
    return KVEventBatch(msg.seq, _KIND_NAMES[msg.kind], tuple(msg.block_hashes))


# -- by type ------------------------------------------------------------------------------------
_TO_PB: dict[type, Callable] = {
    SamplingParams: sampling_params_to_pb, KVHandle: kv_handle_to_pb, GenerateRequest: generate_request_to_pb,
    TokenLogprob: token_logprob_to_pb, TokenDelta: token_delta_to_pb, WorkerLoad: worker_load_to_pb,
    WorkerInfo: worker_info_to_pb, KVEventBatch: kv_event_batch_to_pb,
}
_FROM_PB: dict[type, Callable] = {
    pb.SamplingParams: sampling_params_from_pb, pb.KVHandle: kv_handle_from_pb,
    pb.GenerateRequest: generate_request_from_pb, pb.TokenLogprob: token_logprob_from_pb,
    pb.TokenDelta: token_delta_from_pb, pb.WorkerLoad: worker_load_from_pb, pb.WorkerInfo: worker_info_from_pb,
    pb.KVEventBatch: kv_event_batch_from_pb,
}


def to_pb(obj):
    """The protobuf message of any wire dataclass."""
    encode = _TO_PB.get(type(obj))
    if encode is None:
        raise TypeError(f"no protobuf message for {type(obj).__name__}")
    return encode(obj)


def from_pb(msg):
    """The wire dataclass of any protobuf message ``to_pb`` produces."""
    decode = _FROM_PB.get(type(msg))
    if decode is None:
        raise TypeError(f"no wire dataclass for {type(msg).__name__}")
    return decode(msg)
