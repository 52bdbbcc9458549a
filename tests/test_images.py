"""The Dockerfiles, checked without a container engine (none runs here; the builds themselves were not
run): they parse into instructions, are multi-stage, pin their bases, end as a non-root user; every
COPY source exists and survives .dockerignore; each CMD is a real shoal command whose ``--help`` works;
and the router image's package list covers everything the router's start path imports, torch-free."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.test_torch_free import import_without_torch

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        assert word.isupper(), f"{path.name}: not an instruction: {line[:60]}"
        out.append((word, rest.strip()))
    assert not pending, f"{path.name} ends inside a continuation"
    return out


def ignored(rel: str) -> bool:
    """Whether .dockerignore leaves ``rel`` out of the build context (last matching rule wins)."""
    verdict = False
    for rule in (REPO / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(rel, pattern) or rel.startswith(pattern + "/"):
            verdict = not negate
    return verdict


def test_there_are_two_images():
    assert [p.name for p in DOCKERFILES] == ["router.Dockerfile", "worker.Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(path):
    steps = instructions(path)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    bases = [a.split()[0] for w, a in steps if w == "FROM"]
    assert len(bases) >= 2, "multi-stage"
    for base in bases:
        base = args.get(base.strip("${}"), base)
        assert ":" in base and not base.endswith(":latest"), f"unpinned base {base}"
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage runs as root"
    for word, rest in steps:
        if word == "RUN" and "pip install" in rest:
            for req in rest.split():
                if "==" in req:
                    assert req.split("==")[1].strip('"'), req


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_in_the_build_context(path):
    for word, rest in instructions(path):
        if word != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in rest.split() if not s.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such file"
            assert not ignored(source), f"{path.name}: COPY {source} is excluded by .dockerignore"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_command_is_a_shoal_command_whose_help_works(path):
    [cmd] = [json.loads(a) for w, a in instructions(path) if w == "CMD"]
    assert cmd[0] == "shoal" and cmd[-1] == "--help"
    out = subprocess.run([sys.executable, "-m", "shoal.cluster.cli", *cmd[1:]], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage: shoal" in out.stdout, out.stderr


def _name(requirement: str) -> str:
    return re.split(r"[\s;\[<>=!~(]", requirement, 1)[0].lower().replace("_", "-")


def dependency_closure(names) -> set[str]:
    """``names`` and everything they require (not extras), transitively, by this venv's metadata."""
    from importlib.metadata import PackageNotFoundError, requires

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [_name(r) for r in reqs if "extra ==" not in r]
    return seen


def router_requirements() -> dict[str, str]:
    lines = (REPO / "docker" / "router-requirements.txt").read_text().splitlines()
    pins = dict(line.split("#")[0].strip().split("==") for line in lines if line and not line.startswith("#"))
    return {name.lower().replace("_", "-"): v for name, v in pins.items()}


# Top-level modules the router loads that its image needs no package for.
NOT_NEEDED = {
    "shoal": "shoal's own wheel, --no-deps",
    "grpc_tools": "grpc imports it in a try (a compatibility shim); this venv has it for the stubs' build",
    "_distutils_hack": "setuptools' start-up hook of this venv, not an import of the router",
}

START = r"""
import sys
from shoal.cluster import cli, router_process, etcd_router  # the router's start path, imported whole
import uvicorn.protocols.http.httptools_impl, uvloop  # what RouterHost and run_loop pick at run time
print("MODULES=" + ",".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_the_router_image_has_every_package_the_router_imports_and_no_torch():
    result = import_without_torch("shoal.cluster.cli", run=START)
    assert result["error"] is None, result["error"]
    # Again, for the list of what it imported (the harness reports only errors).
    out = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, timeout=120, cwd=REPO)
    modules = next(l for l in out.stdout.splitlines() if l.startswith("MODULES=")).removeprefix("MODULES=").split(",")
    owners = packages_distributions()
    # module -> the distributions that may provide it (several for a namespace such as google.*)
    needed = {m: {d.lower().replace("_", "-") for d in owners[m]} for m in modules
              if m in owners and m not in sys.stdlib_module_names and m not in NOT_NEEDED}
    pins = router_requirements()
    closure = dependency_closure(pins)  # what pip installs in the image for the pinned packages
    lacking = {m: sorted(d) for m, d in needed.items() if not d & closure}
    assert lacking == {}, "the router imports packages its image would lack"
    assert "torch" not in closure and "ray" not in closure
