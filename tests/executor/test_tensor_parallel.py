"""Tensor parallelism on CPU (gloo): TP=2 generates exactly what TP=1 does, shards are the right
slices, models that cannot split are refused before any process starts, and the workers leave
nothing behind: not after a clean shutdown, not after one of them is killed mid-run."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from tiny_models import TINY_ARCHS, TINY_COMMON, make_prompts

from shoal.workers import LLM, SamplingParams
from shoal.workers.config import EngineConfig
from shoal.workers.executor.model_runner import allocate_kv_caches
from shoal.workers.executor.tensor_parallel import (
    apply_tensor_parallel,
    load_model_shard,
    PAD,
    shard_tensor,
    tp_layout,
)
from shoal.workers.executor.tp_group import TPWorkerError
from shoal.workers.models.config import ModelConfig
from shoal.workers.models.fusion import hf_state_dict
from shoal.workers.models.llama import LlamaForCausalLM
from shoal.workers.models.loader import iter_safetensors, load_model, resolve_model
from shoal.workers.models.ops import REFERENCE_OPS

ARCHS = ["llama", "qwen2", "qwen3"]  # qwen2: qkv bias + tied embeddings; qwen3: 1 KV head < 2 ranks
MAX_TOKENS = 12
# A small token budget: chunked prefill and mixed prefill/decode steps go through the TP path too.
ENGINE = dict(device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=256, max_num_batched_tokens=64)
CPU = torch.device("cpu")


def load_full(path: str, **kw):
    return load_model(resolve_model(path), dtype=torch.float32, device=CPU, ops=REFERENCE_OPS, **kw)


def load_shard(path: str, rank: int, world_size: int = 2, **kw):
    return load_model_shard(resolve_model(path), dtype=torch.float32, device=CPU, ops=REFERENCE_OPS,
                            rank=rank, world_size=world_size, **kw)


# -- shards, in this process (the transform needs no process group until forward) --------------------


def load_unfused(path: str):
    """The model as the checkpoint lays it out (separate q/k/v and gate/up), unlike ``load_model``."""
    source = resolve_model(path)
    model = LlamaForCausalLM(ModelConfig.from_hf(source.hf_config), REFERENCE_OPS)
    model.load_weights(iter_safetensors(source.path, torch.float32))
    return model


@pytest.fixture(scope="module")
def llama_with_bias(tmp_path_factory):
    """Tiny Llama with ``attention_bias``: o_proj has a bias, which row parallelism must add only once."""
    import transformers

    path = tmp_path_factory.mktemp("tiny-llama-bias")
    cfg = transformers.LlamaConfig(**{**TINY_COMMON, **TINY_ARCHS["llama"][2], "attention_bias": True})
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # HF initialises biases to zero, which would hide a bias added twice
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def odd_heads(tmp_path_factory):
    """Tiny Qwen2 (q/k/v biases, tied embeddings) shaped like SmolLM2: 9 query heads over 3 KV heads,
    which two ranks cannot split evenly."""
    import transformers

    path = tmp_path_factory.mktemp("tiny-odd-heads")
    cfg = transformers.Qwen2Config(**{**TINY_COMMON, **TINY_ARCHS["qwen2"][2], "num_attention_heads": 9,
                                      "num_key_value_heads": 3, "head_dim": 8})
    torch.manual_seed(2)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # nonzero, so a bias left on a padding slot would show
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return str(path), model


def checkpoint(request, arch: str):
    if arch == "llama-bias":
        return request.getfixturevalue("llama_with_bias")
    if arch == "odd-heads":
        return request.getfixturevalue("odd_heads")
    return request.getfixturevalue("tiny_checkpoints")[arch]


@pytest.mark.parametrize("arch", ARCHS + ["llama-bias"])
def test_shards_are_the_right_slices(request, arch):
    path, _ = checkpoint(request, arch)
    full = load_full(path)  # fused q/k/v and gate/up, as the engine runs it
    cfg = full.config
    hd, kv, heads = cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads
    w = hf_state_dict(full)  # HF name -> full tensor
    for rank in range(2):
        loaded = load_shard(path, rank)  # streamed from safetensors through get_slice, then fused
        got = hf_state_dict(loaded)
        # Sharding a loaded model, fused or not, gives the same shard as loading only the shard.
        for model in (copy.deepcopy(full), load_unfused(path)):
            want = hf_state_dict(apply_tensor_parallel(model, rank, 2))
            assert got.keys() == want.keys() == w.keys()
            for name in got:
                assert torch.equal(got[name], want[name]), name
        layer = "model.layers.1."
        q_rows = slice(rank * heads // 2 * hd, (rank + 1) * heads // 2 * hd)
        inter = slice(rank * cfg.intermediate_size // 2, (rank + 1) * cfg.intermediate_size // 2)
        # Replicated when there are fewer KV heads than ranks: each rank holds the one its query heads read.
        kv_rows = slice(None) if kv == 1 else slice(rank * kv // 2 * hd, (rank + 1) * kv // 2 * hd)
        expected = {  # HF tensor -> the slice of it this rank must hold
            "self_attn.q_proj.weight": q_rows, "self_attn.k_proj.weight": kv_rows,
            "self_attn.v_proj.weight": kv_rows, "self_attn.o_proj.weight": (slice(None), q_rows),
            "mlp.up_proj.weight": inter, "mlp.down_proj.weight": (slice(None), inter)}
        if cfg.attention_bias:
            expected.update({"self_attn.q_proj.bias": q_rows, "self_attn.k_proj.bias": kv_rows})
        if layer + "self_attn.o_proj.bias" in w:  # whole on every rank: added once, after the all-reduce
            expected["self_attn.o_proj.bias"] = slice(None)
        for name, rows in expected.items():
            assert torch.equal(got[layer + name], w[layer + name][rows]), name
        vocab = slice(rank * cfg.vocab_size // 2, (rank + 1) * cfg.vocab_size // 2)
        assert torch.equal(got["model.embed_tokens.weight"], w["model.embed_tokens.weight"][vocab])
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == cfg.tie_word_embeddings
        assert torch.equal(loaded.cos_sin_cache, full.cos_sin_cache)
        assert loaded.model.layers[0].self_attn.qkv_proj is not None  # the shard is fused too
        # The KV cache of a shard holds only its own KV heads.
        k_cache, _ = allocate_kv_caches(loaded, 2, 16, torch.float32, CPU)[0]
        assert k_cache.shape == (2, 16, max(kv // 2, 1), hd)


def test_dummy_shards_are_slices_of_the_dummy_model(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen2"]
    full = load_full(path, load_format="dummy", seed=7)
    for rank in range(2):
        got = hf_state_dict(load_shard(path, rank, load_format="dummy", seed=7))
        want = hf_state_dict(apply_tensor_parallel(copy.deepcopy(full), rank, 2))
        for name, tensor in got.items():
            assert torch.equal(tensor, want[name]), name


def test_kv_heads_replicate_when_ranks_outnumber_them(tiny_checkpoints):
    """4 query heads, 2 KV heads, 4 ranks: ranks 0-1 hold KV head 0, ranks 2-3 hold KV head 1."""
    path, _ = tiny_checkpoints["llama"]
    full = load_full(path)
    hd = full.config.head_dim
    k_full = hf_state_dict(full)["model.layers.0.self_attn.k_proj.weight"]  # [2 * hd, hidden]
    for rank in range(4):
        layout = tp_layout(full.config, rank, 4)
        assert (layout.q_heads, layout.kv_heads) == ((rank,), (rank // 2,))
        shard = hf_state_dict(apply_tensor_parallel(copy.deepcopy(full), rank, 4))
        kv_head = rank // 2
        k_shard = shard["model.layers.0.self_attn.k_proj.weight"]
        assert torch.equal(k_shard, k_full[kv_head * hd:(kv_head + 1) * hd])


SMOLLM2_SHAPE = ModelConfig("LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64)


def test_heads_that_do_not_split_evenly_get_padding_slots():
    """SmolLM2's 9 query heads (3 per KV head) in two: each rank owns 5 or 4 and holds both KV heads
    its heads read, 3 query slots per KV head, the unowned ones padding."""
    layouts = [tp_layout(SMOLLM2_SHAPE, r, 2) for r in range(2)]
    assert [(lay.q_heads, lay.kv_heads) for lay in layouts] == [
        ((0, 1, 2, 3, PAD, PAD), (0, 1)), ((4, 5, PAD, 6, 7, 8), (1, 2))]
    for world_size in (2, 3, 4, 6):  # every head owned exactly once; the same shapes on every rank
        layouts = [tp_layout(SMOLLM2_SHAPE, r, world_size) for r in range(world_size)]
        owned = sorted(h for lay in layouts for h in lay.q_heads if h != PAD)
        assert owned == list(range(9))
        assert len({(lay.num_q_heads, lay.num_kv_heads) for lay in layouts}) == 1
        for lay in layouts:  # each query slot reads the KV head it is laid out under
            per_kv = lay.num_q_heads // lay.num_kv_heads
            assert all(h == PAD or h // 3 == lay.kv_heads[slot // per_kv] for slot, h in enumerate(lay.q_heads))
    assert tp_layout(SMOLLM2_SHAPE, 0, 3).q_heads == (0, 1, 2)  # an even split has no padding


def test_padding_slots_are_zero_rows(odd_heads):
    path, _ = odd_heads
    full = load_full(path)
    hd = full.config.head_dim
    w = hf_state_dict(full)
    for rank in range(2):
        got = hf_state_dict(load_shard(path, rank))  # streamed from safetensors, then fused
        assert got.keys() == w.keys()
        want = hf_state_dict(apply_tensor_parallel(copy.deepcopy(full), rank, 2))
        for name in got:
            assert torch.equal(got[name], want[name]), name
        layout = tp_layout(full.config, rank, 2)
        for name, dim in (("q_proj.weight", 0), ("q_proj.bias", 0), ("o_proj.weight", 1)):
            shard, whole = got[f"model.layers.0.self_attn.{name}"], w[f"model.layers.0.self_attn.{name}"]
            for slot, h in enumerate(layout.q_heads):
                part = shard.narrow(dim, slot * hd, hd)
                assert torch.equal(part, torch.zeros_like(part) if h == PAD else whole.narrow(dim, h * hd, hd))


def test_vocab_is_padded_with_zero_rows():
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=383, hidden_size=8, intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    table = torch.randn(383, 8)
    last = shard_tensor(tp_layout(cfg, 1, 2), "model.embed_tokens.weight", table)
    assert last.shape == (192, 8)
    assert torch.equal(last[:191], table[192:]) and not last[191].any()


# -- refusals ----------------------------------------------------------------------------------------


def test_models_that_cannot_split_are_refused(tiny_checkpoints):
    tiny = ModelConfig.from_hf(resolve_model(tiny_checkpoints["llama"][0]).hf_config)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(5\) must be <= num_attention_heads \(4\)"):
        tp_layout(tiny, 0, 5)
    with pytest.raises(ValueError, match=r"intermediate_size \(128\) must be divisible by tensor_parallel_size \(3\)"):
        tp_layout(tiny, 0, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(model="x", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="intermediate_size"):
        LLM(tiny_checkpoints["llama"][0], tensor_parallel_size=3, **ENGINE)
    assert multiprocessing.active_children() == [] and not dist.is_initialized()


# -- two ranks in two processes ----------------------------------------------------------------------


def generate(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def assert_clean_shutdown(llm) -> None:
    executor = llm.engine.tp
    llm.engine.shutdown()
    llm.engine.shutdown()  # idempotent
    assert [p.exitcode for p in executor.processes] == [0]  # left on the shutdown message, not killed
    assert executor.num_diverged == {1: 0}  # rank 1 sampled rank 0's tokens at every step
    assert multiprocessing.active_children() == [] and not dist.is_initialized()
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the rendezvous port any more
        socket.create_connection(("127.0.0.1", executor.port), timeout=2).close()


@pytest.mark.parametrize("arch", ARCHS + ["llama-bias", "odd-heads"])
def test_tp2_generates_what_tp1_does(request, arch):
    """An engine per test, not a shared fixture: a process holds one TP group at a time, xdist or not."""
    path, hf = checkpoint(request, arch)
    prompts = make_prompts(hf.config.vocab_size)
    tp1 = LLM(path, **ENGINE)
    tp2 = LLM(path, tensor_parallel_size=2, **ENGINE)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        expected = generate(tp1, prompts, greedy)
        for _ in range(2):  # the second round runs against a warm prefix cache
            assert generate(tp2, prompts, greedy) == expected
            tp2.engine.kv_cache.check_no_leak()
        seeded = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=MAX_TOKENS,
                                 ignore_eos=True) for i in range(len(prompts))]
        assert generate(tp2, prompts, seeded) == generate(tp1, prompts, seeded)
        # Unseeded rows draw from the engine's shared generator, seeded alike on every rank.
        generate(tp2, prompts, SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    finally:
        tp2.engine.shutdown()
    assert_clean_shutdown(tp2)


def test_smollm2_tp2_generates_what_tp1_does(smollm2_path):
    """The bundled model, whose 9 query heads split 5 + 4 with padding slots, from its GGUF file."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    engine = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tp1 = LLM(str(smollm2_path), **engine)
    expected = generate(tp1, prompts, greedy)
    tp1.engine.shutdown()
    tp2 = LLM(str(smollm2_path), tensor_parallel_size=2, **engine)
    try:
        assert generate(tp2, prompts, greedy) == expected
        tp2.engine.kv_cache.check_no_leak()
    finally:
        tp2.engine.shutdown()
    assert_clean_shutdown(tp2)


