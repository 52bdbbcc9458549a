"""``shoal serve``'s edges, as a user meets them: one-line start-up errors, a worker that dies and
comes back, and a drain on SIGTERM that lets streams finish (or ends them with an error event)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from tests.cluster.serve_support import TINY, is_zombie, serve_command, sse_events, start_serve, wait_until, worker_pids


def _run_serve(*extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(serve_command(*extra), capture_output=True, text=True, timeout=timeout)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("shoal: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_taken_port_is_one_line_naming_the_port_and_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_serve(*TINY, "--port", str(port))
    line = _one_error_line(result)
    assert f"127.0.0.1:{port}" in line and "already in use" in line and "--port" in line
    assert "starting" not in result.stdout  # refused before any worker started


def test_a_model_path_that_does_not_exist_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    line = _one_error_line(_run_serve("--model", str(missing)))
    assert f"--model {missing}: does not exist" in line


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="needs a machine without a GPU")
def test_a_cuda_device_that_is_not_there_is_one_line():
    line = _one_error_line(_run_serve(*TINY, "--device", "cuda"))
    assert "--device cuda: no CUDA device is available" in line


def _stream(base: str, max_tokens: int):
    """An open streaming completion: -> (the httpx stream context, its line iterator)."""
    client = httpx.Client(timeout=60)
    body = {"model": "tiny-smollm2-vocab", "prompt": "Once upon a time", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    ctx = client.stream("POST", f"{base}/v1/completions", json=body)
    response = ctx.__enter__()
    assert response.status_code == 200
    return client, ctx, response.iter_lines()


def test_a_killed_worker_fails_its_stream_is_reaped_restarted_and_placed_again():
    served = start_serve(*TINY, "--workers", "1", "--policy", "round_robin")
    try:
        [pid] = worker_pids(served.proc)
        client, ctx, lines = _stream(served.base, 4000)
        first = next(line for line in lines if line.startswith("data: "))
        assert "text" in first
        os.kill(pid, signal.SIGKILL)
        events = sse_events(lines)  # the rest of the stream: it must end, with an error event, then [DONE]
        ctx.__exit__(None, None, None)
        client.close()
        assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or not is_zombie(pid) and
                   pid not in worker_pids(served.proc), 10, "the killed worker to be reaped")
        assert not is_zombie(pid)
        new = wait_until(lambda: [p for p in worker_pids(served.proc) if p != pid], 60, "a new worker process")
        assert len(new) == 1
        # Placed again once it is back: a request answers 200 (503 while it restarts).
        def answered():
            r = httpx.post(f"{served.base}/v1/completions", timeout=30,
                           json={"model": "tiny-smollm2-vocab", "prompt": "hi", "max_tokens": 2})
            return r.status_code == 200
        wait_until(answered, 60, "the restarted worker to answer")
        assert "worker worker-0 exited (code -9); restarting" in served.output()
    finally:
        assert served.stop() == 0


def test_sigterm_lets_a_short_stream_finish_and_ends_a_long_one_with_an_error():
    served = start_serve(*TINY, "--workers", "1", "--drain-timeout", "1")
    try:
        client, ctx, lines = _stream(served.base, 4000)
        next(line for line in lines if line.startswith("data: "))
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        events = sse_events(lines)
        ctx.__exit__(None, None, None)
        client.close()
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "server_shutting_down", events[-2]
        assert served.proc.wait(60) == 0
        assert time.monotonic() - t0 < 30
    finally:
        served.stop()
    served = start_serve(*TINY, "--workers", "1", "--drain-timeout", "60")
    try:
        client, ctx, lines = _stream(served.base, 24)
        first = next(line for line in lines if line.startswith("data: "))
        served.proc.send_signal(signal.SIGTERM)
        events = sse_events([first, *lines])
        ctx.__exit__(None, None, None)
        client.close()
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1] if isinstance(e, dict))
        # every token arrived (counted by usage: a chunk may carry several tokens, or none while the
        # detokenizer holds back an incomplete UTF-8 character of the random model's output)
        assert events[-2]["usage"]["completion_tokens"] == 24
        assert [c["finish_reason"] for e in events[:-2] for c in e["choices"] if c["finish_reason"]] == ["length"]
        assert served.proc.wait(60) == 0
    finally:
        served.stop()
