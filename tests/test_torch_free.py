"""The router's whole start path and the contract layer import with torch (and triton) unimportable.

A router pod has no torch: each module below is imported in a fresh interpreter whose ``sys.meta_path``
starts with a finder that refuses ``torch``/``triton`` and their submodules, as an environment without
them would. A module that needs torch anywhere on its import path fails here with the chain that
reached it. (Imports inside functions run later, on the worker side, and are not seen here: that is
the point of them.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every placement policy, found on disk, so a new one is covered without editing this list.
PLACEMENT = sorted(f"shoal.router.placement.{p.stem}" for p in (ROOT / "router" / "placement").glob("*.py")
                   if p.stem != "__init__")

TORCH_FREE = [
    "shoal.router.app",
    "shoal.router.worker_client",
    "shoal.router.worker_pool",
    "shoal.router.placement",
    *PLACEMENT,
    "shoal.cluster.cli",
    "shoal.cluster.spec",
    "shoal.workers.protocol",
    "shoal.workers.rpc.codec",
    "shoal.workers.rpc.servicer",
    "shoal.workers.tokenizer",
    "shoal.workers.engine.sampling_params",
    "shoal.workers.config",
    "shoal.workers.disagg_config",
    "shoal.workers.options",
    "shoal.router.config",
    "shoal.router.host",
    "shoal.router.metrics",
    "shoal.cluster.etcd_router",
    "shoal.cluster.router_process",
    "shoal.cluster.flags",
    "shoal.cluster.serve",
    "shoal.workers.metrics",
    "shoal.workers.models.files",
]

BLOCKED = ("torch", "triton")

# Runs in the child: block, import, report. It prints one JSON line so the parent can tell an import
# error (the module needs torch) from a crash of the harness itself.
CHILD = r"""
import importlib, importlib.abc, json, sys, traceback

BLOCKED = {blocked!r}
attempts = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{{name}} is blocked: this environment has no torch/triton")
        return None

sys.meta_path.insert(0, Blocker())
try:
    importlib.import_module({module!r})
    exec(compile({run!r}, "<start path>", "exec"), {{}})
    error = None
except BaseException:
    error = traceback.format_exc()
print(json.dumps({{"error": error, "attempts": attempts,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
"""


def import_without_torch(module: str, run: str = "") -> dict:
    """Import ``module`` (then run ``run``) in a child whose torch and triton cannot be imported."""
    code = CHILD.format(blocked=BLOCKED, module=module, run=run)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, f"the harness itself failed for {module}:\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(module: str) -> None:
    result = import_without_torch(module)
    assert result["error"] is None, f"import {module} needs {result['attempts']}:\n{result['error']}"
    assert result["loaded"] == [], f"{module} left {result['loaded']} in sys.modules"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_imports_without_torch(module):
    check(module)


# The router's start path, run (not only imported) with torch blocked: the tokenizer, a pool of gRPC
# worker clients, the app on its RouterHost, /health and /ready answering, and a clean stop.
START_PATH = r"""
import asyncio, httpx
from shoal.router.app import create_app
from shoal.router.config import RouterConfig
from shoal.router.host import RouterHost
from shoal.router.worker_client import GrpcWorkerClient
from shoal.router.worker_pool import make_pool
from shoal.workers.models.files import tokenizer_path
from shoal.workers.tokenizer import Tokenizer

async def main():
    config = RouterConfig(placement="prefix_aware", placement_options={"block_size": 16})
    pool = make_pool(config)
    pool.add(GrpcWorkerClient("nobody", "127.0.0.1:9"))  # a worker that is not there: not ready
    host = RouterHost(create_app(config, pool, Tokenizer.from_path(tokenizer_path("smollm2-135m"))), "127.0.0.1", 0)
    await host.listen()
    async with httpx.AsyncClient(base_url=host.url) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 503
    await host.stop()

asyncio.run(main())
"""


def test_the_router_start_path_runs_without_torch():
    result = import_without_torch("shoal.router.host", run=START_PATH)
    assert result["error"] is None, f"the start path needs {result['attempts']}:\n{result['error']}"
    assert result["loaded"] == []


def test_the_blocker_blocks():
    # The harness must be able to fail: a module that imports torch is caught, with the name tried.
    result = import_without_torch("shoal.workers.llm_engine")
    assert result["error"] is not None and "torch" in result["attempts"]
    assert result["loaded"] == []


# `shoal router`'s own start, run with torch blocked: etcd, the spec from etcd, the tokenizer, the app
# listening and following membership; no worker registers, so it gives up waiting and says so.
ROUTER_PROCESS = r"""
import contextlib, io
from shoal.cluster.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["router", "--etcd", ETCD, "--deployment", "torch-free", "--port", "0", "--ready-timeout", "2"])
assert code == 2 and "no worker became healthy within 2 s" in err.getvalue(), (code, err.getvalue())
"""


def test_the_standalone_router_starts_without_torch(etcd_server):
    import asyncio

    from shoal.cluster.registry import connect, put_spec
    from shoal.cluster.spec import DeploymentSpec
    from shoal.workers.models.files import tokenizer_path

    spec = DeploymentSpec.from_dict({"name": "torch-free", "model": "smollm2-135m", "pools": {"unified": {
        "engine": {"tokenizer": str(tokenizer_path("smollm2-135m"))}}}})

    async def put():
        client = await connect(etcd_server.endpoint)
        await put_spec(client, spec)
        await client.close()

    asyncio.run(put())
    result = import_without_torch("shoal.cluster.cli", run=f"ETCD = {etcd_server.endpoint!r}\n" + ROUTER_PROCESS)
    assert result["error"] is None, f"shoal router needs {result['attempts']}:\n{result['error']}"
    assert result["loaded"] == []
