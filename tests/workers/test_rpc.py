"""The worker's gRPC service and the router's client: real servers on 127.0.0.1, a tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from shoal.router.worker_client import GrpcWorkerClient, WorkerUnavailable
from shoal.workers import LLM
from shoal.workers.async_engine import AsyncEngine
from shoal.workers.config import EngineConfig
from shoal.workers.engine.sampling_params import SamplingParams, StructuredOutputs
from shoal.workers.llm_engine import LLMEngine
from shoal.workers.protocol import (
    GenerateRequest, KVEventBatch, KVHandle, TokenDelta, TokenLogprob, WorkerInfo, WorkerLoad, block_hashes,
)
from shoal.workers.rpc import codec
from shoal.workers.rpc import worker_pb2 as pb
from shoal.workers.rpc import worker_pb2_grpc as pb_grpc
from shoal.workers.rpc.servicer import start_worker_server

ENGINE_ARGS = dict(device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=96, block_size=8)


@pytest.fixture(scope="module")
def tiny_path(tiny_checkpoints):
    return tiny_checkpoints["llama"][0]


def make_engine(path: str, worker_id: str = "w-test", **kw) -> AsyncEngine:
    llm = LLMEngine(EngineConfig(model=path, kv_events=True, **ENGINE_ARGS))
    return AsyncEngine(llm, worker_id=worker_id, **kw).start()


@pytest.fixture(scope="module")
def aengine(tiny_path):
    eng = make_engine(tiny_path)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_path):
    return LLM(tiny_path, **ENGINE_ARGS)


@contextlib.asynccontextmanager
async def serving(engine: AsyncEngine, **client_kw):
    server = await start_worker_server(engine, "127.0.0.1", 0)
    client = GrpcWorkerClient(engine.worker_id, f"127.0.0.1:{server.bound_port}", **client_kw)
    try:
        yield client
    finally:
        await client.close()
        await server.stop(0)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


async def wait_until(cond, timeout: float, what: str) -> float:
    """Seconds until ``cond()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


# -- stubs and codec ------------------------------------------------------------------------------
def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from shoal.workers.rpc import generate

    for path in generate.generate(tmp_path):
        committed = generate.HERE / path.name
        assert path.read_bytes() == committed.read_bytes(), f"{path.name} is stale: python -m {generate.__name__}"


def test_flat_protoc_import_becomes_a_package_import():
    from shoal.workers.rpc.generate import _fix_grpc_import

    out = _fix_grpc_import("import grpc\nimport worker_pb2 as worker__pb2\n")
    assert out == "import grpc\nfrom shoal.workers.rpc import worker_pb2 as worker__pb2\n"
    with pytest.raises(RuntimeError, match="does not import"):
        _fix_grpc_import("import grpc\n")


ROUND_TRIP = [
    SamplingParams(),
    SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=2**62, presence_penalty=-1.5,
                   frequency_penalty=0.25, repetition_penalty=1.1, max_tokens=None, min_tokens=2,
                   stop=("\n\n", "END"), stop_token_ids=(2, 7), include_stop_str_in_output=True, ignore_eos=True,
                   logprobs=0, skip_special_tokens=False),
    SamplingParams(seed=0, max_tokens=1, logprobs=20),  # zeros are values, not absent fields
    SamplingParams(logit_bias={"7": -100, 0: 2.5}, allowed_token_ids=(0, 5, 9), bad_words=("a b", "c"),
                   bad_words_token_ids=((4, 5), (6,)), prompt_logprobs=0),
    SamplingParams(prompt_logprobs=20, allowed_token_ids=(3,)),
    SamplingParams(structured_outputs=StructuredOutputs.json_schema({"type": "object", "required": ["a"]})),
    SamplingParams(structured_outputs=StructuredOutputs("json_object")),
    SamplingParams(structured_outputs=StructuredOutputs("choice", choices=("a", "b c"))),
    SamplingParams(structured_outputs=StructuredOutputs("grammar", 'root ::= "x"')),
    GenerateRequest("r1", (1, 2, 3), SamplingParams(temperature=0)),
    GenerateRequest("r2", (5,), SamplingParams(), priority=-3,
                    kv_source=KVHandle("r2", "prefill-0", (4, 9, 2**40), 17, "10.0.0.1:5555",
                                       {"rank": 0, "dtype": "bf16", "shape": [2, 8]})),
    GenerateRequest("r3", (5,), SamplingParams(), kv_source=KVHandle("r3", "p", (), 0, "")),
    TokenDelta("r1", ()),
    TokenDelta("r1", (11, 12), (TokenLogprob(11, -0.5, 1, ((11, -0.5), (3, -2.25))), TokenLogprob(12, -1e-9, 2)),
               finish_reason="stop", stop_reason=0, num_cached_tokens=16),
    TokenDelta("r1", (), finish_reason="error", error="engine shut down"),
    TokenDelta("r1", (9,), prompt_logprobs=(TokenLogprob(4, -3.5, 12, ((1, -0.25),)), TokenLogprob(5, -0.5, 1))),
    TokenLogprob(7, float("-inf"), 384, ()),
    WorkerLoad(3, 1, 0.375, 60, 96, 2**40, 12, 30, 4, 2, 7, 1),
    WorkerInfo("w", "/models/x", 16, 8192, "prefill", 2),
    KVEventBatch(0, "snapshot", ()),
    KVEventBatch(2**63, "stored", (b"\x00" * 16, bytes(range(16)))),
    KVEventBatch(5, "removed", (b"\xff" * 16,)),
]


