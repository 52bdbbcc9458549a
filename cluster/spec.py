"""The deployment spec: what a shoal deployment runs, as frozen dataclasses loaded from YAML, JSON or a dict.

Every class validates itself on construction; :meth:`DeploymentSpec.from_dict` adds the path, so an
error reads ``pools.decode.replicas must be >= 0, got -1``. ``from_dict(spec.to_dict()) == spec``.

Torch-free on purpose: routers read the spec too. A pool's ``engine:`` keys are ``EngineConfig``'s
fields (``workers/config.py``, torch-free) but ``model`` (the deployment's) and ``tensor_parallel_size``
(the pool's), each checked on load against its declaration: name (with a close match when unknown),
type and limits, so ``pools.decode.engine.block_size must be one of 1, 2, 4, ...`` comes from the spec.

A pool's ``kv_transfer:`` mapping sets its workers' ``DisaggConfig`` (``workers/disagg_config.py``): how
disaggregated prefill/decode moves KV blocks. Its keys are exactly DisaggConfig's fields, each
optional (the default applies), and apply to whichever side the pool plays (a decode or unified
worker pulls, a prefill worker serves pulls)::

    pools:
      prefill:
        kv_transfer:
          export_ttl_s: 30.0       # how long a prefilled prompt stays pinned waiting for its pull
          link_timeout_s: 15.0     # limit of one link operation (open, send, receive)
          rpc_timeout_s: 5.0       # limit of one control call to the prefill worker (decode side)
          max_links_per_peer: 2    # decode side: concurrent transfers from one prefill worker
          max_links: 64            # prefill side: links kept open (least recently used idle one goes)
          link_idle_s: 300.0       # a link unused this long is closed
          layers_per_chunk: 4      # layers per pipelined chunk; 0: one whole tensor

Values are checked on load by DisaggConfig's own declaration (see :func:`check_kv_transfer`), so
``pools.prefill.kv_transfer.export_ttl_s must be > 0, got 0`` comes from the spec, not a worker.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

from shoal.cluster.etcd import parse_endpoints
from shoal.workers.config import EngineConfig
from shoal.workers.disagg_config import DisaggConfig
from shoal.workers.options import OptionError, check_mapping, defaults

POOL_ROLES = ("unified", "prefill", "decode")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS-1123 label: usable in k8s names too
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class SpecError(ValueError):
    """A spec field is missing, unknown or out of range; ``path`` names it (``pools.decode.replicas``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path} {message}" if path else message)
        self.path = path
        self.message = message

    def under(self, parent: str) -> "SpecError":
        return SpecError(_join(parent, self.path), self.message)


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent and child else parent or child


@contextlib.contextmanager
def _under(path: str) -> Iterator[None]:
    """Re-raise a SpecError from a constructor with ``path`` in front of its (relative) path."""
    try:
        yield
    except SpecError as e:
        raise e.under(path) from None


# -- field checks (relative paths; _under adds the parent) ----------------------------------------

