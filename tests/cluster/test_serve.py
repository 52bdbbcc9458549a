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


def test_disaggregated_serve_hands_prompts_from_prefill_to_decode():
    """``--prefill-workers 1 --workers 1``: a long prompt is prefilled on the prefill worker, its KV
    moves to the decode worker (reported as cached there), and the answer equals a unified worker's."""
    import httpx

    prompt = "The history of the city of Paris begins " + "long before the Romans arrived, " * 12
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    proc, url = start_serve("--workers", "1")
    try:
        unified = httpx.post(f"{url}/completions", json={**body, "model": "smollm2-135m"}, timeout=60).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    proc, url = start_serve("--prefill-workers", "1", "--workers", "1", "--disagg-min-prefill-tokens", "32")
    try:
        roles = sorted(cmd[cmd.index("--role") + 1] for cmd in
                       (open(f"/proc/{p}/cmdline").read().split("\0") for p in worker_pids(proc)))
        assert roles == ["decode", "prefill"]
        got = httpx.post(f"{url}/completions", json={**body, "model": "smollm2-135m"}, timeout=60).json()
        assert got["choices"][0]["text"] == unified["choices"][0]["text"]
        prompt_tokens = got["usage"]["prompt_tokens"]
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt_tokens - 1) // 16 * 16
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
        assert 'shoal_router_disagg_requests_total{outcome="disaggregated"} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