@pytest.mark.parametrize("obj", ROUND_TRIP, ids=lambda o: type(o).__name__)
def test_codec_round_trips_through_bytes(obj):
    msg = codec.to_pb(obj)
    wire = type(msg).FromString(msg.SerializeToString())
    assert codec.from_pb(wire) == obj


def test_codec_refuses_what_the_wire_or_the_dataclass_cannot_hold():
    bad = codec.sampling_params_to_pb(SamplingParams())
    bad.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        codec.sampling_params_from_pb(bad)
    with pytest.raises(ValueError, match="n must be >= 1"):  # a peer that left a field at proto's zero
        codec.sampling_params_from_pb(pb.SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0))
    with pytest.raises(ValueError, match="out of range"):
        codec.to_pb(GenerateRequest("r", (2**31,), SamplingParams()))
    with pytest.raises(ValueError, match="JSON"):
        codec.to_pb(KVHandle("r", "p", (), 0, "", {"x": object()}))
    with pytest.raises(ValueError, match="kind"):
        codec.from_pb(pb.KVEventBatch(seq=1))
    with pytest.raises(ValueError, match="request_id"):
        codec.from_pb(pb.GenerateRequest(sampling=codec.to_pb(SamplingParams())))
    with pytest.raises(TypeError, match="no protobuf message"):
        codec.to_pb(object())


def test_router_side_client_does_not_import_torch():
    code = "import sys, shoal.router.worker_client, shoal.workers.rpc.codec; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- a server in this process -----------------------------------------------------------------------
def test_stream_equals_the_offline_engine_with_logprobs(aengine, offline):
    prompt = tuple(range(3, 30))
    params = greedy(8, logprobs=3)
    expected = offline.generate(list(prompt), params)[0].outputs[0]

    async def main():
        async with serving(aengine) as client:
            return [d async for d in client.generate(GenerateRequest("eq", prompt, params))]

    deltas = asyncio.run(main())
    assert len(deltas) > 1 and all(d.request_id == "eq" for d in deltas)
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert [t for d in deltas for t in d.token_ids] == list(expected.token_ids)
    got = [lp for d in deltas for lp in d.logprobs]
    assert [(lp.token_id, lp.rank) for lp in got] == [(lp.token_id, lp.rank) for lp in expected.logprobs]
    for g, e in zip(got, expected.logprobs):
        assert g.logprob == pytest.approx(e.logprob, abs=1e-5)
        assert len(g.top) == 3 and [t for t, _ in g.top] == [t for t, _ in e.top]
        assert [v for _, v in g.top] == pytest.approx([v for _, v in e.top], abs=1e-5)
    aengine.engine.kv_cache.check_no_leak()


