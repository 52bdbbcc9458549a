"""The Helm chart's engine values and its ``values.schema.json``, generated from the option declarations.

``helm/shoal/values.yaml`` is written by hand but for one block between two marker lines: the
``deployment.engine`` defaults, one key per ``EngineConfig`` field (but those the spec sets elsewhere),
each with its help and limits as a comment; the chart README's engine table likewise. ``values.schema.json`` is generated whole: the engine and
``kv_transfer`` keys from ``EngineConfig`` / ``DisaggConfig``, the rest from the small tree below, so
helm refuses a bad value naming its path before anything is rendered.

    python -m shoal.cluster.helm_values          # rewrite the generated files
    python -m shoal.cluster.helm_values --check  # exit 1 when one is out of date (tests, CI)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shoal.cluster.autoscale import available_policies, policy_options
from shoal.router.tools import available_tool_parsers
from shoal.cluster.spec import POOL_ROLES
from shoal.workers.config import EngineConfig
from shoal.workers.disagg_config import DisaggConfig
from shoal.workers.options import OptionInfo, describe

CHART = Path(__file__).resolve().parents[1] / "helm" / "shoal"
BEGIN = "  # -- BEGIN GENERATED engine (python -m shoal.cluster.helm_values) --"
END = "  # -- END GENERATED engine --"
README_BEGIN = "<!-- BEGIN GENERATED engine (python -m shoal.cluster.helm_values) -->"
README_END = "<!-- END GENERATED engine -->"
SPEC_SETS = ("model", "tensor_parallel_size")  # the spec sets these once, not per pool engine
TP_SIZES = (1, 2, 4, 8, 16, 32, 64)  # GPUs of one pod: a power of two


def engine_options() -> tuple[OptionInfo, ...]:
    return tuple(o for o in describe(EngineConfig) if o.name not in SPEC_SETS)


# -- values.yaml ------------------------------------------------------------------------------------

def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def engine_block() -> str:
    """The lines between the markers: ``    <key>: <default>  # <help> (<limits>)``."""
    lines = []
    for o in engine_options():
        note = o.help + (f" ({o.limits})" if o.limits else "")
        lines.append(f"    # {note}")
        lines.append(f"    {o.name}: {_yaml_scalar(o.default)}")
    return "\n".join(lines)


