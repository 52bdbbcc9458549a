"""The autoscaling protocol: what a policy sees of a pool, what it answers, and the name -> class registry.

A policy is a small object behind one method, ``decide(observation) -> Decision``. It does no I/O and
reads no clock: time comes in the observation, so the simulator and the live controller run the same
objects. A policy may keep history between calls (stabilization windows, a forecast) but nothing else.

Each policy has a frozen config dataclass whose fields are declared with ``workers.options.option``:
the deployment spec's ``autoscaling.<pool>`` keys other than the bounds and ``policy`` are exactly
those fields, checked by that declaration (:func:`check_policy_options`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from shoal.workers.options import OptionError, check_mapping, describe


@dataclass(frozen=True)
class PoolObservation:
    """One pool, at one moment: the workers' load reports summed or averaged, the router's figures."""

    now: float  # seconds (any epoch; only differences matter)
    pool: str = "unified"  # the pool's role: unified | prefill | decode
    ready_replicas: int = 0  # serving
    starting_replicas: int = 0  # asked for, not serving yet (they count against the bound)
    num_running: int = 0  # requests generating, summed over ready replicas
    num_waiting: int = 0  # requests queued on workers or held by routers
    kv_usage: float = 0.0  # mean fraction of KV blocks in use
    tokens_per_s: float = 0.0  # tokens the pool computes per second (prefill + decode)
    arrival_rate: float = 0.0  # requests/s routed to this pool, over the router's short window
    recent_arrival_rate: float | None = None  # the same since the previous observation alone; None: not measured
    mean_prompt_len: float = 0.0  # of those requests
    mean_output_len: float = 0.0
    max_queue_time_s: float = 0.0  # the longest current wait in a queue

    @property
    def replicas(self) -> int:
        return self.ready_replicas + self.starting_replicas


@dataclass(frozen=True)
class Decision:
    """Desired replicas and why; ``inputs`` are the figures the policy used (exported as metrics)."""

    replicas: int
    reason: str
    inputs: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Bounds:
    min_replicas: int = 1
    max_replicas: int = 1

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"replica bounds must satisfy 0 <= min <= max, max >= 1; got "
                             f"[{self.min_replicas}, {self.max_replicas}]")

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@runtime_checkable
class Policy(Protocol):
    name: str

    def decide(self, obs: PoolObservation) -> Decision:
        """The pool's desired replica count (within the bounds) for this observation."""
        ...


def demand(obs: PoolObservation) -> bool:
    """Any work for the pool now: a policy never scales a pool with work in it to zero."""
    return obs.arrival_rate > 0 or obs.num_waiting > 0 or obs.num_running > 0


# -- registry -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    cls: type
    config: type


_REGISTRY: dict[str, _Entry] = {}


def register_policy(name: str, config: type) -> Callable[[type], type]:
    """Class decorator: ``make_policy(name, ...)`` builds this class with a ``config`` instance."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"autoscaling policy {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        cls.name = name
        _REGISTRY[name] = _Entry(cls, config)
        return cls

    return deco


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown autoscaling policy {name!r}; choose one of {available_policies()}")
    return entry


def policy_config_class(name: str) -> type:
    return _entry(name).config


def check_policy_options(name: str, options: Mapping[str, Any], path: str = "") -> dict:
    """``options`` checked against policy ``name``'s config declaration, and built once so its own
    cross-field checks run; an :class:`OptionError` names ``<path>.<key>``."""
    cls = policy_config_class(name)
    checked = check_mapping(cls, options, path, f"an option of the {name!r} policy")
    try:
        cls(**checked)
    except OptionError as e:
        raise OptionError(f"{path}.{e.field}" if path and e.field else path or e.where, e.message, e.field) from None
    return checked


def policy_options(name: str) -> tuple:
    """The option declarations of policy ``name`` (name, type, default, help, limits): docs, Helm values."""
    return describe(policy_config_class(name))


def make_policy(name: str, bounds: Bounds, profile: Any = None, /, **options: Any) -> Policy:
    """A new policy instance. ``profile`` is a :class:`~.profile.Profile` (only ``slo`` needs one; without
    it, ``slo`` loads the one its ``profile`` option names: positional-only, so that option passes)."""
    entry = _entry(name)
    config = entry.config(**check_policy_options(name, options))
    return entry.cls(config, bounds, profile)


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b - 1e-9)) if b > 0 else 0