def test_token_filters_and_prompt_logprobs_cross_the_wire(aengine, offline):
    prompt = tuple(range(3, 30))
    # +100 makes 17 the choice; the bad word (17, 17) bans it right after a 17: 17 every other token
    params = greedy(6, logprobs=0, prompt_logprobs=2, logit_bias={"17": 100}, bad_words_token_ids=((17, 17),),
                    allowed_token_ids=tuple(range(10, 40)))
    expected = offline.generate(list(prompt), params)[0]

    async def main():
        async with serving(aengine) as client:
            return [d async for d in client.generate(GenerateRequest("filters", prompt, params))]

    deltas = asyncio.run(main())
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == list(expected.outputs[0].token_ids)
    assert tokens[0::2] == [17] * 3 and all(10 <= t < 40 and t != 17 for t in tokens[1::2])
    got = deltas[0].prompt_logprobs  # with the first token, once
    assert all(not d.prompt_logprobs for d in deltas[1:])
    want = expected.prompt_logprobs[1:]
    assert [(lp.token_id, lp.rank, [t for t, _ in lp.top]) for lp in got] == \
        [(lp.token_id, lp.rank, [t for t, _ in lp.top]) for lp in want]
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in want], abs=1e-5)
    aengine.engine.kv_cache.check_no_leak()


def test_refused_requests_are_invalid_argument(aengine):
    async def main():
        async with serving(aengine) as client:
            with pytest.raises(ValueError, match="max_model_len"):
                [d async for d in client.generate(GenerateRequest("long", (5,) * 600, greedy(2)))]
            with pytest.raises(ValueError, match="outside the vocabulary"):
                [d async for d in client.generate(GenerateRequest("vocab", (5, 100_000), greedy(2)))]
            with pytest.raises(ValueError, match="n must be 1"):
                [d async for d in client.generate(GenerateRequest("n2", (5, 6), SamplingParams(n=2)))]
            # The status code itself, as any gRPC client sees it.
            async with grpc.aio.insecure_channel(client.endpoint) as channel:
                msg = codec.to_pb(GenerateRequest("raw", (5, 6), greedy(2)))
                msg.sampling.top_p = 0.0
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [m async for m in pb_grpc.WorkerStub(channel).Generate(msg)]
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()
            assert await client.health()  # a bad request is not a sick worker

    asyncio.run(main())
    aengine.engine.kv_cache.check_no_leak()


def test_cancelling_the_stream_aborts_on_the_worker(aengine):
    sched = aengine.engine.scheduler

    async def main():
        async with serving(aengine) as client:
            steps_before = sched.stats.num_steps
            stream = client.generate(GenerateRequest("cancel-me", tuple(range(3, 40)), greedy(400)))
            first = await stream.__anext__()
            assert first.token_ids and first.finish_reason is None
            await stream.aclose()  # the router's client went away
            await wait_until(lambda: "cancel-me" not in sched.requests, 2.0, "abort on the worker")
            # Aborted, not run to its 400 tokens.
            assert sched.stats.num_steps - steps_before < 100

    asyncio.run(main())
    aengine.engine.kv_cache.check_no_leak()


def test_a_client_closed_mid_stream_fails_the_stream_instead_of_cancelling_it(aengine):
    """The router closes a worker's client when the worker leaves etcd membership (a hang restart,
    a drain). A stream still reading from it must end as a worker failure the router answers its
    client with, not as a CancelledError the router would take for its own cancellation."""
    sched = aengine.engine.scheduler

    async def read_all(stream) -> None:
        async for _ in stream:
            pass

    async def main():
        async with serving(aengine) as client:
            stream = client.generate(GenerateRequest("orphan", tuple(range(3, 40)), greedy(400)))
            assert (await stream.__anext__()).finish_reason is None
            reader = asyncio.ensure_future(read_all(stream))
            await asyncio.sleep(0.05)  # mid-stream: 400 tokens take longer
            await client.close()
            with pytest.raises(WorkerUnavailable) as err:
                await reader
            assert err.value.started and err.value.code == "UNAVAILABLE"
            await wait_until(lambda: "orphan" not in sched.requests, 2.0, "abort on the worker")
            # A task that is itself cancelled still sees its cancellation.
            reader = asyncio.ensure_future(read_all(client.generate(
                GenerateRequest("cancelled", tuple(range(3, 40)), greedy(400)))))
            await asyncio.sleep(0.05)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            await wait_until(lambda: "cancelled" not in sched.requests, 2.0, "abort on the worker")

    asyncio.run(main())
    aengine.engine.kv_cache.check_no_leak()


