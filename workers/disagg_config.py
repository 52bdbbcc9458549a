"""``DisaggConfig``: the knobs of disaggregated serving's KV transfer, on both sides.

Torch-free on purpose: the deployment spec (read by routers too) validates a pool's ``kv_transfer``
mapping with this very class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DisaggConfig:
    """Knobs of both sides; validated on construction."""

    export_ttl_s: float = 30.0  # how long a prefilled prompt stays pinned waiting for its pull
    # Limits of one link operation (open, send, receive) and of one control call to the prefill
    # worker: a whole pull stays well inside the router's first-token deadline (60 s by default).
    link_timeout_s: float = 15.0
    rpc_timeout_s: float = 5.0
    max_links_per_peer: int = 2  # decode side: concurrent transfers from one prefill worker
    max_links: int = 64  # prefill side: links it keeps open (the least recently used idle one goes)
    link_idle_s: float = 300.0  # a link unused this long is closed (a peer that left)
    # Transfers move in chunks of this many layers, received straight into the decode cache, so
    # gather, wire and scatter overlap (when each side's cache is in one process); 0: one tensor.
    layers_per_chunk: int = 4

    def __post_init__(self) -> None:
        for name in ("export_ttl_s", "link_timeout_s", "rpc_timeout_s", "link_idle_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DisaggConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_links_per_peer", "max_links"):
            if getattr(self, name) < 1:
                raise ValueError(f"DisaggConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.layers_per_chunk < 0:
            raise ValueError(f"DisaggConfig.layers_per_chunk must be >= 0, got {self.layers_per_chunk}")


# -- the --kv-* flags ---------------------------------------------------------------------------------
# (argparse dest, DisaggConfig field, type, help): the settings a one-machine user most likely wants
# (``shoal serve`` and its worker processes); a deployment spec's pool ``kv_transfer`` sets any field.
KV_TRANSFER_FLAGS = (
    ("kv_export_ttl", "export_ttl_s", float,
     "prefill workers: seconds a prefilled prompt stays pinned waiting for its decode worker's pull "
     "(longer survives slow pulls, shorter frees blocks nobody pulls sooner)"),
    ("kv_link_timeout", "link_timeout_s", float,
     "seconds one KV link operation (open, send, receive) may take before the decode worker prefills "
     "the prompt itself"),
    ("kv_layers_per_chunk", "layers_per_chunk", int,
     "layers per pipelined KV transfer chunk (gather, wire and scatter overlap); 0 sends one whole tensor"),
)


def _flag(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"


def add_kv_transfer_args(parser) -> None:
    """The ``--kv-*`` flags (``shoal serve`` and ``python -m shoal.workers.server`` share them)."""
    g = parser.add_argument_group("KV transfer (disaggregated prefill/decode)")
    for dest, name, kind, text in KV_TRANSFER_FLAGS:
        default = DisaggConfig.__dataclass_fields__[name].default
        g.add_argument(_flag(dest), dest=dest, type=kind, default=None, help=f"{text} (default: {default})")


def kv_transfer_options(args) -> dict:
    """The DisaggConfig fields the ``--kv-*`` flags set (unset ones keep their defaults), checked by
    DisaggConfig itself; a bad value is a ValueError naming the flag."""
    options = {name: getattr(args, dest) for dest, name, _, _ in KV_TRANSFER_FLAGS
               if getattr(args, dest, None) is not None}
    try:
        DisaggConfig(**options)
    except ValueError as e:  # "DisaggConfig.<field> must be ...": say the flag instead
        flags = {f"DisaggConfig.{name}": _flag(dest) for dest, name, _, _ in KV_TRANSFER_FLAGS}
        field, _, rest = str(e).partition(" ")
        raise ValueError(f"{flags.get(field, field)} {rest}") from None
    return options


def kv_transfer_flags(options: dict) -> list[str]:
    """``kv_transfer_options`` as command-line flags again (for a worker process)."""
    flags = []
    for dest, name, _, _ in KV_TRANSFER_FLAGS:
        if name in options:
            flags += [_flag(dest), str(options[name])]
    return flags
