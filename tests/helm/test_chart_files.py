"""The chart's files against their sources, without helm: the generated values, schema and README table
match ``EngineConfig`` today; every value is in the README; appVersion is shoal's version; the Grafana
dashboard (in docs/ and in the chart, the same file) queries only metrics shoal exports."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

from shoal.cluster import helm_values
from shoal.workers.config import EngineConfig
from shoal.workers.options import describe

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "shoal"
# Values whose content is free-form Kubernetes (or spec) data: the README lists the key, not its inside.
OPAQUE = {"resources", "nodeSelector", "tolerations", "affinity", "labels", "annotations", "podAnnotations",
          "rayStartParams", "workerRayStartParams", "policy_options", "podSecurityContext",
          "containerSecurityContext", "resources_per_rank", "kv_transfer", "engine"}


def test_generated_files_are_up_to_date():
    assert helm_values.outdated() == [], "run: python -m shoal.cluster.helm_values"


def test_every_engine_field_is_in_values_and_schema():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    fields = {o.name for o in describe(EngineConfig)} - set(helm_values.SPEC_SETS)
    assert set(values["deployment"]["engine"]) == fields
    engine = schema["properties"]["deployment"]["properties"]["engine"]
    assert set(engine["properties"]) == fields and engine["additionalProperties"] is False
    defaults = {o.name: o.default for o in describe(EngineConfig)}
    assert all(values["deployment"]["engine"][k] == defaults[k] for k in fields)


def test_a_new_engine_field_makes_the_files_stale(monkeypatch):
    from shoal.workers.options import OptionInfo

    extra = OptionInfo("brand_new", "int", 3, "a new knob", False, ("--brand-new",), 3, None, 1, None, None,
                       None, ">= 1", False)
    monkeypatch.setattr(helm_values, "engine_options", lambda: (*describe(EngineConfig)[1:-1], extra))
    assert len(helm_values.outdated()) == 3


def leaves(tree: dict, path: str = ""):
    for key, value in tree.items():
        here = f"{path}.{key}" if path else key
        if isinstance(value, dict) and value and key not in OPAQUE:
            yield from leaves(value, here)
        else:
            yield here


def test_readme_lists_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+)`", readme, re.M))
    missing = []
    for path in leaves(values):
        path = re.sub(r"^deployment\.pools\.unified\.", "deployment.pools.<role>.", path)
        if path not in listed and not (path == "deployment.engine" and "deployment.engine.*" in listed):
            missing.append(path)
    assert missing == []
    engine = {p.removeprefix("deployment.engine.") for p in listed if p.startswith("deployment.engine.")}
    assert {o.name for o in helm_values.engine_options()} <= engine


def test_app_version_is_shoals_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == project["version"]


def exported_metrics() -> set[str]:
    """Every series name shoal's routers and workers export (router/metrics.py, workers/metrics.py)."""
    router = (REPO / "router" / "metrics.py").read_text()
    workers = (REPO / "workers" / "metrics.py").read_text()
    names = {f"shoal_router_{m}" for m in re.findall(r'f"\{p\}_(\w+)"', router)}
    names |= set(re.findall(r'"((?:vllm|shoal):\w+)"', workers))
    names |= {f"vllm:{m}" for m in re.findall(r'phase\("(\w+)"', workers)}
    return names


def queried_metrics(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    found = set()
    for expr in exprs:
        for name in re.findall(r"\b((?:shoal_router_|vllm:|shoal:)[A-Za-z0-9_:]+)", expr):
            found.add(re.sub(r"_(total|bucket|sum|count)$", "", name))
    return found


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((REPO / "docs" / "grafana" / "shoal-dashboard.json").read_text())
    queried = queried_metrics(dashboard)
    assert len(queried) >= 10
    assert queried - exported_metrics() == set()
    assert queried_metrics({"panels": [{"targets": [{"expr": "rate(vllm:no_such_thing_total[1m])"}]}]}) \
        - exported_metrics() == {"vllm:no_such_thing"}  # the check can fail
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for want in ("request rate", "first token", "inter-token", "end-to-end", "running", "waiting", "kv cache",
                 "prefix-cache", "tokens/s", "errors"):
        assert want in titles, want


def test_the_chart_ships_the_docs_dashboard():
    assert (CHART / "dashboards" / "shoal.json").read_text() == \
        (REPO / "docs" / "grafana" / "shoal-dashboard.json").read_text()
