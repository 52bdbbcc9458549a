"""The deployment spec: the example loads, round trips, and every bad field is named by its path."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.cluster.spec import (DeploymentSpec, EtcdSpec, PoolAutoscaling, PoolSpec, Resources, RouterSpec,
                                SpecError, check_kv_transfer, engine_fields, kv_transfer_fields, load_spec,
                                parse_memory)
from shoal.workers.config import EngineConfig
from shoal.workers.disagg import DisaggConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "deploy.yaml"


@pytest.fixture(scope="module")
def example() -> DeploymentSpec:
    return load_spec(EXAMPLE)


def test_the_example_loads_with_its_values(example):
    assert example.name == "smollm2-demo" and example.model == "smollm2-135m"
    assert list(example.pools) == ["prefill", "decode"]
    decode = example.pools["decode"]
    assert decode.replicas == 2 and decode.tensor_parallel_size == 1
    assert decode.resources_per_rank == Resources(cpu=4, gpu=1, memory=16 * 2**30)
    assert decode.engine["kv_events"] is True and decode.engine_option("max_model_len") is None
    assert example.block_size == 16
    assert example.router == RouterSpec(replicas=2, policy="prefix_aware", port=8000)
    assert example.etcd.endpoints == ("etcd-0.etcd:2379", "etcd-1.etcd:2379", "etcd-2.etcd:2379")
    assert example.autoscaling == {"decode": PoolAutoscaling(min_replicas=1, max_replicas=8, policy="slo", options={"ttft_s": 2.0, "itl_s": 0.15})}


def test_round_trips_through_dict_json_and_yaml(example, tmp_path):
    assert DeploymentSpec.from_dict(example.to_dict()) == example
    assert DeploymentSpec.from_json(example.to_json()) == example
    json.dumps(example.to_dict())  # plain data only
    path = tmp_path / "spec.json"
    path.write_text(example.to_json())
    assert load_spec(path) == example
    import yaml

    assert DeploymentSpec.from_yaml(yaml.safe_dump(example.to_dict())) == example


def test_the_tool_call_parser_is_the_spec_s_and_reaches_every_router():
    from shoal.cluster.cli import build_parser
    from shoal.cluster.etcd_router import EtcdRouter

    spec = DeploymentSpec.from_dict({"name": "t", "model": "m", "pools": {"unified": {}},
                                     "router": {"tool_call_parser": "llama3_json"}})
    assert spec.router.tool_call_parser == "llama3_json" and DeploymentSpec.from_dict(spec.to_dict()) == spec
    assert EtcdRouter(spec, client=None).router_config().tool_call_parser == "llama3_json"
    assert "tool_call_parser" not in RouterSpec().to_dict()  # unset: specs written before it stay the same
    # `shoal router` takes it from the spec, like placement: one deployment, one format
    with pytest.raises(SystemExit):
        build_parser().parse_args(["router", "--etcd", "h:1", "--deployment", "t", "--tool-call-parser", "hermes"])


def test_a_minimal_spec_takes_the_defaults():
    spec = DeploymentSpec.from_dict({"name": "tiny", "model": "m", "pools": {"unified": {}}})
    assert spec.pools["unified"] == PoolSpec()
    assert spec.router == RouterSpec() and spec.etcd == EtcdSpec(("127.0.0.1:2379",), "/shoal")
    assert spec.autoscaling == {} and spec.block_size == engine_fields()["block_size"]
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec


def _set(path: str, value):
    """A mutation of the example's dict: set (or with value DELETE, drop) the dotted ``path``."""
    def mutate(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
    return mutate


DELETE = object()

BAD = [
    (_set("pools.decode.replicas", -1), "pools.decode.replicas must be >= 0, got -1"),
    (_set("pools.decode.replicas", "two"), "pools.decode.replicas must be an integer, got 'two'"),
    (_set("pools.decode.replicas", True), "pools.decode.replicas must be an integer, got True"),
    (_set("pools.prefill.tensor_parallel_size", 0), "pools.prefill.tensor_parallel_size must be >= 1, got 0"),
    (_set("pools.decode.engine.blok_size", 16),
     "pools.decode.engine.blok_size is not an EngineConfig field (did you mean 'block_size'?)"),
    (_set("pools.decode.engine.model", "x"), "pools.decode.engine.model is set once, by the top-level model"),
    (_set("pools.decode.engine.tensor_parallel_size", 2),
     "pools.decode.engine.tensor_parallel_size is set once, by the pool's tensor_parallel_size"),
    (_set("pools.decode.engine.block_size", 3), "pools.decode.engine.block_size must be one of 1, 2, 4, 8, 16, 32, "
                                                "64, 128, got 3"),
    (_set("pools.decode.engine.max_num_seqs", "many"), "pools.decode.engine.max_num_seqs must be an integer or "
                                                       "null, got 'many'"),
    (_set("pools.decode.engine.gpu_memory_utilization", 1.5),
     "pools.decode.engine.gpu_memory_utilization must be in (0, 1], got 1.5"),
    (_set("pools.decode.engine.device", "tpu"),
     "pools.decode.engine.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (_set("pools.decode.engine.enable_prefix_caching", "yes"),
     "pools.decode.engine.enable_prefix_caching must be true or false, got 'yes'"),
    (_set("pools.decode.engine.max_model_len", 1), "pools.decode.engine.max_model_len must be >= 2, got 1"),
    (_set("pools.decode.engine", []), "pools.decode.engine must be a mapping, got list"),
    (_set("pools.decode.engine.block_size", 32), "pools.decode.engine.block_size must equal pools.prefill's (16)"),
    (_set("pools.decode.resources_per_rank.GPU", -1), "pools.decode.resources_per_rank.GPU must be >= 0.0"),
    (_set("pools.decode.resources_per_rank.gpu", 1), "pools.decode.resources_per_rank.gpu is not a resources"),
    (_set("pools.decode.resources_per_rank.memory", "lots"), "pools.decode.resources_per_rank.memory must be"),
    (_set("pools.decode.resources_per_rank.custom", {"GPU": 1}),
     "pools.decode.resources_per_rank.custom 'GPU' is not a custom resource name"),
    (_set("pools.decode.resources_per_rank.custom", {"slot": -1}),
     "pools.decode.resources_per_rank.custom.slot must be >= 0.0"),
    (_set("pools.decode.resources_per_rank.custom", [1]), "pools.decode.resources_per_rank.custom must be a mapping"),
    (_set("pools.decode.replica", 1), "pools.decode.replica is not a pool field (did you mean 'replicas'?)"),
    (_set("pools.prefill", DELETE), "pools.prefill is required with pools.decode"),
    (_set("pools.decode.engine.enable_prefix_caching", False),
     "pools.decode.engine.enable_prefix_caching must be true"),
    (_set("pools.decode.engine.dtype", "float32"), "pools.decode.engine.dtype must equal pools.prefill's"),
    (_set("router.disagg_min_prefill_tokens", -1), "router.disagg_min_prefill_tokens must be >= 0, got -1"),
    (_set("pools.mixed", {}), "pools.mixed is not a pool role; known: unified, prefill, decode"),
    (_set("pools", {}), "pools must name at least one of"),
    (_set("pools", []), "pools must be a mapping, got list"),
    (_set("name", "Bad_Name"), "name must be a DNS-1123 label"),
    (_set("model", ""), "model must be a non-empty string"),
    (_set("model", DELETE), "model is required"),
    (_set("naem", "x"), "naem is not a deployment field (did you mean 'name'?)"),
    (_set("router.port", 70000), "router.port must be <= 65535, got 70000"),
    (_set("router.replicas", 0), "router.replicas must be >= 1, got 0"),
    (_set("router.policy", "random"), "router.policy must be one of ['least_load', 'prefix_aware'"),
    (_set("router.tool_call_parser", "qwen"), "router.tool_call_parser must be one of 'hermes', 'llama3_json', "
                                              "got 'qwen'"),
    (_set("etcd.endpoints", "etcd-0"), "etcd.endpoints is invalid: etcd endpoint 'etcd-0' must be host:port"),
    (_set("etcd.endpoints", 2379), "etcd.endpoints must be 'host:port[,host:port]' or a list"),
    (_set("etcd.prefix", "shoal/"), "etcd.prefix must look like '/shoal'"),
    (_set("autoscaling.decode.min_replicas", 3), "pools.decode.replicas must be within autoscaling [3, 8], got 2"),
    (_set("autoscaling.decode.max_replicas", DELETE), "autoscaling.decode.max_replicas is required"),
    (_set("autoscaling.decode.max_replicas", 0), "autoscaling.decode.max_replicas must be >= 1, got 0"),
    (_set("autoscaling.decode.policy", "magic"), "autoscaling.decode.policy must be one of ['queue', 'slo'"),
    (_set("autoscaling.decode.ttft_s", 0), "autoscaling.decode.ttft_s must be > 0, got 0"),
    (_set("autoscaling.decode.ttft", 1.0), "autoscaling.decode.ttft is not an option of the 'slo' policy "
                                           "(did you mean 'ttft_s'?)"),
    (_set("autoscaling.unified", {"max_replicas": 2}), "autoscaling.unified names no pool"),
    (_set("pools.prefill.kv_transfer.foo", 1), "pools.prefill.kv_transfer.foo is not a kv_transfer (DisaggConfig) "
                                               "field; known: export_ttl_s, link_timeout_s"),
    (_set("pools.prefill.kv_transfer.export_ttl", 5), "pools.prefill.kv_transfer.export_ttl is not a kv_transfer "
                                                      "(DisaggConfig) field (did you mean 'export_ttl_s'?)"),
    (_set("pools.prefill.kv_transfer.export_ttl_s", 0), "pools.prefill.kv_transfer.export_ttl_s must be > 0, got 0"),
    (_set("pools.decode.kv_transfer.link_timeout_s", -1.5),
     "pools.decode.kv_transfer.link_timeout_s must be > 0, got -1.5"),
    (_set("pools.decode.kv_transfer.max_links_per_peer", 0),
     "pools.decode.kv_transfer.max_links_per_peer must be >= 1, got 0"),
    (_set("pools.decode.kv_transfer.layers_per_chunk", -1), "pools.decode.kv_transfer.layers_per_chunk must be >= 0"),
    (_set("pools.prefill.kv_transfer.max_links", 1.5),
     "pools.prefill.kv_transfer.max_links must be an integer, got 1.5"),
    (_set("pools.prefill.kv_transfer.link_idle_s", "5m"),
     "pools.prefill.kv_transfer.link_idle_s must be a number, got '5m'"),
    (_set("pools.prefill.kv_transfer.rpc_timeout_s", True),
     "pools.prefill.kv_transfer.rpc_timeout_s must be a number, got True"),
    (_set("pools.decode.kv_transfer", [1]), "pools.decode.kv_transfer must be a mapping, got list"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_field_is_named_by_its_path(example, mutate, message):
    data = copy.deepcopy(example.to_dict())
    mutate(data)
    with pytest.raises(SpecError) as err:
        DeploymentSpec.from_dict(data)
    assert str(err.value).startswith(message), str(err.value)
    assert isinstance(err.value, ValueError)


def test_direct_construction_validates_and_is_frozen():
    with pytest.raises(SpecError, match=r"^replicas must be >= 0, got -1$"):
        PoolSpec(replicas=-1)
    with pytest.raises(SpecError, match="max_replicas must be >= 3"):
        PoolAutoscaling(min_replicas=3, max_replicas=2)
    pool = PoolSpec(engine={"block_size": 32})
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.replicas = 3
    with pytest.raises(TypeError):
        pool.engine["block_size"] = 8  # the engine options are read-only too
    with pytest.raises(SpecError, match="pools.unified must be a PoolSpec"):
        DeploymentSpec(name="x", model="m", pools={"unified": {"replicas": 1}})


KV = {"export_ttl_s": 12.5, "link_timeout_s": 4, "layers_per_chunk": 0}


def test_kv_transfer_round_trips_and_builds_the_real_disagg_config(example, tmp_path):
    data = copy.deepcopy(example.to_dict())
    data["pools"]["prefill"]["kv_transfer"] = dict(KV)
    data["pools"]["decode"]["kv_transfer"] = {"max_links_per_peer": 4}
    spec = DeploymentSpec.from_dict(data)
    assert spec.pools["prefill"].kv_transfer == KV and spec.pools["decode"].kv_transfer == {"max_links_per_peer": 4}
    assert spec.pools["prefill"].to_dict()["kv_transfer"] == KV
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec
    assert DeploymentSpec.from_json(spec.to_json()) == spec
    import yaml

    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert load_spec(path) == spec
    assert spec.pools["prefill"].disagg_config() == DisaggConfig(export_ttl_s=12.5, link_timeout_s=4,
                                                                  layers_per_chunk=0)
    unset = copy.deepcopy(example.to_dict())
    del unset["pools"]["decode"]["kv_transfer"]
    decode = DeploymentSpec.from_dict(unset).pools["decode"]
    assert decode.kv_transfer == {} and decode.disagg_config() == DisaggConfig()
    with pytest.raises(TypeError):
        spec.pools["prefill"].kv_transfer["export_ttl_s"] = 1.0  # read-only, like engine


def test_kv_transfer_checks_are_disagg_configs_own():
    """The spec checks kv_transfer with DisaggConfig itself: its fields, its defaults, its words,
    with the field's path in front."""
    assert dict(kv_transfer_fields()) == {f.name: f.default for f in dataclasses.fields(DisaggConfig)}
    for name, default in kv_transfer_fields().items():
        bad = -1 if isinstance(default, int) else -0.5
        with pytest.raises(ValueError) as real:
            DisaggConfig(**{name: bad})
        with pytest.raises(SpecError) as ours:
            check_kv_transfer({name: bad})
        assert ours.value.path == f"kv_transfer.{name}"
        assert str(real.value) == f"DisaggConfig.{name} {ours.value.message}"
    assert check_kv_transfer({"max_links": 1, "link_idle_s": 0.5}) == {"max_links": 1, "link_idle_s": 0.5}


def test_memory_quantities():
    assert parse_memory("16Gi") == 16 * 2**30 and parse_memory("512Mi") == 512 * 2**20
    assert parse_memory("8G") == 8 * 10**9 and parse_memory("1.5Ki") == 1536 and parse_memory(1024) == 1024
    for bad in ("16 GiB", "-1", -1, 1.5):
        with pytest.raises(SpecError, match="memory"):
            parse_memory(bad)


def test_engine_fields_are_engine_configs():
    real = {f.name: f.default if f.default is not dataclasses.MISSING else ...
            for f in dataclasses.fields(EngineConfig)}
    assert dict(engine_fields()) == real


def test_engine_config_builds_the_real_config(example):
    config = example.pools["decode"].engine_config(example.model)
    assert isinstance(config, EngineConfig)
    assert (config.model, config.block_size, config.max_num_seqs, config.kv_events) == ("smollm2-135m", 16, 256, True)
    pool = PoolSpec(tensor_parallel_size=2, engine={"kernels": "triton"})
    assert pool.engine_config("m") == EngineConfig(model="m", tensor_parallel_size=2, kernels="triton")
    assert pool.engine_option("tensor_parallel_size") == 2
    with pytest.raises(SpecError, match=r"^engine.block_size must be one of 1, 2, 4"):
        PoolSpec(engine={"block_size": 3})  # values are checked on load, by EngineConfig's declaration


def test_load_spec_names_the_file_and_refuses_other_suffixes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: m\npools: {decode: {replicas: 1}}\n")
    with pytest.raises(SpecError, match=r"pools.prefill is required .*\(in .*bad.yaml\)"):
        load_spec(bad)
    toml = tmp_path / "spec.toml"
    toml.write_text("")
    with pytest.raises(ValueError, match="must end in .yaml, .yml or .json"):
        load_spec(toml)


def test_the_spec_module_does_not_import_torch():
    code = ("import sys, shoal.cluster.spec as s; s.load_spec(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(EXAMPLE)], check=True, timeout=60)


@pytest.mark.parametrize("path", sorted(EXAMPLE.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_loads(path):
    spec = load_spec(path)
    assert spec.pools and spec.to_dict() == DeploymentSpec.from_dict(spec.to_dict()).to_dict()
