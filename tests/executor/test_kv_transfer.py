"""KV transfer between a prefill and a decode engine: the decode engine, fed the prompt's blocks,
generates exactly what a unified engine does while computing only the prompt's tail; only blocks it
lacks travel; nothing leaks on either side; the same holds across two processes over gloo."""

from __future__ import annotations

import os
import random
import runpy
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import make_tiny_checkpoint

from shoal.workers import LLM, SamplingParams
from shoal.workers.executor.kv_transfer import (
    KVSink,
    KVSource,
    KVLink,
    KVTransferError,
    LinkStore,
    gather_blocks,
    recv_blocks,
    scatter_blocks,
    send_blocks,
    transfer_in_process,
)

BLOCK = 16
PROMPT_LEN = 70  # 4 full blocks travel (64 tokens), 6 tokens stay to compute on the decode side
MAX_TOKENS = 8
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=32, block_size=BLOCK)
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
PREFILL_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def make_prompt(seed: int = 0, n: int = PROMPT_LEN) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def tail_tokens(prompt_len: int, hit_tokens: int) -> int:
    """Tokens the decode engine computes: the prompt past the hits, then one per later output token."""
    return prompt_len - hit_tokens + MAX_TOKENS - 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-kv")
    make_tiny_checkpoint("llama", path)
    return str(path)


@pytest.fixture(scope="module")
def expected(checkpoint):
    """What one unified engine generates for the prompt."""
    llm = LLM(checkpoint, **ENGINE)
    return llm.generate(make_prompt(), GREEDY)[0].outputs[0].token_ids


def prefill(checkpoint: str, prompt: list[int]) -> tuple[LLM, KVSource]:
    llm = LLM(checkpoint, **ENGINE)
    llm.generate(prompt, PREFILL_ONLY)  # the prompt's full blocks are now in the prefix cache
    return llm, KVSource.of_engine(llm.engine)


def generate_counting(llm: LLM, prompt: list[int]) -> tuple[list[int], int, int]:
    """(tokens, tokens the model computed, prefix-hit tokens) of one greedy request."""
    stats = llm.engine.stats
    computed0 = stats.num_computed_tokens
    out = llm.generate(prompt, GREEDY)[0]
    return out.outputs[0].token_ids, stats.num_computed_tokens - computed0, out.num_cached_tokens


# -- in one process -----------------------------------------------------------------------------------


def test_gather_scatter_round_trip(checkpoint):
    llm = LLM(checkpoint, **ENGINE)
    caches = llm.engine.runner.kv_caches
    for k, v in caches:
        k.normal_(), v.normal_()
    data = gather_blocks(caches, [5, 1, 7])
    assert data.shape == (len(caches), 2, 3, BLOCK, 2, 16)
    scatter_blocks(caches, [20, 21, 22], data)
    for k, v in caches:
        assert torch.equal(k[[20, 21, 22]], k[[5, 1, 7]]) and torch.equal(v[[20, 21, 22]], v[[5, 1, 7]])
    with pytest.raises(ValueError, match="shape"):
        scatter_blocks(caches, [20, 21], data)


def test_transferred_prefix_decodes_exactly(checkpoint, expected):
    prompt = make_prompt()
    llm_a, source = prefill(checkpoint, prompt)
    llm_b = LLM(checkpoint, **ENGINE)
    exported = source.pin(prompt)
    stats = transfer_in_process(source, KVSink.of_engine(llm_b.engine), exported, prompt)
    source.release(exported)
    assert (stats.num_blocks, stats.num_sent) == (4, 4)

    tokens, computed, cached = generate_counting(llm_b, prompt)
    assert tokens == expected
    assert cached == 4 * BLOCK and computed == tail_tokens(PROMPT_LEN, 4 * BLOCK)
    llm_a.engine.kv_cache.check_no_leak()
    llm_b.engine.kv_cache.check_no_leak()


def test_partial_hit_sends_only_missing_blocks(checkpoint, expected):
    prompt = make_prompt()
    llm_a, source = prefill(checkpoint, prompt)
    llm_b = LLM(checkpoint, **ENGINE)
    llm_b.generate(prompt[:40], PREFILL_ONLY)  # B already caches blocks 0 and 1
    exported = source.pin(prompt)
    stats = transfer_in_process(source, KVSink.of_engine(llm_b.engine), exported, prompt)
    source.release(exported)
    assert (stats.num_sent, stats.num_skipped) == (2, 2)

    tokens, computed, cached = generate_counting(llm_b, prompt)
    assert tokens == expected
    assert cached == 4 * BLOCK and computed == tail_tokens(PROMPT_LEN, 4 * BLOCK)
    llm_a.engine.kv_cache.check_no_leak()
    llm_b.engine.kv_cache.check_no_leak()


def test_imported_data_is_what_decode_attends_to(checkpoint, expected):
    """Publishing zeros under the right hashes changes the output: the test above can fail."""
    prompt = make_prompt()
    llm_b = LLM(checkpoint, **ENGINE)
    sink = KVSink.of_engine(llm_b.engine)
    pending = sink.begin(prompt)
    sink.commit(pending, torch.zeros(sink.geometry.data_shape(len(pending.missing))))
    tokens, _, cached = generate_counting(llm_b, prompt)
    assert cached == 4 * BLOCK and tokens != expected
    llm_b.engine.kv_cache.check_no_leak()


