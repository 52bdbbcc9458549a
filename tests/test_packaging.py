"""pyproject's package list matches the folders on disk, and the console script is wired."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"cluster", "workers", "router", "kernels"}


def test_every_subpackage_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = set()
    for top in TOP_LEVEL:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            on_disk.add(".".join(("shoal",) + rel))
    assert listed == on_disk
    assert {cfg["package-dir"][f"shoal.{t}"] for t in TOP_LEVEL} == TOP_LEVEL


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "shoal.cluster.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("shoal ")


def test_router_side_modules_do_not_import_torch():
    code = "import sys, shoal.workers.protocol, shoal.workers; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_repo_root_is_not_importable_as_top_level_packages():
    # The import package is `shoal`; the repo's own folders must not also import as `kernels`,
    # `router`, ... Hugging Face ships a `kernels` package that transformers imports when it can find
    # one, so a repo root on sys.path (`python -m pytest` from it) breaks every transformers import.
    import importlib.util

    for name in sorted(TOP_LEVEL):
        spec = importlib.util.find_spec(name)
        assert spec is None or spec.origin != str(ROOT / name / "__init__.py"), (
            f"{name!r} imports from the repo root ({spec.origin}); run the suite with the pytest "
            "console script (make test), not python -m pytest"
        )
