"""Every ``EngineConfig`` and ``DisaggConfig`` field is reachable from each place a user sets it —
``shoal serve``, ``shoal generate``, the benches, the deployment spec — and round-trips through a
worker process's start arguments (serve's args -> ``worker_flags`` -> ``python -m shoal.workers.server``'s
parser -> the same config). The values come from the declarations, so a new field is covered at once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest

from shoal.cluster.cli import build_parser
from shoal.cluster.flags import engine_config, engine_kwargs, router_config, worker_flags
from shoal.cluster.spec import DeploymentSpec, SpecError
from shoal.workers.config import DEFAULT_MODEL, EngineConfig
from shoal.workers.disagg_config import DisaggConfig
from shoal.workers.options import (OptionError, OptionInfo, describe, from_mapping, from_namespace, option,
                                   to_argv, validate)
from shoal.router.config import RouterConfig
from shoal.workers.server import build_parser as worker_parser

# Values a declaration alone cannot invent (a custom check); everything else is derived from it.
SPECIAL = {"device": "cuda:1", "model": "/models/some-checkpoint", "tokenizer": "/models/some-tokenizer",
           "served_model_name": "my-model", "placement": "least_load", "api_key": "sk-test",
           "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def non_default(info: OptionInfo) -> Any:
    """A valid value of the option other than its default (and other than its flag's default)."""
    taken = (info.default, info.cli_default)
    if info.name in SPECIAL:
        return SPECIAL[info.name]
    if info.choices is not None:
        return next(c for c in info.choices if c not in taken)
    if info.type == "bool":
        return not info.default
    if info.type == "bool | None":  # unset means auto; False is valid beside every other value
        return False if info.default is None else None
    if info.type == "list[str]":
        return ("https://a.example", "https://b.example")
    base = info.type.removesuffix(" | None")
    low = info.minimum if info.minimum is not None else info.exclusive_minimum
    start = info.default if info.default is not None else (low or 0)
    if base == "int":  # above the default, else the bottom of the range
        return next(v for v in (max(start, low or 0) + 2, low or 0)
                    if v != info.default and (info.maximum is None or v <= info.maximum))
    if base == "float":  # halfway to the maximum, or above the default
        return (start + info.maximum) / 2 if info.maximum is not None else start * 1.5 + 1
    raise AssertionError(f"no non-default value for {info.name} ({info.type}); add one to SPECIAL")


ENGINE = {i.name: non_default(i) for i in describe(EngineConfig)}
DISAGG = {i.name: non_default(i) for i in describe(DisaggConfig)}


def test_the_derived_values_are_valid_and_not_defaults():
    assert set(ENGINE) == {f.name for f in dataclasses.fields(EngineConfig)}  # every field declared
    assert set(DISAGG) == {f.name for f in dataclasses.fields(DisaggConfig)}
    for cls, values in ((EngineConfig, ENGINE), (DisaggConfig, DISAGG)):
        for name, value in values.items():
            cls(**{**({"model": "m"} if cls is EngineConfig else {}), name: value})
            assert value != getattr(cls, name, None), name


def _one(name: str, value: Any) -> EngineConfig:
    return EngineConfig(**{"model": DEFAULT_MODEL, name: value})


@pytest.mark.parametrize("name", list(ENGINE))
def test_every_engine_field_is_set_by_serve_and_round_trips_to_the_worker(name):
    want = _one(name, ENGINE[name])
    args = build_parser().parse_args(["serve", *to_argv(want)])
    assert engine_config(args) == want
    flags = worker_flags(args)  # what shoal serve starts each worker process with
    assert from_namespace(EngineConfig, worker_parser().parse_args(["--port", "0", *flags])) == want


@pytest.mark.parametrize("name", list(ENGINE))
def test_every_engine_field_is_set_by_generate_and_the_benches(name):
    value = ENGINE[name]
    argv = to_argv(_one(name, value))
    for prefix in (["generate", "hello"], ["bench", "throughput"], ["bench", "latency"]):
        args = build_parser().parse_args([*prefix, *argv])
        assert getattr(engine_config(args), name) == value, prefix
        if name != "model":
            assert engine_kwargs(args)[name] == value  # what LLM(args.model, **engine_kwargs(args)) gets


@pytest.mark.parametrize("name", list(ENGINE))
def test_every_engine_field_is_set_by_the_deployment_spec(name):
    value = ENGINE[name]
    pool: dict[str, Any] = {"replicas": 1}
    model = value if name == "model" else "m"
    if name == "tensor_parallel_size":  # a pool's ranks are the pool's, not its engine's
        pool["tensor_parallel_size"] = value
    elif name != "model":
        pool["engine"] = {name: value}
    spec = DeploymentSpec.from_dict({"name": "d", "model": model, "pools": {"unified": pool}})
    assert spec.pools["unified"].engine_config(spec.model) == EngineConfig(**{"model": "m", name: value})
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("name", list(DISAGG))
def test_every_kv_transfer_field_is_set_by_serve_spec_and_round_trips(name):
    want = DisaggConfig(**{name: DISAGG[name]})
    argv = to_argv(want)
    assert len(argv) == 2 and argv[0].startswith("--kv-")
    args = build_parser().parse_args(["serve", *argv])
    assert from_namespace(DisaggConfig, args) == want
    worker = worker_parser().parse_args(["--port", "0", *worker_flags(args)])
    assert from_namespace(DisaggConfig, worker) == want
    spec = DeploymentSpec.from_dict({"name": "d", "model": "m",
                                     "pools": {"prefill": {"kv_transfer": {name: DISAGG[name]}}, "decode": {}}})
    assert spec.pools["prefill"].disagg_config() == want


ROUTER = {i.name: non_default(i) for i in describe(RouterConfig) if i.flags}


def test_every_router_field_but_its_mapping_has_a_serve_flag():
    assert set(ROUTER) == {f.name for f in dataclasses.fields(RouterConfig)} - {"placement_options"}


@pytest.mark.parametrize("name", list(ROUTER))
def test_every_router_field_is_set_by_serve(name):
    value = ROUTER[name]
    argv = to_argv(RouterConfig(**{name: value}))
    config = router_config(build_parser().parse_args(["serve", *argv]))
    assert getattr(config, name) == value
    for other in ROUTER.keys() - {name, "served_model_name"}:
        assert getattr(config, other) == getattr(RouterConfig(), other), other


def test_the_router_flags_serve_had_keep_their_spellings():
    args = build_parser().parse_args(["serve", "--model", "m", "--block-size", "32", "--max-concurrent-requests", "3",
                                      "--max-waiting-requests", "0", "--disagg-min-prefill-tokens", "7"])
    config = router_config(args)
    assert (config.served_model_name, config.placement, dict(config.placement_options)) == \
        ("m", "prefix_aware", {"block_size": 32})  # the engine's block size: the router hashes as it does
    assert (config.max_concurrent_requests, config.max_waiting_requests, config.disagg_min_prefill_tokens) == (3, 0, 7)
    config = router_config(build_parser().parse_args(["serve", "--policy", "round_robin", "--served-model-name", "x"]))
    assert (config.placement, dict(config.placement_options), config.served_model_name) == ("round_robin", {}, "x")
    with pytest.raises(OptionError, match=r"^--max-json-depth must be in \[1, 256\], got 0$"):
        router_config(build_parser().parse_args(["serve", "--max-json-depth", "0"]))
    with pytest.raises(OptionError, match=r"^RouterConfig.api_key must be a non-empty string or null, got <redacted>$"):
        RouterConfig(api_key="")


def test_the_spellings_users_know_keep_working():
    parse = build_parser().parse_args
    args = parse(["serve", "--no-prefix-caching", "-tp", "2", "--no-chunked-prefill", "--no-cuda-graphs",
                  "--kernels", "triton", "--scheduling-policy", "priority", "--kv-events",
                  "--kv-export-ttl", "7.5", "--kv-link-timeout", "3", "--kv-layers-per-chunk", "0"])
    assert engine_config(args) == EngineConfig(
        model="smollm2-135m", enable_prefix_caching=False, tensor_parallel_size=2, enable_chunked_prefill=False,
        cuda_graphs=False, kernels="triton", scheduling_policy="priority", kv_events=True)
    assert from_namespace(DisaggConfig, args) == DisaggConfig(export_ttl_s=7.5, link_timeout_s=3.0,
                                                              layers_per_chunk=0)
    assert engine_config(parse(["serve"])) == EngineConfig(model="smollm2-135m")  # the CLI's default model
    assert worker_flags(parse(["serve"])) == ["--model", "smollm2-135m"]  # defaults are not repeated


@pytest.mark.parametrize("argv,message", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1, got 0"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1], got 1.5"),
    (["--device", "tpu"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["-tp", "0"], "--tensor-parallel-size must be >= 1, got 0"),
    (["--kv-max-links", "0"], "--kv-max-links must be >= 1, got 0"),
])
def test_a_bad_flag_value_is_refused_naming_the_flag(argv, message):
    with pytest.raises(OptionError) as err:
        worker_flags(build_parser().parse_args(["serve", *argv]))
    assert str(err.value) == message