FRESH_PROCESS = """
import json, multiprocessing, socket, sys
import torch.distributed as dist
from shoal.workers import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2, device="cpu", dtype="float32", num_kv_blocks=32)
    tokens = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids
    executor = llm.engine.tp
    llm.engine.shutdown()
    try:
        socket.create_connection(("127.0.0.1", executor.port), timeout=2).close()
        port_open = True
    except ConnectionRefusedError:
        port_open = False
    print(json.dumps(dict(tokens=len(tokens), port_open=port_open, group=dist.is_initialized(),
                          children=len(multiprocessing.active_children()))))
"""


def test_shutdown_in_a_fresh_process_frees_the_port(tiny_checkpoints, tmp_path):
    """In a process that has not imported torch's lazy distributed modules yet (a server, unlike pytest
    after transformers), nothing may pin the group and its port after shutdown."""
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script), tiny_checkpoints["llama"][0]], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == dict(tokens=3, port_open=False, group=False,
                                                                  children=0)


def test_a_killed_worker_fails_the_step_instead_of_hanging(tiny_checkpoints):
    path, hf = tiny_checkpoints["llama"]
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    try:
        prompts = make_prompts(hf.config.vocab_size)[:3]
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        generate(llm, prompts, params)
        worker = llm.engine.tp.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(5)
        start = time.monotonic()
        with pytest.raises(TPWorkerError, match="rank 1 exited with code -9"):
            generate(llm, prompts, params)
        assert time.monotonic() - start < 5
        with pytest.raises(TPWorkerError, match="group is down"):
            llm.engine.step()
    finally:
        llm.engine.shutdown()
    assert multiprocessing.active_children() == [] and not dist.is_initialized()