def engine_table() -> str:
    """The README's rows for ``deployment.engine.<key>`` (also valid under ``pools.<role>.engine``)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for o in engine_options():
        note = o.help + (f" ({o.limits})" if o.limits else "")
        rows.append(f"| `deployment.engine.{o.name}` | `{_yaml_scalar(o.default)}` | {note.replace('|', '/')} |")
    return "\n".join(rows)


def _replace_between(text: str, begin: str, end: str, body: str, what: str) -> str:
    head, sep, rest = text.partition(begin + "\n")
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"{what} must hold the marker lines {begin!r} and {end!r}")
    return f"{head}{begin}\n{body}\n{end}{tail}"


def render_values(text: str) -> str:
    """``text`` (values.yaml) with its generated block replaced."""
    return _replace_between(text, BEGIN, END, engine_block(), "values.yaml")


def render_readme(text: str) -> str:
    """``text`` (the chart's README.md) with its generated engine table replaced."""
    return _replace_between(text, README_BEGIN, README_END, engine_table(), "README.md")


# -- values.schema.json -----------------------------------------------------------------------------

_JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string", "mapping": "object"}


def option_schema(o: OptionInfo) -> dict:
    """One option as JSON Schema: type (null when optional), enum or bounds, the help as description."""
    base = o.type.removesuffix(" | None")
    if base.startswith("list["):
        schema: dict = {"type": "array", "items": {"type": _JSON_TYPES[base[5:-1]]}}
    else:
        schema = {"type": _JSON_TYPES[base]}
        if base == "str":
            schema["minLength"] = 1
    if o.type.endswith(" | None"):
        schema["type"] = [schema["type"], "null"]
    if o.choices is not None:
        schema["enum"] = list(o.choices) + ([None] if o.type.endswith(" | None") else [])
    for key, value in (("minimum", o.minimum), ("exclusiveMinimum", o.exclusive_minimum), ("maximum", o.maximum)):
        if value is not None:
            schema[key] = value
    schema["description"] = o.help + (f" ({o.limits})" if o.limits else "")
    return schema


def obj(properties: dict, *, required: tuple[str, ...] = (), open_: bool = False, description: str = "") -> dict:
    """An object schema; closed (unknown keys refused) unless ``open_``."""
    out: dict = {"type": "object", "properties": properties, "additionalProperties": open_}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    return out


def options_object(options: tuple[OptionInfo, ...], description: str) -> dict:
    return obj({o.name: option_schema(o) for o in options}, description=description)


STR, BOOL, MAP, LIST = {"type": "string"}, {"type": "boolean"}, {"type": "object"}, {"type": "array"}
NONNEG = {"type": "integer", "minimum": 0}
SECONDS = {"type": "number", "minimum": 0}
IMAGE = obj({"repository": {"type": "string", "minLength": 1}, "tag": STR,
             "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}})
QUANTITY = {"type": ["string", "integer"]}
PLACEMENT = {"resources": MAP, "nodeSelector": MAP, "tolerations": LIST, "affinity": MAP, "priorityClassName": STR}


def pool_schema() -> dict:
    return obj({
        "replicas": NONNEG,
        "tensor_parallel_size": {"enum": list(TP_SIZES), "description": "GPUs of one replica's pod: a power of two"},
        "resources_per_rank": obj({"CPU": {"type": "number", "minimum": 0}, "GPU": {"type": "number", "minimum": 0},
                                   "memory": QUANTITY,
                                   "custom": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0},
                                              "description": "Ray custom resources of one rank; the pool's "
                                                             "worker group offers them"}}),
        "engine": options_object(engine_options(), "this pool's EngineConfig settings over deployment.engine"),
        "kv_transfer": options_object(describe(DisaggConfig), "DisaggConfig settings of this pool's workers"),
        "kubernetes": obj({**PLACEMENT, "shmSize": QUANTITY, "annotations": MAP, "labels": MAP}),
    })


def autoscaling_schema() -> dict:
    """A pool's ``autoscaling`` block: the bounds, the policy's name, and the knobs of every policy
    (each from its own config declaration; the spec checks that they belong to the chosen policy)."""
    knobs: dict = {}
    for name in available_policies():
        for o in policy_options(name):
            schema = option_schema(o)
            knobs[o.name] = schema if knobs.get(o.name, schema) == schema else {}  # two policies disagree: any
    return obj({"min_replicas": NONNEG, "max_replicas": {"type": "integer", "minimum": 1},
                "policy": {"enum": available_policies()}, **knobs}, required=("max_replicas",))


def values_schema() -> dict:
    pools = obj({role: pool_schema() for role in POOL_ROLES}, description="worker pools by role")
    pools["minProperties"] = 1
    autoscaling = obj({role: autoscaling_schema() for role in POOL_ROLES})
    deployment = obj({
        "name": STR,
        "router": obj({"policy": {"type": "string", "minLength": 1}, "policy_options": MAP,
                       "disagg_min_prefill_tokens": NONNEG,
                       "tool_call_parser": {"enum": [None, *available_tool_parsers()]},
                       "chat_template": {"type": ["string", "null"], "minLength": 1}}),
        "etcd": obj({"prefix": {"type": "string", "pattern": r"^(/[A-Za-z0-9_.-]+)+$"}}),
        "engine": options_object(engine_options(), "EngineConfig defaults of every pool"),
        "pools": pools, "autoscaling": autoscaling,
    }, required=("pools",), description="the DeploymentSpec (cluster/spec.py) the launcher runs")
    model = obj({"name": {"type": "string", "minLength": 1},
                 "source": {"enum": ["builtin", "pvc", "hostPath", "image"]}, "mountPath": STR,
                 "pvc": obj({"claimName": STR}), "hostPath": obj({"path": STR}), "tokenizer": STR},
                required=("name", "source"))
    workload = {**PLACEMENT, "podAnnotations": MAP, "extraArgs": {"type": "array", "items": STR}}
    router = obj({
        **workload, "replicas": NONNEG, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "readyTimeout": SECONDS, "drainTimeout": SECONDS,
        "service": obj({"type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "annotations": MAP}),
        "ingress": obj({"enabled": BOOL, "className": STR, "host": STR, "path": STR, "annotations": MAP,
                        "tls": LIST}),
        "pdb": obj({"enabled": BOOL, "minAvailable": {"type": ["integer", "string"]}}),
        "autoscaling": obj({"enabled": BOOL, "minReplicas": {"type": "integer", "minimum": 1},
                            "maxReplicas": {"type": "integer", "minimum": 1},
                            "targetCPUUtilizationPercentage": {"type": ["integer", "null"], "minimum": 1},
                            "requestsPerSecond": {"type": ["number", "null"], "exclusiveMinimum": 0}}),
    })
    launcher = obj({**workload, "takeoverWait": SECONDS, "leaseTtl": {"type": "integer", "minimum": 1},
                    "startTimeout": SECONDS, "hangTimeout": {"type": "number", "exclusiveMinimum": 0}})
    etcd = obj({
        "mode": {"enum": ["statefulset", "external"]}, "replicas": {"enum": [1, 3]}, "image": IMAGE,
        **PLACEMENT, "persistence": obj({"enabled": BOOL, "size": QUANTITY, "storageClass": STR}),
        "external": obj({
            "endpoints": {"type": "array",
                          "items": {"type": "string", "pattern": r"^(https?://)?(\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+):\d+/?$"}},
            "tls": obj({"secretName": STR, "caKey": STR, "certKey": STR, "keyKey": STR}),
        }),
    })
    ray = obj({"version": STR, "head": obj({**PLACEMENT, "rayStartParams": MAP}),
               "workerRayStartParams": MAP})
    monitoring = obj({"serviceMonitor": obj({"enabled": BOOL, "interval": STR, "labels": MAP}),
                      "podMonitor": obj({"enabled": BOOL, "interval": STR, "labels": MAP}),
                      "grafanaDashboard": obj({"enabled": BOOL, "labels": MAP})})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "shoal chart values (generated by python -m shoal.cluster.helm_values)",
        **obj({
            "nameOverride": STR, "fullnameOverride": STR, "image": IMAGE, "routerImage": IMAGE,
            "imagePullSecrets": LIST, "serviceAccount": obj({"create": BOOL, "name": STR, "annotations": MAP}),
            "podSecurityContext": MAP, "containerSecurityContext": MAP, "model": model,
            "deployment": deployment, "ray": ray, "launcher": launcher, "router": router,
            "apiKey": obj({"enabled": BOOL, "existingSecret": STR, "key": STR, "value": STR}),
            "etcd": etcd, "networkPolicy": obj({"enabled": BOOL}), "monitoring": monitoring,
        }, required=("model", "deployment")),
    }


def render_schema() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


# -- the files ----------------------------------------------------------------------------------------

def generated(chart: Path = CHART) -> dict[Path, str]:
    """Each generated file of ``chart`` -> its content as it should be now."""
    values, readme = chart / "values.yaml", chart / "README.md"
    return {values: render_values(values.read_text()), readme: render_readme(readme.read_text()),
            chart / "values.schema.json": render_schema()}


def outdated(chart: Path = CHART) -> list[str]:
    """The generated files of ``chart`` whose content differs from what would be generated now."""
    return [str(p) for p, text in generated(chart).items() if not p.exists() or p.read_text() != text]


def write(chart: Path = CHART) -> None:
    for path, text in generated(chart).items():
        path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.cluster.helm_values", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the chart's generated files are stale")
    parser.add_argument("--chart", type=Path, default=CHART, help="the chart directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        stale = outdated(args.chart)
        for path in stale:
            print(f"{path} is out of date: run python -m shoal.cluster.helm_values", file=sys.stderr)
        return 1 if stale else 0
    write(args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