def test_rpcs_answer_while_the_engine_steps(aengine):
    async def main():
        async with serving(aengine) as client:
            stream = client.generate(GenerateRequest("busy", tuple(range(50, 90)), greedy(400)))
            await stream.__anext__()
            t0 = time.monotonic()
            load, info, healthy = await client.get_load(), await client.get_info(), await client.health()
            latency = time.monotonic() - t0
            await stream.aclose()
            await wait_until(lambda: not aengine.engine.core.has_unfinished_requests(), 2.0, "abort")
        return load, info, healthy, latency

    load, info, healthy, latency = asyncio.run(main())
    assert load.num_running == 1 and load.num_total_blocks == 96 and load.kv_usage > 0
    assert info == WorkerInfo("w-test", aengine.engine.config.model, 8, 512)
    assert healthy and latency < 1.0
    aengine.engine.kv_cache.check_no_leak()


def test_kv_events_snapshot_then_consecutive_deltas(aengine):
    prompt = tuple(range(100, 140))

    async def main():
        async with serving(aengine) as client:
            events = client.kv_events()
            snap = await asyncio.wait_for(events.__anext__(), 5)
            assert snap.kind == "snapshot"
            [d async for d in client.generate(GenerateRequest("kv", prompt, greedy(1)))]
            stored, seq = set(), snap.seq
            while not set(block_hashes(prompt, 8)) <= stored:
                batch = await asyncio.wait_for(events.__anext__(), 5)
                assert batch.seq == seq + 1, "a gap in the KV event sequence"
                seq = batch.seq
                if batch.kind == "stored":
                    stored |= set(batch.block_hashes)
            # A new subscriber's snapshot already has the prompt's blocks.
            second = client.kv_events()
            snap2 = await asyncio.wait_for(second.__anext__(), 5)
            assert set(block_hashes(prompt, 8)) <= set(snap2.block_hashes) and snap2.seq >= seq
            await events.aclose()
            await second.aclose()
            await wait_until(lambda: aengine.num_kv_subscribers == 0, 2.0, "unsubscribe on the worker")

    asyncio.run(main())


def test_health_follows_the_engine_loop_not_the_server(tiny_path):
    engine = make_engine(tiny_path, worker_id="dying")

    async def main():
        async with serving(engine, rpc_timeout_s=5.0) as client:
            assert await client.health()
            events = client.kv_events()
            assert (await events.__anext__()).kind == "snapshot"
            await asyncio.to_thread(engine.shutdown)
            assert not await client.health()
            assert "not running" in client.last_health_error
            with pytest.raises(WorkerUnavailable) as err:  # the open subscription ends, it does not hang
                await asyncio.wait_for(events.__anext__(), 5)
            assert err.value.started
            t0 = time.monotonic()
            with pytest.raises(WorkerUnavailable, match="not running") as err:
                [d async for d in client.generate(GenerateRequest("late", (5, 6), greedy(2)))]
            assert not err.value.started and time.monotonic() - t0 < 2.0
            assert (await client.get_info()).worker_id == "dying"  # the server itself still answers

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


class EngineThreadClock:
    """Real time, except that the engine thread can be made to see a frozen time: a step it begins
    then looks as if it began long ago, which is how a wedged step looks to ``AsyncEngine.alive()``."""

    def __init__(self):
        self.frozen_at: float | None = None

    def __call__(self) -> float:
        if self.frozen_at is not None and threading.current_thread().name.startswith("shoal-engine"):
            return self.frozen_at
        return time.monotonic()


def test_a_wedged_engine_loop_ends_open_streams(tiny_path):
    clock = EngineThreadClock()
    engine = make_engine(tiny_path, worker_id="wedged", clock=clock)

    async def main():
        async with serving(engine) as client:
            events = client.kv_events()
            assert (await events.__anext__()).kind == "snapshot"
            # A step (here: an engine-thread call that blocks) that began 200 s ago and has not ended.
            # An idle loop is never wedged, however long it waits: only work in progress can be.
            gate = threading.Event()
            clock.frozen_at = time.monotonic() - 200
            engine.call_soon(lambda _: gate.wait(30))
            t0 = time.monotonic()
            with pytest.raises(WorkerUnavailable, match="not running"):
                await asyncio.wait_for(events.__anext__(), 5)  # the server's watchdog, not this timeout
            assert time.monotonic() - t0 < 3.0
            assert not await client.health()
            clock.frozen_at = None
            gate.set()
            await wait_until(engine.alive, 1.0, "heartbeat")
            assert await client.health()

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