def test_construction_errors_name_the_class_and_field():
    with pytest.raises(ValueError, match=r"^EngineConfig.block_size must be one of 1, 2, 4, 8, 16, 32, 64, 128, "
                                         r"got 3$"):
        EngineConfig(model="m", block_size=3)
    with pytest.raises(ValueError, match=r"^EngineConfig.max_model_len must be an integer or null, got 2.5$"):
        EngineConfig(model="m", max_model_len=2.5)
    with pytest.raises(ValueError, match=r"^DisaggConfig.export_ttl_s must be > 0, got 0$"):
        DisaggConfig(export_ttl_s=0)


# -- the declaration machinery on a config of its own --------------------------------------------

@dataclasses.dataclass(frozen=True)
class Knobs:
    name: str = option(help="required")
    size: int | None = option(None, "a size", minimum=1, maximum=8)
    tags: tuple[str, ...] = option(("a",), "tags")
    verbose: bool = option(False, "talk more", flag="--loud")
    secret: str | None = option(None, "a key", secret=True)
    limit: int | None = option(4, "a limit; None: none")
    extra: dict = option(default_factory=dict, help="free-form", cli=False)

    def __post_init__(self) -> None:
        validate(self)


def test_describe_lists_each_option_with_its_limits():
    info = {i.name: i for i in describe(Knobs)}
    assert info["size"].type == "int | None" and info["size"].limits == "in [1, 8]"
    assert info["name"].required and info["name"].flags == ("--name",)
    assert info["verbose"].flags == ("--loud", "--no-loud") and info["extra"].flags == ()
    assert info["tags"].type == "list[str]" and info["extra"].type == "mapping"
    info_e = {i.name: i for i in describe(EngineConfig)}
    assert info_e["model"].cli_default == "smollm2-135m" and info_e["tensor_parallel_size"].flags[-1] == "-tp"
    assert all(i.help for i in describe(EngineConfig) + describe(DisaggConfig))


