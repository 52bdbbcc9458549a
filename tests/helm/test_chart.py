"""The chart, checked as far as a machine without a Kubernetes API server allows.

For each value set (defaults, disaggregated P/D with TP=2 decode, CPU-only SmolLM2, external etcd,
autoscaling on, monitoring on): ``helm lint --strict`` passes; ``helm template`` renders objects that
validate against the Kubernetes 1.32 schemas (``kubernetes-validate --strict``) and the RayCluster
against KubeRay's CRD schema (closed: an unknown field is refused, as the API server would prune it);
the spec ConfigMap loads with ``cluster/spec.py``; every shoal container command parses with shoal's
own CLI parser; every rayStartParams key is a ``ray start`` option. Bad values files are refused by
``values.schema.json`` with the offending path named.
"""

from __future__ import annotations

import functools
import gzip
import json
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shoal.cluster.cli import build_parser
from shoal.cluster.spec import DeploymentSpec
from tests.helm.helm_support import VALUES, containers, find

K8S_VERSION = "1.32.0"
CRDS = Path(__file__).resolve().parent / "crds"  # KubeRay's, vendored: crds/SOURCE.txt
VALUE_SETS = {"defaults": (), "gpu-disagg": ("gpu-disagg.yaml",), "cpu": ("cpu-smollm2.yaml",),
              "external-etcd": ("external-etcd.yaml",), "autoscaling": ("autoscaling.yaml",),
              "monitoring": ("monitoring.yaml",)}
# Prometheus Operator kinds: their CRDs are not on this machine; checked for shape only.
NO_SCHEMA_HERE = {"ServiceMonitor", "PodMonitor"}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request, helm):
    files = VALUE_SETS[request.param]
    lint = helm.lint(*files)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    return request.param, helm.template(*files)


def closed(schema):
    """The CRD schema with every object that lists its properties refusing others (the API server
    would silently prune them: here a typo must fail)."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A validator of KubeRay's ray.io/v1 ``kind`` (built once: the schema is large)."""
    text = gzip.decompress((CRDS / f"ray.io_{kind.lower()}s.yaml.gz").read_bytes()).decode()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))


def test_every_object_validates(rendered):
    name, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"RayCluster", "Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds, kinds
    for obj in objects:
        where = f"{name}: {obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "RayCluster":
            errors = [f"{list(e.absolute_path)}: {e.message}" for e in crd_validator("RayCluster").iter_errors(obj)]
            assert not errors, f"{where}: " + "; ".join(errors)
        elif obj["kind"] in NO_SCHEMA_HERE:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"], where
        else:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{where}: {e.message} at {list(e.path)}") from None


def test_the_spec_configmap_loads_with_the_spec_module(rendered):
    name, objects = rendered
    spec = DeploymentSpec.from_yaml(find(objects, "ConfigMap", "-spec")["data"]["deploy.yaml"])
    assert spec.name == "demo-shoal"
    roles = set(spec.pools)
    ray = find(objects, "RayCluster")
    assert {g["groupName"] for g in ray["spec"]["workerGroupSpecs"]} == roles
    for group in ray["spec"]["workerGroupSpecs"]:
        pool = spec.pools[group["groupName"]]
        [c] = group["template"]["spec"]["containers"]
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        assert gpus == (pool.tensor_parallel_size if pool.resources_per_rank.gpu else 0), name
        assert group["rayStartParams"]["num-gpus"] == str(gpus)
        assert group["replicas"] == pool.replicas
        # The group's nodes offer what one replica's ranks reserve, its pool's pin among it.
        [offered] = shlex.split(group["rayStartParams"]["resources"])
        assert json.loads(offered) == {k: v * pool.tensor_parallel_size for k, v in pool.resources_per_rank.custom.items()}
        assert pool.resources_per_rank.custom[f"shoal_pool_{group['groupName']}"] == 1
        shm = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "shm"]
        assert shm[0]["emptyDir"]["medium"] == "Memory"
    if name == "gpu-disagg":
        assert spec.pools["decode"].tensor_parallel_size == 2 and spec.pools["prefill"].kv_transfer
        assert spec.pools["decode"].engine["max_num_seqs"] == 512 and spec.pools["prefill"].engine["dtype"] == "bfloat16"
    if name == "external-etcd":
        assert spec.etcd.endpoints == ("https://etcd-0.etcd.infra.svc:2379", "https://etcd-1.etcd.infra.svc:2379")
        assert not [o for o in objects if o["kind"] == "StatefulSet"]
    if name == "autoscaling":
        assert spec.autoscaling["unified"].max_replicas == 6
        assert ray["spec"]["enableInTreeAutoscaling"] is True
        assert find(objects, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 10


def test_every_shoal_command_parses_with_shoals_cli(rendered):
    name, objects = rendered
    seen = set()
    for obj in objects:
        for c in containers(obj):
            command = c.get("command") or []
            if command[:1] == ["shoal"]:
                args = build_parser().parse_args(command[1:])
                seen.add(args.command)
                if args.command == "launch":
                    assert args.routers is False and args.address.startswith("ray://")
    assert seen == {"launch", "router"}, name


@pytest.fixture(scope="module")
def ray_start_options() -> set[str]:
    ray = Path(sys.executable).parent / "ray"
    out = subprocess.run([str(ray), "start", "--help"], capture_output=True, text=True, timeout=60).stdout
    return {word.strip(",").split("=")[0][2:] for word in out.split() if word.startswith("--")}


def test_ray_start_params_are_ray_start_options(rendered, ray_start_options):
    ray = find(rendered[1], "RayCluster")
    for group in [ray["spec"]["headGroupSpec"], *ray["spec"]["workerGroupSpecs"]]:
        assert set(group["rayStartParams"]) <= ray_start_options


def test_pods_run_as_non_root_with_read_only_roots(rendered):
    for obj in rendered[1]:
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]