def _check_int(value: Any, path: str, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(path, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SpecError(path, f"must be <= {maximum}, got {value}")


def _check_number(value: Any, path: str, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(path, f"must be a number, got {value!r}")
    if value < minimum:
        raise SpecError(path, f"must be >= {minimum}, got {value}")


def _check_str(value: Any, path: str) -> None:
    if not isinstance(value, str) or not value:
        raise SpecError(path, f"must be a non-empty string, got {value!r}")


def _mapping(data: Any, path: str, known: tuple[str, ...], what: str, required: tuple[str, ...] = ()) -> dict:
    """``data`` as a dict, refusing non-mappings, unknown keys (with a suggestion) and missing keys."""
    if not isinstance(data, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            did_you = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SpecError(_join(path, str(key)), f"is not {what}{did_you}; known: {', '.join(known)}")
    for key in required:
        if key not in data:
            raise SpecError(_join(path, key), "is required")
    return dict(data)


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


# -- a pool's engine (EngineConfig) and kv_transfer (DisaggConfig) --------------------------------

# EngineConfig fields a pool's engine mapping must not set: the spec sets them elsewhere, once.
_ENGINE_SET_ELSEWHERE = {"model": "is set once, by the top-level model field",
                         "tensor_parallel_size": "is set once, by the pool's tensor_parallel_size"}


def engine_fields() -> Mapping[str, Any]:
    """``EngineConfig`` field name -> default (``...`` for ``model``, which has none)."""
    return defaults(EngineConfig)


def kv_transfer_fields() -> Mapping[str, Any]:
    """``DisaggConfig`` field name -> default: the keys a pool's ``kv_transfer`` may set."""
    return defaults(DisaggConfig)


def _options(cls: type, data: Any, path: str, what: str, skip: tuple[str, ...] = ()) -> dict:
    """``data`` checked against ``cls``'s option declarations (workers/options.py), as a SpecError."""
    try:
        return check_mapping(cls, data, path, what, skip=skip)
    except OptionError as e:
        raise SpecError(e.where, e.message) from None


def _build(cls: type, path: str, **kwargs: Any) -> Any:
    """``cls(**kwargs)``; a refusal of its own checks names ``<path>.<field>``."""
    try:
        return cls(**kwargs)
    except OptionError as e:
        raise SpecError(_join(path, e.field or ""), e.message) from None


def check_engine(options: Any) -> dict:
    """``options`` as a dict of EngineConfig fields, or a SpecError naming ``engine.<field>``."""
    if isinstance(options, Mapping):
        for key, why in _ENGINE_SET_ELSEWHERE.items():
            if key in options:
                raise SpecError(f"engine.{key}", why)
    return _options(EngineConfig, options, "engine", "an EngineConfig field", skip=tuple(_ENGINE_SET_ELSEWHERE))


def check_kv_transfer(options: Any) -> dict:
    """``options`` as a dict of DisaggConfig fields, or a SpecError naming ``kv_transfer.<field>``:
    an unknown key, a value of the wrong type, or one DisaggConfig's own checks refuse."""
    d = _options(DisaggConfig, options, "kv_transfer", "a kv_transfer (DisaggConfig) field")
    _build(DisaggConfig, "kv_transfer", **d)
    return d


def parse_memory(value: Any, path: str = "memory") -> int:
    """Bytes from an int or a Kubernetes quantity (``"16Gi"``, ``"512Mi"``, ``"8G"``)."""
    if isinstance(value, str):
        m = _MEMORY.match(value.strip())
        if not m:
            raise SpecError(path, f"must be bytes or a quantity like '16Gi' or '8G', got {value!r}")
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    _check_int(value, path, minimum=0)
    return value


# -- the spec -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    """What one tensor-parallel rank (one Ray actor) reserves. Keys in files: ``CPU``, ``GPU``, ``memory``,
    and ``custom``: Ray custom resources by name (e.g. one that only the pool's own nodes offer, which
    is how the Helm chart pins a pool's replicas to its worker group)."""

    cpu: float = 1.0
    gpu: float = 0.0
    memory: int = 0  # bytes; 0: no reservation
    custom: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_number(self.cpu, "CPU")
        _check_number(self.gpu, "GPU")
        _check_int(self.memory, "memory", minimum=0)
        if not isinstance(self.custom, Mapping):
            raise SpecError("custom", f"must be a mapping of Ray resource names to amounts, got {self.custom!r}")
        for name, amount in self.custom.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or not isinstance(name, str) or not name:
                raise SpecError("custom", f"{name!r} is not a custom resource name (CPU, GPU and memory "
                                          "have their own keys)")
            _check_number(amount, f"custom.{name}")
        object.__setattr__(self, "custom", _frozen(dict(self.custom)))

    def to_dict(self) -> dict:
        out = {"CPU": self.cpu, "GPU": self.gpu, "memory": self.memory}
        return out | {"custom": dict(self.custom)} if self.custom else out

    @classmethod
    def from_dict(cls, data: Any, path: str = "resources_per_rank") -> "Resources":
        d = _mapping(data, path, ("CPU", "GPU", "memory", "custom"), "a resources field (Ray resource names)")
        with _under(path):
            return cls(cpu=d.get("CPU", 1.0), gpu=d.get("GPU", 0.0),
                       memory=parse_memory(d.get("memory", 0)), custom=d.get("custom") or {})


@dataclass(frozen=True)
class PoolSpec:
    """One pool of identical worker replicas; each replica is ``tensor_parallel_size`` ranks."""

    replicas: int = 1
    tensor_parallel_size: int = 1
    resources_per_rank: Resources = field(default_factory=Resources)
    engine: Mapping[str, Any] = field(default_factory=dict)  # EngineConfig fields other than model
    kv_transfer: Mapping[str, Any] = field(default_factory=dict)  # DisaggConfig fields (see the module doc)

    def __post_init__(self) -> None:
        _check_int(self.replicas, "replicas", minimum=0)
        _check_int(self.tensor_parallel_size, "tensor_parallel_size", minimum=1)
        if not isinstance(self.resources_per_rank, Resources):
            raise SpecError("resources_per_rank", f"must be a Resources, got {self.resources_per_rank!r}")
        object.__setattr__(self, "engine", _frozen(check_engine(self.engine)))
        object.__setattr__(self, "kv_transfer", _frozen(check_kv_transfer(self.kv_transfer)))

    def engine_option(self, name: str) -> Any:
        """The value the engine will use: this pool's setting, else EngineConfig's default."""
        if name == "tensor_parallel_size":
            return self.tensor_parallel_size
        return self.engine.get(name, engine_fields()[name])

    def engine_config(self, model: str) -> EngineConfig:
        """The ``EngineConfig`` of one replica."""
        return _build(EngineConfig, "engine", model=model, tensor_parallel_size=self.tensor_parallel_size,
                      **self.engine)

    def disagg_config(self):
        """The ``DisaggConfig`` of one replica's engine."""
        return DisaggConfig(**self.kv_transfer)

    def to_dict(self) -> dict:
        return {"replicas": self.replicas, "tensor_parallel_size": self.tensor_parallel_size,
                "resources_per_rank": self.resources_per_rank.to_dict(), "engine": dict(self.engine),
                "kv_transfer": dict(self.kv_transfer)}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "PoolSpec":
        d = _mapping(data, path, ("replicas", "tensor_parallel_size", "resources_per_rank", "engine",
                                  "kv_transfer"), "a pool field")
        if "resources_per_rank" in d:
            d["resources_per_rank"] = Resources.from_dict(d["resources_per_rank"],
                                                          _join(path, "resources_per_rank"))
        with _under(path):
            return cls(**d)


@dataclass(frozen=True)
class RouterSpec:
    replicas: int = 1
    policy: str = "prefix_aware"  # a name from shoal.router.placement.available_policies()
    port: int = 8000
    policy_options: Mapping[str, Any] = field(default_factory=dict)  # passed to make_policy
    # With prefill + decode pools: a prompt whose uncached part is shorter goes straight to decode.
    disagg_min_prefill_tokens: int = 512
    # The served model's tool-call format (RouterConfig.tool_call_parser, checked by its declaration).
    tool_call_parser: str | None = None
    # The chat template instead of the tokenizer's (RouterConfig.chat_template: a path on the router's
    # host, or the Jinja text inline; checked by its declaration: it loads and compiles).
    chat_template: str | None = None

    def __post_init__(self) -> None:
        from shoal.router.config import RouterConfig  # torch-free
        from shoal.router.placement import available_policies
        from shoal.workers.options import OptionError, check_mapping

        try:
            check_mapping(RouterConfig, {"tool_call_parser": self.tool_call_parser}, "")
        except OptionError as e:
            raise SpecError("tool_call_parser", e.message) from None
        if self.chat_template is not None:
            try:
                RouterConfig(chat_template=self.chat_template)
            except (OptionError, TypeError) as e:
                raise SpecError("chat_template", getattr(e, "message", str(e))) from None
        _check_int(self.replicas, "replicas", minimum=1)
        _check_int(self.disagg_min_prefill_tokens, "disagg_min_prefill_tokens", minimum=0)
        _check_int(self.port, "port", minimum=1, maximum=65535)
        if self.policy not in available_policies():
            raise SpecError("policy", f"must be one of {available_policies()}, got {self.policy!r}")
        if not isinstance(self.policy_options, Mapping):
            raise SpecError("policy_options", f"must be a mapping, got {type(self.policy_options).__name__}")
        object.__setattr__(self, "policy_options", _frozen(self.policy_options))

    def to_dict(self) -> dict:
        return {"replicas": self.replicas, "policy": self.policy, "port": self.port,
                "policy_options": dict(self.policy_options),
                "disagg_min_prefill_tokens": self.disagg_min_prefill_tokens,
                **({"tool_call_parser": self.tool_call_parser} if self.tool_call_parser else {}),
                **({"chat_template": self.chat_template} if self.chat_template is not None else {})}

    @classmethod
    def from_dict(cls, data: Any, path: str = "router") -> "RouterSpec":
        d = _mapping(data, path, ("replicas", "policy", "port", "policy_options", "disagg_min_prefill_tokens",
                                  "tool_call_parser", "chat_template"), "a router field")
        with _under(path):
            return cls(**d)


@dataclass(frozen=True)
class EtcdSpec:
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "/shoal"  # every key of every deployment lives under it

    def __post_init__(self) -> None:
        endpoints = self.endpoints.split(",") if isinstance(self.endpoints, str) else self.endpoints
        if not isinstance(endpoints, (list, tuple)) or not all(isinstance(e, str) for e in endpoints):
            raise SpecError("endpoints", f"must be 'host:port[,host:port]' or a list of them, got {endpoints!r}")
        object.__setattr__(self, "endpoints", tuple(e.strip() for e in endpoints))
        try:
            parse_endpoints(self.endpoints)
        except ValueError as e:
            raise SpecError("endpoints", f"is invalid: {e}") from None
        if not re.match(r"^(/[A-Za-z0-9_.-]+)+$", str(self.prefix)):
            raise SpecError("prefix", f"must look like '/shoal' (absolute, no trailing '/'), got {self.prefix!r}")

    def to_dict(self) -> dict:
        return {"endpoints": list(self.endpoints), "prefix": self.prefix}

    @classmethod
    def from_dict(cls, data: Any, path: str = "etcd") -> "EtcdSpec":
        d = _mapping(data, path, ("endpoints", "prefix"), "an etcd field")
        with _under(path):
            return cls(**d)


_BOUNDS_KEYS = ("min_replicas", "max_replicas", "policy")


@dataclass(frozen=True)
class PoolAutoscaling:
    """A pool's replica bounds and the autoscaling policy that moves it between them.

    In files the policy's knobs sit flat beside the bounds; they are exactly the fields of the
    policy's config dataclass (``cluster/autoscale``), checked by its declaration::

        autoscaling:
          decode:
            min_replicas: 1
            max_replicas: 8
            policy: slo           # static | target (default) | queue | slo
            ttft_s: 2.0           # the slo policy's knobs (docs/autoscaling.md lists every policy's)
            itl_s: 0.15

    Specs from before the policies (``metric`` / ``target`` only) are ``target`` policies.
    """

    max_replicas: int
    min_replicas: int = 1
    policy: str = "target"
    options: Mapping[str, Any] = field(default_factory=dict)  # the policy's knobs

    def __post_init__(self) -> None:
        from shoal.cluster.autoscale import available_policies, check_policy_options

        _check_int(self.min_replicas, "min_replicas", minimum=0)
        _check_int(self.max_replicas, "max_replicas", minimum=max(1, self.min_replicas))
        if self.policy not in available_policies():
            raise SpecError("policy", f"must be one of {available_policies()}, got {self.policy!r}")
        if not isinstance(self.options, Mapping):
            raise SpecError("", f"policy options must be a mapping, got {type(self.options).__name__}")
        for key in self.options:
            if key in _BOUNDS_KEYS:
                raise SpecError(key, "is a bound, not a policy option")
        try:
            options = check_policy_options(self.policy, self.options, "")
        except OptionError as e:
            raise SpecError(e.field or e.where, e.message) from None
        object.__setattr__(self, "options", _frozen(options))

    def to_dict(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas, "policy": self.policy,
                **dict(self.options)}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "PoolAutoscaling":
        if not isinstance(data, Mapping):
            raise SpecError(path, f"must be a mapping, got {type(data).__name__}")
        if "max_replicas" not in data:
            raise SpecError(_join(path, "max_replicas"), "is required")
        bounds = {k: v for k, v in data.items() if k in _BOUNDS_KEYS}
        options = {k: v for k, v in data.items() if k not in _BOUNDS_KEYS}
        with _under(path):
            return cls(**bounds, options=options)


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: a model served by pools of workers behind routers, coordinated through etcd.

    Pools are ``unified`` and/or a ``prefill`` + ``decode`` pair (disaggregated serving needs both).
    All pools use one KV block size: the router hashes prompts with it and prefill hands decode
    whole blocks.
    """

    name: str
    model: str
    pools: Mapping[str, PoolSpec]
    router: RouterSpec = field(default_factory=RouterSpec)
    etcd: EtcdSpec = field(default_factory=EtcdSpec)
    autoscaling: Mapping[str, PoolAutoscaling] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise SpecError("name", "must be a DNS-1123 label (lowercase letters, digits and '-', "
                                    f"at most 63, starting and ending alphanumeric), got {self.name!r}")
        _check_str(self.model, "model")
        self._check_pools()
        for role, auto in dict(self.autoscaling).items():
            path = f"autoscaling.{role}"
            if role not in self.pools:
                raise SpecError(path, f"names no pool; pools are {sorted(self.pools)}")
            if not isinstance(auto, PoolAutoscaling):
                raise SpecError(path, f"must be a PoolAutoscaling, got {auto!r}")
            replicas = self.pools[role].replicas
            if not auto.min_replicas <= replicas <= auto.max_replicas:
                raise SpecError(f"pools.{role}.replicas", f"must be within autoscaling "
                                f"[{auto.min_replicas}, {auto.max_replicas}], got {replicas}")
        object.__setattr__(self, "pools", _frozen(self.pools))
        object.__setattr__(self, "autoscaling", _frozen(self.autoscaling))

    def _check_pools(self) -> None:
        if not isinstance(self.pools, Mapping) or not self.pools:
            raise SpecError("pools", f"must name at least one of {list(POOL_ROLES)}")
        for role, pool in self.pools.items():
            if role not in POOL_ROLES:
                raise SpecError(f"pools.{role}", f"is not a pool role; known: {', '.join(POOL_ROLES)}")
            if not isinstance(pool, PoolSpec):
                raise SpecError(f"pools.{role}", f"must be a PoolSpec, got {pool!r}")
            with _under(f"pools.{role}"):
                pool.engine_config(self.model)  # EngineConfig's checks of the whole, with this model
        if ("prefill" in self.pools) != ("decode" in self.pools):
            have, need = ("prefill", "decode") if "prefill" in self.pools else ("decode", "prefill")
            raise SpecError(f"pools.{need}", f"is required with pools.{have} "
                                             "(disaggregated serving hands KV from prefill to decode)")
        for role in ("prefill", "decode"):
            if role in self.pools and not self.pools[role].engine_option("enable_prefix_caching"):
                raise SpecError(f"pools.{role}.engine.enable_prefix_caching", "must be true: prompts' KV "
                                "blocks are handed over and found by their hashes")
        if "prefill" in self.pools:
            dtypes = {r: self.pools[r].engine_option("dtype") for r in ("prefill", "decode")}
            if dtypes["prefill"] != dtypes["decode"]:
                raise SpecError("pools.decode.engine.dtype", f"must equal pools.prefill's ({dtypes['prefill']!r}, "
                                f"got {dtypes['decode']!r}): KV blocks are copied as raw bytes")
        roles = list(self.pools)
        first = self.pools[roles[0]].engine_option("block_size")
        for role in roles[1:]:
            size = self.pools[role].engine_option("block_size")
            if size != first:
                raise SpecError(f"pools.{role}.engine.block_size", f"must equal pools.{roles[0]}'s "
                                f"({first}): the router and KV transfer use one block size, got {size}")

    @property
    def block_size(self) -> int:
        return next(iter(self.pools.values())).engine_option("block_size")

    # -- conversions ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model,
                "pools": {role: pool.to_dict() for role, pool in self.pools.items()},
                "router": self.router.to_dict(), "etcd": self.etcd.to_dict(),
                "autoscaling": {role: a.to_dict() for role, a in self.autoscaling.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> "DeploymentSpec":
        d = _mapping(data, "", ("name", "model", "pools", "router", "etcd", "autoscaling"), "a deployment field",
                     required=("name", "model", "pools"))
        pools = _mapping(d["pools"], "pools", POOL_ROLES, "a pool role")
        d["pools"] = {role: PoolSpec.from_dict(p, f"pools.{role}") for role, p in pools.items()}
        if "router" in d:
            d["router"] = RouterSpec.from_dict(d["router"])
        if "etcd" in d:
            d["etcd"] = EtcdSpec.from_dict(d["etcd"])
        auto = _mapping(d.get("autoscaling") or {}, "autoscaling", POOL_ROLES, "a pool role")
        d["autoscaling"] = {role: PoolAutoscaling.from_dict(a, f"autoscaling.{role}") for role, a in auto.items()}
        return cls(**d)

    @classmethod
    def from_json(cls, text: str | bytes) -> "DeploymentSpec":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, text: str) -> "DeploymentSpec":
        return cls.from_dict(_yaml().safe_load(text))


def _yaml():
    try:
        import yaml
    except ImportError:
        raise RuntimeError("reading a YAML spec needs PyYAML: pip install pyyaml (or write the spec as .json)") \
            from None
    return yaml


def load_spec(path: str | Path) -> DeploymentSpec:
    """A spec from a ``.yaml`` / ``.yml`` / ``.json`` file; errors name the file and the field."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            return DeploymentSpec.from_yaml(text)
        if path.suffix == ".json":
            return DeploymentSpec.from_json(text)
    except SpecError as e:
        raise SpecError(e.path, f"{e.message} (in {path})") from None
    raise ValueError(f"spec file {path} must end in .yaml, .yml or .json")