# -- the worker process ------------------------------------------------------------------------------
@contextlib.contextmanager
def worker_process(path: str, tmp_path: Path, *extra: str):
    """``python -m shoal.workers.server`` on a free port; yields (process, endpoint). Always killed."""
    log = open(tmp_path / "worker.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "shoal.workers.server", "--port", "0", "--worker-id", "proc-1", "--model", path,
           "--device", "cpu", "--dtype", "float32", "--block-size", "8", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        line = ""
        while not line.startswith("READY"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker never printed READY:\n{(tmp_path / 'worker.log').read_text()}")
            if sel.select(timeout=0.1):
                line = proc.stdout.readline()
        yield proc, line.split()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        log.close()


def test_worker_process_serves_then_exits_cleanly_on_sigterm(tiny_path, tmp_path):
    args = ("--max-model-len", "256", "--num-kv-blocks", "64", "--grace-s", "20")
    with worker_process(tiny_path, tmp_path, *args) as (proc, endpoint):
        async def main():
            client = GrpcWorkerClient("proc-1", endpoint)
            info = await client.get_info()
            deltas = [d async for d in client.generate(GenerateRequest("p", tuple(range(3, 20)), greedy(4)))]
            events = client.kv_events()
            assert (await events.__anext__()).kind == "snapshot"
            proc.send_signal(signal.SIGTERM)
            # An open KV event stream ends at once; it does not hold the process for the grace period.
            with pytest.raises(WorkerUnavailable, match="shutting down"):
                await asyncio.wait_for(events.__anext__(), 5)
            await client.close()
            return info, deltas

        t0 = time.monotonic()
        info, deltas = asyncio.run(main())
        assert info.worker_id == "proc-1" and info.max_model_len == 256
        assert sum(len(d.token_ids) for d in deltas) == 4 and deltas[-1].finish_reason == "length"
        assert proc.wait(15) == 0 and time.monotonic() - t0 < 10


def test_hung_or_killed_worker_raises_worker_unavailable_without_hanging(tiny_path, tmp_path):
    args = ("--max-model-len", "1024", "--num-kv-blocks", "160")
    with worker_process(tiny_path, tmp_path, *args) as (proc, endpoint):
        async def main():
            client = GrpcWorkerClient("proc-1", endpoint, connect_timeout_s=1.0, rpc_timeout_s=1.0)
            impatient = GrpcWorkerClient("proc-1", endpoint, first_token_timeout_s=0.5)
            stream = client.generate(GenerateRequest("long", tuple(range(3, 20)), greedy(900)))
            await stream.__anext__()

            proc.send_signal(signal.SIGSTOP)  # hung: the kernel still accepts, nobody answers
            t0 = time.monotonic()
            with pytest.raises(WorkerUnavailable, match="first token") as err:
                [d async for d in impatient.generate(GenerateRequest("hung", (5, 6), greedy(2)))]
            assert err.value.code == "DEADLINE_EXCEEDED" and not err.value.started
            with pytest.raises(WorkerUnavailable) as err:
                await client.get_load()
            assert err.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - t0 < 3.0

            proc.kill()  # SIGKILL: the kernel closes the sockets, no goodbye from the worker
            t0 = time.monotonic()
            with pytest.raises(WorkerUnavailable) as err:
                async for _ in stream:
                    pass
            assert err.value.started  # part of the answer went out: end the stream with an error
            with pytest.raises(WorkerUnavailable) as err:
                [d async for d in client.generate(GenerateRequest("retry", (5, 6), greedy(2)))]
            assert not err.value.started  # nothing went out: the router may retry elsewhere
            assert not await client.health()
            assert time.monotonic() - t0 < 3.0
            await client.close()
            await impatient.close()

        asyncio.run(main())
