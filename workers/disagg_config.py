"""``DisaggConfig``: the knobs of disaggregated serving's KV transfer, on both sides.

Declared with ``workers/options.py``: the ``--kv-*`` flags (``shoal serve`` and
``python -m shoal.workers.server``) and a deployment spec pool's ``kv_transfer`` keys are generated
from these fields. Torch-free on purpose: the deployment spec (read by routers too) validates a
pool's ``kv_transfer`` mapping with this very class.
"""

from __future__ import annotations

from dataclasses import dataclass

from .options import option, validate


@dataclass(frozen=True)
class DisaggConfig:
    """Knobs of both sides; validated on construction."""

    export_ttl_s: float = option(
        30.0, "prefill workers: seconds a prefilled prompt stays pinned waiting for its decode worker's pull "
              "(longer survives slow pulls, shorter frees blocks nobody pulls sooner)",
        exclusive_minimum=0, flag="--kv-export-ttl")
    # Limits of one link operation (open, send, receive) and of one control call to the prefill
    # worker: a whole pull stays well inside the router's first-token deadline (60 s by default).
    link_timeout_s: float = option(
        15.0, "seconds one KV link operation (open, send, receive) may take before the decode worker "
              "prefills the prompt itself", exclusive_minimum=0, flag="--kv-link-timeout")
    rpc_timeout_s: float = option(
        5.0, "decode workers: seconds one control call to a prefill worker may take",
        exclusive_minimum=0, flag="--kv-rpc-timeout")
    max_links_per_peer: int = option(
        2, "decode workers: concurrent KV transfers from one prefill worker", minimum=1,
        flag="--kv-max-links-per-peer")
    max_links: int = option(
        64, "prefill workers: KV links kept open (the least recently used idle one goes)", minimum=1,
        flag="--kv-max-links")
    link_idle_s: float = option(
        300.0, "seconds a KV link may stay unused before it is closed (a peer that left)",
        exclusive_minimum=0, flag="--kv-link-idle")
    # Transfers move in chunks of this many layers, received straight into the decode cache, so
    # gather, wire and scatter overlap (when each side's cache is in one process); 0: one tensor.
    layers_per_chunk: int = option(
        4, "layers per pipelined KV transfer chunk (gather, wire and scatter overlap); 0 sends one whole "
           "tensor", minimum=0, flag="--kv-layers-per-chunk")

    def __post_init__(self) -> None:
        validate(self)