def test_argv_round_trip_and_mapping_errors():
    import argparse

    parser = argparse.ArgumentParser()
    from shoal.workers.options import add_arguments

    add_arguments(parser, Knobs)
    k = Knobs(name="x", size=3, tags=("b", "c"), verbose=True, secret="s3")
    assert from_namespace(Knobs, parser.parse_args(to_argv(k))) == k
    with pytest.raises(ValueError, match="already has an argument"):
        add_arguments(parser, Knobs)
    with pytest.raises(OptionError, match=r"^knobs.sise is not a Knobs field \(did you mean 'size'\?\)"):
        from_mapping(Knobs, {"name": "x", "sise": 2}, "knobs")
    with pytest.raises(OptionError, match=r"^knobs.size must be in \[1, 8\], got 9$"):
        from_mapping(Knobs, {"name": "x", "size": 9}, "knobs")
    with pytest.raises(OptionError, match=r"^knobs.secret must be a non-empty string or null, got <redacted>$"):
        from_mapping(Knobs, {"name": "x", "secret": 12345}, "knobs")
    assert from_mapping(Knobs, {"tags": ["d"], "extra": {"a": 1}}, "knobs", name="x") == \
        Knobs(name="x", tags=("d",), extra={"a": 1})
    assert to_argv(Knobs(name="x")) == ["--name", "x"]
    with pytest.raises(ValueError, match=r"Knobs.limit = None has no flag"):
        to_argv(Knobs(name="x", limit=None))


def test_the_contract_layer_imports_with_torch_blocked():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, Block())
from shoal.workers.config import EngineConfig
from shoal.workers.disagg_config import DisaggConfig
from shoal.workers.options import describe
import shoal.cluster.cli, shoal.cluster.flags, shoal.cluster.spec
args = shoal.cluster.cli.build_parser().parse_args(["serve", "-tp", "2"])
assert shoal.cluster.flags.worker_flags(args) == ["--model", "smollm2-135m", "--tensor-parallel-size", "2"]
assert describe(EngineConfig) and DisaggConfig() and "torch" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