def test_refusals_leave_nothing_behind(checkpoint):
    prompt = make_prompt()
    llm_a = LLM(checkpoint, **ENGINE)
    source = KVSource.of_engine(llm_a.engine)
    with pytest.raises(KVTransferError, match="not in the prefill engine's prefix cache"):
        source.pin(prompt)  # never computed
    llm_a.engine.kv_cache.check_no_leak()

    small = LLM(checkpoint, **{**ENGINE, "num_kv_blocks": 3})
    sink = KVSink.of_engine(small.engine)
    with pytest.raises(KVTransferError, match="3 free KV blocks, the transfer needs 4"):
        sink.begin(prompt)
    pending = sink.begin(prompt[:50])  # 3 blocks fit; abort returns them unpublished
    sink.abort(pending)
    assert small.engine.kv_cache.pool.num_cached_blocks == 0
    small.engine.kv_cache.check_no_leak()

    other = LLM(checkpoint, **{**ENGINE, "block_size": 8, "num_kv_blocks": 64})
    llm_a.generate(prompt, PREFILL_ONLY)
    exported = source.pin(prompt)
    with pytest.raises(ValueError, match="geometry differs"):
        transfer_in_process(source, KVSink.of_engine(other.engine), exported, prompt)
    source.release(exported)
    llm_a.engine.kv_cache.check_no_leak()
    other.engine.kv_cache.check_no_leak()


# -- two processes over gloo ----------------------------------------------------------------------------

CHILD_RUN_NAME = "__kv_transfer_child__"


def _child(role: str, checkpoint: str, port: int, results) -> None:
    torch.set_num_threads(1)
    prompt = make_prompt()
    llm = LLM(checkpoint, **ENGINE)
    timeout = timedelta(seconds=20)
    try:
        if role == "prefill":
            llm.generate(prompt, PREFILL_ONLY)
            source = KVSource.of_engine(llm.engine)
            exported = source.pin(prompt)
            link = KVLink.connect("t", 0, "127.0.0.1", port, timeout=timeout)
            # The indices come out of band (the workers' PullKV); here, one int64 message on the link.
            count = link.recv(torch.empty(1, dtype=torch.int64), tag=1)
            indices = link.recv(torch.empty(int(count), dtype=torch.int64), tag=2).tolist()
            stats = send_blocks(link, source, exported, indices, tag=3)
            source.release(exported)
            llm.engine.kv_cache.check_no_leak()
            results.put((role, stats.num_sent))
        else:
            sink = KVSink.of_engine(llm.engine)
            link = KVLink.connect("t", 1, "127.0.0.1", port, timeout=timeout)
            pending = sink.begin(prompt)
            link.send(torch.tensor([len(pending.missing)]), tag=1)
            link.send(torch.tensor(pending.missing, dtype=torch.int64), tag=2)
            stats = recv_blocks(link, sink, pending, tag=3)
            tokens, computed, cached = generate_counting(llm, prompt)
            llm.engine.kv_cache.check_no_leak()
            results.put((role, (stats.num_sent, tokens, computed, cached)))
        link.close()
    except BaseException as e:
        results.put((role, f"error: {e!r}"))
        raise


if __name__ == CHILD_RUN_NAME:  # a spawned process running this file through runpy
    _child(**CHILD_ARGS)  # noqa: F821  (injected by runpy.run_path's init_globals)


def test_transfer_across_processes_over_gloo(checkpoint, expected):
    store = LinkStore(timeout=timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # The test module is not importable by name in a child (pytest's importlib mode), so each child
    # runs this file with runpy; tests/ is on sys.path (conftest), which spawn hands down.
    procs = [ctx.Process(target=runpy.run_path, args=(os.path.abspath(__file__),), daemon=True,
                         kwargs=dict(run_name=CHILD_RUN_NAME, init_globals=dict(
                             CHILD_ARGS=dict(role=role, checkpoint=checkpoint, port=store.port,
                                             results=results))))
             for role in ("prefill", "decode")]
    try:
        for p in procs:
            p.start()
        got = {}
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                role, value = results.get(timeout=1)
                got[role] = value
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1))
        assert got.get("prefill") == 4, got
        num_sent, tokens, computed, cached = got["decode"]
        assert num_sent == 4 and tokens == expected
        assert cached == 4 * BLOCK and computed == tail_tokens(PROMPT_LEN, 4 * BLOCK)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del store


def test_silent_peer_times_out_and_import_is_undone(checkpoint):
    """The prefill side connects but never sends: the decode side gives up after the link's timeout
    and returns its reserved blocks; the broken link refuses further use."""
    import threading

    prompt = make_prompt()
    llm_b = LLM(checkpoint, **ENGINE)
    sink = KVSink.of_engine(llm_b.engine)
    store = LinkStore(timeout=timedelta(seconds=10))
    timeout = timedelta(seconds=1)
    peer = {}
    t = threading.Thread(target=lambda: peer.setdefault("link", KVLink("s", 0, store.store, timeout=timeout)))
    t.start()
    link = KVLink.connect("s", 1, "127.0.0.1", store.port, timeout=timeout)
    t.join(timeout=10)
    start = time.monotonic()
    pending = sink.begin(prompt)
    assert pending.missing
    with pytest.raises(KVTransferError, match="timed out"):
        recv_blocks(link, sink, pending, tag=5)
    assert time.monotonic() - start < 5
    llm_b.engine.kv_cache.check_no_leak()
    assert llm_b.engine.kv_cache.pool.num_cached_blocks == 0
    with pytest.raises(KVTransferError, match="failed earlier"):
        recv_blocks(link, sink, sink.begin(prompt), tag=6)
    llm_b.engine.kv_cache.check_no_leak()
    link.close(), peer["link"].close()
    store.close()
