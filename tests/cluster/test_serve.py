"""``shoal serve`` as a user runs it: a subprocess with 2 SmolLM2 workers, the official openai client,
then SIGTERM: exit 0 and no worker process left behind (and none even when the parent is SIGKILLed).
Its ``--kv-*`` flags reach the DisaggConfig of the engine each worker process builds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from shoal.cluster.cli import build_parser, main
from shoal.cluster.serve import make_workers
from shoal.workers.disagg import DisaggConfig
from shoal.workers.server import build_parser as worker_parser
from shoal.workers.server import engine_from_args
from shoal.workers.options import from_namespace
from tests.cluster.serve_support import start_serve, wait_gone, worker_pids

slow = pytest.mark.slow  # these load the real SmolLM2 in worker processes


@pytest.fixture(scope="module")
def served():
    served = start_serve("--workers", "2")
    yield served.proc, served.url
    served.stop()


@slow
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


@slow
def test_sigterm_stops_router_and_workers(served):
    proc, _ = served
    pids = worker_pids(proc)
    assert len(pids) >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert wait_gone(pids, 20)


@slow
def test_workers_die_with_a_killed_parent():
    proc = start_serve("--workers", "1").proc
    pids = worker_pids(proc)
    assert len(pids) == 1
    proc.kill()  # no cleanup code runs in the parent
    proc.wait()
    assert wait_gone(pids, 30)


@slow
def test_disaggregated_serve_hands_prompts_from_prefill_to_decode():
    """``--prefill-workers 1 --workers 1``: a long prompt is prefilled on the prefill worker, its KV
    moves to the decode worker (reported as cached there), and the answer equals a unified worker's."""
    import httpx

    prompt = "The history of the city of Paris begins " + "long before the Romans arrived, " * 12
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    served = start_serve("--workers", "1")
    proc, url = served.proc, served.url
    try:
        unified = httpx.post(f"{url}/completions", json={**body, "model": "smollm2-135m"}, timeout=60).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    # Non-default --kv-* settings: the worker processes must accept them (and the transfer still works).
    served = start_serve("--prefill-workers", "1", "--workers", "1", "--disagg-min-prefill-tokens", "32",
                         "--kv-export-ttl", "20", "--kv-layers-per-chunk", "1")
    proc, url = served.proc, served.url
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


def test_kv_flags_reach_the_engine_a_serve_worker_builds():
    """``shoal serve --kv-*`` → the worker process's command line → its parser → the engine factory the
    child runs: the prefill worker's engine holds the given DisaggConfig (unset fields at their defaults)."""
    args = build_parser().parse_args([
        "serve", "--model", "tiny-smollm2-vocab", "--load-format", "dummy", "--device", "cpu",
        "--num-kv-blocks", "32", "--prefill-workers", "1", "--workers", "1",
        "--kv-export-ttl", "7.5", "--kv-link-timeout", "3", "--kv-layers-per-chunk", "0"])
    prefill, decode = make_workers(args)
    assert (prefill.role, decode.role) == ("prefill", "decode")
    assert prefill.command()[1:3] == ["-m", "shoal.workers.server"]
    assert decode.engine_args == prefill.engine_args  # both sides get the same settings
    engine = engine_from_args(worker_parser().parse_args(prefill.command()[3:]))
    try:
        assert engine.role == "prefill" and engine.worker_id == "prefill-0" and engine.alive()
        assert engine.disagg_config == DisaggConfig(export_ttl_s=7.5, link_timeout_s=3.0, layers_per_chunk=0)
    finally:
        engine.shutdown()
    # Without the flags the workers get none of them: DisaggConfig's defaults apply.
    plain = build_parser().parse_args(["serve", "--model", "tiny-smollm2-vocab", "--load-format", "dummy"])
    flags = make_workers(plain)[0].engine_args
    assert not {"--kv-export-ttl", "--kv-link-timeout", "--kv-layers-per-chunk"} & set(flags)
    assert from_namespace(DisaggConfig, worker_parser().parse_args(["--port", "0", *flags])) == DisaggConfig()


@pytest.mark.parametrize("flag,value,message", [
    ("--kv-export-ttl", "0", "--kv-export-ttl must be > 0, got 0.0"),
    ("--kv-link-timeout", "-1", "--kv-link-timeout must be > 0, got -1.0"),
    ("--kv-layers-per-chunk", "-2", "--kv-layers-per-chunk must be >= 0, got -2"),
])
def test_a_bad_kv_flag_is_refused_before_anything_starts(capsys, flag, value, message):
    assert main(["serve", "--port", "0", "--model", "tiny-smollm2-vocab", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"shoal: error: {message}"
