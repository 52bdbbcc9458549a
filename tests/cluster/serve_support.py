"""``shoal serve`` as a user runs it: a subprocess, its URL once it says it is ready, and the checks
a test makes after it (worker pids, processes gone).

Readiness is the server's own: the ``ready on`` line is printed only after the router listens and a
worker is healthy, and :func:`start_serve` then also sees ``/ready`` answer 200 before it returns.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx

from shoal.workers.models.files import smollm2_path

# A 2-layer model of SmolLM2's vocabulary with random weights: loads in a second, with a real tokenizer.
TINY = ("--model", "tiny-smollm2-vocab", "--load-format", "dummy", "--tokenizer", str(smollm2_path()))


class Served:
    """A running ``shoal serve``: ``proc``, ``url`` (…/v1), ``base`` (without /v1), and its output lines."""

    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]) -> None:
        self.proc, self.url, self.lines = proc, url, lines
        self.base = url.removesuffix("/v1")

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def serve_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "shoal.cluster.cli", "serve", "--port", "0", "--device", "cpu",
            "--num-kv-blocks", "256", *extra]


def start_serve(*extra: str, timeout: float = 240) -> Served:
    proc = subprocess.Popen(serve_command(*extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:  # keeps reading after ready, so the pipe never fills
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"ready on (http://\S+/v1)", line)
            if m and not found.is_set():
                url.append(m.group(1))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(timeout) or not url:
        proc.kill()
        proc.wait()
        raise AssertionError("shoal serve did not become ready:\n" + "".join(lines))
    served = Served(proc, url[0], lines)
    assert httpx.get(f"{served.base}/ready", timeout=10).status_code == 200, served.output()
    return served


def worker_pids(parent: subprocess.Popen) -> list[int]:
    """The worker processes this ``shoal serve`` started (not other servers on the machine)."""
    out = subprocess.run(["pgrep", "-P", str(parent.pid), "-f", "shoal.workers.server"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read().lower()
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float) -> bool:
    """Whether every pid has exited and been reaped (no zombie left) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            return True
        time.sleep(0.1)
    return False


def wait_until(check, timeout: float, what: str):
    """Poll ``check()`` until it returns something truthy; -> that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sse_events(lines) -> list:
    """The ``data:`` events of an SSE stream's lines, JSON-decoded (``"[DONE]"`` kept as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
