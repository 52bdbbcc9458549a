"""The placement protocol: what a policy sees, what it answers, and the name -> class registry.

A policy is a small object behind one method, ``choose(request, workers) -> ranked worker ids``. The
router owns the policy instance (one per router, made by :func:`make_policy`; there are no module
singletons) and keeps the :class:`WorkerView` list fresh. Policies never do I/O: time and randomness
are injected so tests control them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import inspect
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

from shoal.workers.protocol import KVEventBatch, WorkerLoad, block_hashes, hash_block


@dataclass(frozen=True)
class PlacementRequest:
    """What a policy sees of a request: its prompt tokens (after the chat template) and a session key.

    ``extra_keys`` are mixed into the block hashes exactly as the worker mixes them (LoRA name, cache
    salt), so two requests that differ only there never look like a shared prefix.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    session_key: str | None = None  # OpenAI `user` field or an X-Session-ID header
    extra_keys: tuple = ()
    # block_size -> hashes; the prompt is hashed once per request even when several policies ask.
    _hash_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def block_hashes(self, block_size: int) -> tuple[bytes, ...]:
        """Chained hashes of the prompt's full blocks (the same function and keys as the engine)."""
        cached = self._hash_cache.get(block_size)
        if cached is None:
            cached = tuple(block_hashes(self.prompt_token_ids, block_size, self.extra_keys))
            self._hash_cache[block_size] = cached
        return cached

    def affinity_key(self) -> bytes:
        """A stable key of the prompt's beginning: equal for requests sharing a first block."""
        head = self.prompt_token_ids[:64]
        return hash_block(None, head, self.extra_keys)


@dataclass(frozen=True)
class WorkerView:
    """What a policy sees of a worker; the router rebuilds it as load reports and placements happen."""

    worker_id: str
    load: WorkerLoad
    healthy: bool = True
    in_flight: int = 0  # requests this router has open on it (fresher than load reports)


@runtime_checkable
class PlacementPolicy(Protocol):
    name: str

    def choose(self, request: PlacementRequest, workers: Sequence[WorkerView]) -> list[str]:
        """Healthy worker ids, best first (the router tries them in order); [] when none is healthy."""
        ...

    def on_kv_events(self, worker_id: str, batch: KVEventBatch) -> None: ...

    def on_worker_removed(self, worker_id: str) -> None: ...

    def on_request_placed(self, request: PlacementRequest, worker_id: str) -> None: ...


class BasePolicy(ABC):
    """No-op hooks; a policy implements ``choose`` and overrides the hooks it needs."""

    name: str = "base"

    @abstractmethod
    def choose(self, request: PlacementRequest, workers: Sequence[WorkerView]) -> list[str]:
        """Healthy worker ids, best first."""

    def on_kv_events(self, worker_id: str, batch: KVEventBatch) -> None:
        pass

    def on_worker_removed(self, worker_id: str) -> None:
        pass

    def on_request_placed(self, request: PlacementRequest, worker_id: str) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# -- load ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadWeights:
    """How a worker's load folds into one number, in units of "queued requests".

    Open requests are ``max(in_flight, num_running + num_waiting)``: the worker's report includes other
    routers' traffic, this router's ``in_flight`` includes what it placed since the last report; the
    larger is the better estimate. Waiting requests count ``waiting`` more on top (a queue means the
    worker is saturated) and a full KV cache counts ``kv_usage`` requests (it will preempt soon).
    """

    waiting: float = 1.0
    kv_usage: float = 4.0

    def __post_init__(self) -> None:
        if self.waiting < 0:
            raise ValueError(f"waiting weight must be >= 0, got {self.waiting}")
        if self.kv_usage < 0:
            raise ValueError(f"kv_usage weight must be >= 0, got {self.kv_usage}")

    def score(self, view: WorkerView) -> float:
        load = view.load
        open_requests = max(view.in_flight, load.num_running + load.num_waiting)
        return open_requests + self.waiting * load.num_waiting + self.kv_usage * load.kv_usage


def healthy_only(workers: Sequence[WorkerView]) -> list[WorkerView]:
    return [w for w in workers if w.healthy]


# -- registry -----------------------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}


def register_policy(name: str) -> Callable[[type], type]:
    """Class decorator: make ``make_policy(name)`` build this class. Names are unique."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"placement policy {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, **options) -> PlacementPolicy:
    """A new policy instance; unknown names and options raise ValueError naming what is accepted."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {available_policies()}")
    params = inspect.signature(cls).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(params))
    if unknown and not accepts_any:
        raise ValueError(f"placement policy {name!r} has no option(s) {unknown}; its options are "
                         f"{sorted(params)}")
    return cls(**options)