def test_helm_upgrade_of_the_spec_rolls_launcher_and_routers(helm, tmp_path):
    before = helm.template()
    changed = tmp_path / "policy.yaml"
    changed.write_text("deployment:\n  router:\n    policy: least_load\n")
    after = helm.template(str(changed))
    for suffix in ("-launcher", "-router"):
        old, new = (find(o, "Deployment", suffix)["spec"]["template"]["metadata"]["annotations"]["checksum/spec"]
                    for o in (before, after))
        assert old != new, suffix
    assert find(before, "Deployment", "-launcher")["spec"]["strategy"]["type"] == "Recreate"


def test_the_tool_call_parser_reaches_the_spec(helm, tmp_path):
    values = tmp_path / "tools.yaml"
    values.write_text("deployment:\n  router:\n    tool_call_parser: hermes\n")
    spec = DeploymentSpec.from_yaml(find(helm.template(str(values)), "ConfigMap", "-spec")["data"]["deploy.yaml"])
    assert spec.router.tool_call_parser == "hermes"
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployment:\n  router:\n    tool_call_parser: qwen\n")
    out = helm.run("template", "demo", str(Path(__file__).resolve().parents[2] / "helm" / "shoal"), "-f", str(bad))
    assert out.returncode != 0 and "tool_call_parser" in out.stderr, out.stderr


def test_the_chat_template_reaches_the_spec(helm, tmp_path):
    values = tmp_path / "template.yaml"
    values.write_text("deployment:\n  router:\n    chat_template: \"{% for m in messages %}{{ m.content }}{% endfor %}\"\n")
    spec = DeploymentSpec.from_yaml(find(helm.template(str(values)), "ConfigMap", "-spec")["data"]["deploy.yaml"])
    assert spec.router.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize("bad", sorted(p.name for p in (VALUES / "bad").glob("*.yaml")))
def test_bad_values_are_refused_naming_the_path(helm, bad):
    path = VALUES / "bad" / bad
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    out = helm.run("template", "demo", str(Path(__file__).resolve().parents[2] / "helm" / "shoal"), "-f", str(path))
    assert out.returncode != 0, f"{bad} was accepted"
    assert f"/{expect}" in out.stderr, out.stderr


def test_an_external_etcds_tls_secret_reaches_every_shoal_process(helm):
    """etcd.external.tls: the Secret is mounted in every pod that runs shoal (launcher, routers, Ray head
    and workers: the worker actors connect to etcd too), and SHOAL_ETCD_* name its files."""
    objects = helm.template("external-etcd.yaml")
    pods = [o for o in objects if o["kind"] in ("Deployment", "RayCluster")]
    checked = []
    for obj in pods:
        templates = ([obj["spec"]["template"]] if obj["kind"] == "Deployment" else
                     [obj["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in obj["spec"]["workerGroupSpecs"]])
        for template in templates:
            [volume] = [v for v in template["spec"]["volumes"] if v["name"] == "etcd-tls"]
            assert volume["secret"]["secretName"] == "etcd-client-tls"
            for c in template["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["SHOAL_ETCD_CACERT"] == "/var/run/shoal/etcd-tls/ca.crt"
                assert env["SHOAL_ETCD_CERT"] == "/var/run/shoal/etcd-tls/tls.crt"
                assert env["SHOAL_ETCD_KEY"] == "/var/run/shoal/etcd-tls/tls.key"
                assert {"name": "etcd-tls", "mountPath": "/var/run/shoal/etcd-tls", "readOnly": True} in c["volumeMounts"]
                checked.append(c["name"])
    assert {"launcher", "router", "ray-head", "ray-worker"} <= set(checked), checked
    # No TLS Secret: no volume, no variables.
    for obj in helm.template():
        for c in containers(obj):
            assert not [e for e in c.get("env", []) if e["name"].startswith("SHOAL_ETCD_")], c["name"]


def test_an_etcd_tls_secret_with_a_plain_endpoint_is_refused(helm, tmp_path):
    values = tmp_path / "tls-plain.yaml"
    values.write_text("etcd:\n  mode: external\n  external:\n    endpoints: [etcd:2379]\n"
                      "    tls: {secretName: etcd-client-tls}\n")
    out = helm.run("template", "demo", str(Path(__file__).resolve().parents[2] / "helm" / "shoal"), "-f", str(values))
    assert out.returncode != 0
    assert "every etcd.external.endpoints entry must be https://host:port" in out.stderr, out.stderr


def test_ray_start_resources_are_given_through_the_pools_not_the_raw_params(helm, tmp_path):
    values = tmp_path / "raw-resources.yaml"
    values.write_text("ray:\n  workerRayStartParams:\n    resources: '\"{\\\"x\\\": 1}\"'\n")
    out = helm.run("template", "demo", str(Path(__file__).resolve().parents[2] / "helm" / "shoal"), "-f", str(values))
    assert out.returncode != 0
    assert "resources_per_rank.custom" in out.stderr, out.stderr
