"""``shoal serve`` as a user runs it: a subprocess with 2 SmolLM2 workers, the official openai client,
then SIGTERM: exit 0 and no worker process left behind (and none even when the parent is SIGKILLed)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def start_serve(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cluster.cli", "serve", "--port", "0", "--device", "cpu",
         "--num-kv-blocks", "256", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"ready on (http://\S+/v1)", line)
        if m:
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError("shoal serve did not become ready:\n" + "".join(lines))


def worker_pids(parent: subprocess.Popen) -> list[int]:
    """The worker processes this ``shoal serve`` started (not other servers on the machine)."""
    out = subprocess.run(["pgrep", "-P", str(parent.pid), "-f", "shoal.workers.server"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read().lower()
                   for p in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def served():
    proc, url = start_serve("--workers", "2")
    yield proc, url
    if proc.poll() is None:
        proc.kill()


def test_openai_client_chat_and_stream(served):
    from openai import OpenAI

    _, url = served
    client = OpenAI(base_url=url, api_key="unused")
    chat = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    stream = client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                       max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices).startswith(" Paris")


def test_sigterm_stops_router_and_workers(served):
    proc, _ = served
    pids = worker_pids(proc)
    assert len(pids) >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert wait_gone(pids, 20)


def test_workers_die_with_a_killed_parent():
    proc, _ = start_serve("--workers", "1")
    pids = worker_pids(proc)
    assert len(pids) == 1
    proc.kill()  # no cleanup code runs in the parent
    proc.wait()
    assert wait_gone(pids, 30)
