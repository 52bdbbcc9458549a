"""``shoal launch`` as a Ray job, as a user runs it: ``ray start --head``, ``ray job submit
--working-dir <repo> -- shoal launch -f spec.yaml``, an OpenAI request, ``shoal status``, ``shoal stop``.

The head runs on 127.0.0.1 with every port free-picked and its temp dir under tmp_path; it is torn
down by killing the processes it started (found by that temp dir, and their children), never with a
bare ``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from shoal.cluster.etcd import EmbeddedEtcd, free_port
from tests.process_support import descendants, kill_tree, processes_mentioning
from shoal.workers.models.presets import PRESETS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray and shoal
NAME = "job-test"
TINY_CONFIG = PRESETS["tiny-smollm2-vocab"]  # 2 layers, SmolLM2's vocabulary


def short_tmpdir(tag: str) -> Path:
    """A directory directly under /tmp: Ray's socket paths below it must fit in 107 bytes, which
    pytest's tmp_path (longer under xdist) does not guarantee. Callers remove it."""
    return Path(tempfile.mkdtemp(prefix=f"shoal-{tag}-", dir="/tmp"))


@pytest.fixture
def ray_head(tmp_path_factory):
    """-> (dashboard URL, env for ray/shoal commands). A fresh head with 2 CPUs on 127.0.0.1."""
    base = short_tmpdir("rj")  # short: Ray's socket paths under it must fit in 107 bytes
    temp = base / "ray"
    temp.mkdir()
    # RAY_AUTH_MODE: once any local ray.init() has written ~/.ray/auth_token, Ray 2.60's `ray start`
    # turns token auth on and `ray job submit` is refused: the test must not depend on that file.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(base), "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    dashboard = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--temp-dir", str(temp), "--node-ip-address", "127.0.0.1",
           "--port", str(free_port()), "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1",
           "--include-dashboard", "true", "--num-cpus", "2", "--disable-usage-stats",
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port())]
    try:
        started = time.monotonic()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stdout + out.stderr
        print(f"ray start --head: {time.monotonic() - started:.1f} s")
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        kill_tree(descendants(processes_mentioning(str(temp))))
        assert not processes_mentioning(str(temp)), "a Ray process of this test survived"
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def etcd(tmp_path):
    server = EmbeddedEtcd(tmp_path / "etcd", unsafe_no_fsync=True).start()
    yield server
    server.stop()


def ray_cli(env, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def job_status(env, address: str, job_id: str) -> str:
    """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED, read from ``ray job status``'s lines."""
    out = ray_cli(env, "job", "status", "--address", address, job_id).stdout
    m = re.search(r"Job '[^']+' (succeeded|failed|stopped)", out) or re.search(r"Status for job '[^']+': (\w+)", out)
    return m.group(1).upper() if m else out


def test_job_submit_launch_serve_status_stop(ray_head, etcd, tmp_path, smollm2_path):
    address, env = ray_head
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    router_port = free_port()
    spec = tmp_path / "deploy.json"
    spec.write_text(json.dumps({
        "name": NAME, "model": str(model),
        "pools": {"unified": {"replicas": 1, "resources_per_rank": {"CPU": 1},
                              "engine": {"tokenizer": str(smollm2_path), "load_format": "dummy", "device": "cpu",
                                         "num_kv_blocks": 64, "max_model_len": 512}}},
        "router": {"policy": "least_load", "port": router_port},
        "etcd": {"endpoints": etcd.endpoint}}))
    job_id = f"shoal-test-{os.getpid()}"
    started = time.monotonic()
    submit = ray_cli(env, "job", "submit", "--address", address, "--working-dir", str(REPO),
                     "--submission-id", job_id, "--no-wait", "--",
                     "shoal", "launch", "-f", str(spec), "--host", "127.0.0.1", "--lease-ttl", "3")
    assert submit.returncode == 0, submit.stdout + submit.stderr

    def logs() -> str:
        return ray_cli(env, "job", "logs", "--address", address, job_id).stdout

    url = f"http://127.0.0.1:{router_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            # The router's own readiness: /ready is 200 once a worker it follows is healthy
            # (/v1/models answers before that, and a request then would get 503).
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        state = job_status(env, address, job_id)
        assert state in ("PENDING", "RUNNING"), f"job is {state}:\n{logs()}"
        assert time.monotonic() < deadline, f"router never answered:\n{logs()}"
        time.sleep(1)
    ready = time.monotonic() - started
    resp = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": str(model), "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4
    assert "ready in" in logs()

    status = subprocess.run([str(BIN / "shoal"), "status", "--etcd", etcd.endpoint], env=env,
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert f"{NAME}: model {model}, 1/1 workers registered" in status.stdout, status.stdout
    assert "unified-0-0" in status.stdout

    t0 = time.monotonic()
    stop = subprocess.run([str(BIN / "shoal"), "stop", NAME, "--etcd", etcd.endpoint, "--wait", "60"],
                          env=env, capture_output=True, text=True, timeout=90)
    assert stop.returncode == 0, stop.stdout + stop.stderr + logs()
    deadline = time.monotonic() + 30
    while (state := job_status(env, address, job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job still {state} after shoal stop:\n{logs()}"
        time.sleep(0.5)
    print(f"job ready after {ready:.1f} s; stopped {time.monotonic() - t0:.1f} s after shoal stop")
    assert state == "SUCCEEDED", logs()
    assert "stopped" in logs()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/v1/models", timeout=2)
    again = subprocess.run([str(BIN / "shoal"), "status", "--etcd", etcd.endpoint], env=env,
                           capture_output=True, text=True, timeout=30)
    assert "no deployments" in again.stdout, again.stdout


def test_launch_starts_an_embedded_etcd_when_none_answers():
    """No --etcd and the spec's default endpoint is silent: ``shoal launch`` runs its own etcd."""
    import asyncio

    from shoal.cluster.launch import resolve_etcd
    from shoal.cluster.spec import DeploymentSpec

    spec = DeploymentSpec.from_dict({"name": "emb", "model": "smollm2-135m", "pools": {"unified": {}}})

    async def go():
        endpoints, client, embedded = await resolve_etcd(spec, None, "127.0.0.1")
        try:
            if embedded is None:
                pytest.skip(f"an etcd already answers at {endpoints}")
            assert endpoints == embedded.endpoint and embedded.running
            await client.put(b"/shoal/emb/probe", b"1")
            assert (await client.get(b"/shoal/emb/probe")).value == b"1"
        finally:
            await client.close()
            if embedded is not None:
                embedded.stop()
        return embedded

    assert not asyncio.run(go()).running
