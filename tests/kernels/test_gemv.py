"""The skinny GEMM (``kernels/gemv.py``) against ``reference.gemv``: M = 1..8, odd N and K tails, bias,
split-K, the tl.dot and FMA paths, the fused SiLU-and-mul epilogue, and the static cuBLAS/Triton choice."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels import gemv as G
from shoal.kernels import reference

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _inputs(m, n, k, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _check(got, want, dtype):
    atol, rtol = TOL[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


CONFIGS = [
    G.GemvConfig(block_n=16, block_k=32, split_k=1, num_warps=4),
    G.GemvConfig(block_n=8, block_k=16, split_k=4, num_warps=2),
    G.GemvConfig(block_n=16, block_k=16, split_k=2, num_warps=4, dot=True),
]


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["fma", "fma-split4", "dot-split2"])
def test_gemv_odd_tails(m, cfg):
    # N = 37 and K = 83: a partial column block and a partial K chunk in the last split
    x, w, b = _inputs(m, 37, 83, torch.float32, bias=False, seed=m)
    _check(G.gemv(x, w, config=cfg), reference.gemv(x, w), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_dtypes_and_bias(dtype, bias):
    x, w, b = _inputs(4, 48, 128, dtype, bias)
    for cfg in (G.GemvConfig(block_n=16, block_k=32, split_k=2), G.GemvConfig(block_n=16, block_k=32, dot=True)):
        _check(G.gemv(x, w, b, config=cfg), reference.gemv(x, w, b), dtype)


def test_gemv_even_shapes_and_default_config():
    # divisible shapes take the unmasked loads; the default config splits K here
    x, w, b = _inputs(1, 64, 1024, torch.bfloat16, bias=True)
    cfg = G.default_config(64, 1024, 1)
    assert cfg.split_k > 1
    _check(G.gemv(x, w, b), reference.gemv(x, w, b), torch.bfloat16)
    _check(G.gemv(x, w, b, config=G.GemvConfig(block_n=16, block_k=64, split_k=4)), reference.gemv(x, w, b),
           torch.bfloat16)


def test_split_k_is_deterministic_and_counters_reset():
    x, w, _ = _inputs(2, 40, 200, torch.float32, bias=False)
    cfg = G.GemvConfig(block_n=8, block_k=16, split_k=8)
    first = G.gemv(x, w, config=cfg)
    for _ in range(3):  # the counters are back to zero after each call, else the epilogue would not run
        assert torch.equal(G.gemv(x, w, config=cfg), first)
    counters = G._COUNTERS.get(x.device, 1)
    assert int(counters.abs().sum()) == 0


def test_strided_rows():
    # a view with a row stride (e.g. attention output reshaped, or a slice of a bigger buffer)
    x_big, w, _ = _inputs(3, 24, 96, torch.float32, bias=False)
    x = torch.randn(3, 160)[:, 10:106]
    _check(G.gemv(x, w, config=G.GemvConfig(block_n=8, block_k=32)), reference.gemv(x, w), torch.float32)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("cfg", [G.GemvConfig(block_n=8, block_k=32), G.GemvConfig(block_n=8, block_k=16, split_k=4),
                                 G.GemvConfig(block_n=16, block_k=16, split_k=2, dot=True)],
                         ids=["fma", "fma-split4", "dot-split2"])
def test_gate_up_silu(m, cfg):
    d, k = 21, 70  # odd: a partial block in each half
    x, w, b = _inputs(m, 2 * d, k, torch.float32, bias=True, seed=m)
    _check(G.gemv_silu_and_mul(x, w, b, config=cfg), reference.gemv_silu_and_mul(x, w, b), torch.float32)
    # the model's unfused path agrees
    _check(reference.linear_silu_and_mul(x, w, b), reference.gemv_silu_and_mul(x, w, b), torch.float32)


def test_gate_up_silu_bf16():
    x, w, _ = _inputs(2, 64, 128, torch.bfloat16, bias=False)
    got = G.gemv_silu_and_mul(x, w, config=G.GemvConfig(block_n=16, block_k=32, split_k=2))
    _check(got, reference.gemv_silu_and_mul(x, w), torch.bfloat16)


def test_bad_arguments():
    x, w, _ = _inputs(9, 16, 32, torch.float32, bias=False)
    with pytest.raises(ValueError, match="1..8"):
        G.gemv(x, w)
    with pytest.raises(ValueError, match="dtypes differ"):
        G.gemv(x[:2].half(), w)
    with pytest.raises(ValueError, match="power of two"):
        G.GemvConfig(block_n=24)
    with pytest.raises(ValueError, match="even row count"):
        G.gemv_silu_and_mul(x[:2], w[:15])


def test_static_choice(monkeypatch):
    """``linear`` runs the kernel only for a shape and M bucket the table lists (and never on CPU
    tensors or fp32); otherwise it is F.linear exactly."""
    x, w, b = _inputs(3, 32, 64, torch.bfloat16, bias=True)
    assert G.table_config("linear", x, w) is None
    torch.testing.assert_close(G.linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=0, rtol=0)
    cfg = G.GemvConfig(block_n=16, block_k=32)
    monkeypatch.setitem(G.GEMV_TABLE, ("linear", 32, 64), {4: cfg})
    if not x.is_cuda:
        assert G.table_config("linear", x, w) is None  # CPU tensors: torch always
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert G.table_config("linear", x, w) == cfg
    assert G.table_config("linear", x[:2], w) is None  # bucket 2 not listed
    assert G.table_config("linear", x.float(), w.float()) is None
    assert G.table_config("linear", torch.zeros(9, 64, dtype=torch.bfloat16), w) is None
    y = G.linear(x.unsqueeze(0), w, b)  # through the kernel, leading dims kept
    assert y.shape == (1, 3, 32)
    _check(y[0], reference.gemv(x, w, b), torch.bfloat16)


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, DOT, SILU_MUL, HAS_BIAS, EVEN_K, EVEN_N): each branch of the kernel
COMPILE_CASES = [(1, 16, 256, 4, False, True, True, False, False), (4, 16, 128, 2, False, False, False, True, True),
                 (16, 32, 128, 4, True, True, True, True, True), (16, 64, 128, 1, True, False, False, False, False)]

_AOT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from shoal.kernels.gemv import _gemv_kernel

out = []
for bm, bn, bk, split, dot, silu, bias, even_k, even_n in json.loads(sys.argv[1]):
    sig = {name: "*bf16" for name in ("x_ptr", "w_ptr", "b_ptr", "y_ptr")}
    sig |= {"part_ptr": "*fp32", "count_ptr": "*i32"}
    sig |= {name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "chunks_per_split")}
    const = dict(HAS_BIAS=bias, SILU_MUL=silu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, DOT=dot,
                 FP32_DOT=False, EVEN_K=even_k, EVEN_N=even_n)
    sig |= {name: "constexpr" for name in const}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 8, 9, 10, 11)}
    src = ASTSource(_gemv_kernel, sig, const, aligned)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    out.append(k.asm["ptx"])
print(json.dumps(out))
"""


def test_compiles_for_hopper():
    """The interpreter runs Python, not Triton's compiled frontend, which is stricter (one return type per
    function, static vs dynamic ifs): compile for sm_90 ahead of time, no GPU needed. In a subprocess:
    this one's Triton is the interpreter's."""
    import json
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("on a GPU the other tests run compiled")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-P", "-c", _AOT, json.dumps(COMPILE_CASES)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode and ("ImportError" in proc.stderr or "unexpected keyword" in proc.stderr):
        pytest.skip(f"this Triton has another ahead-of-time API: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, ptx in zip(COMPILE_CASES, json.loads(proc.stdout)):
        assert "ld.global.v4" in ptx or "cp.async" in ptx, case  # W streams in 16-byte vectors
        if case[3] > 1:  # the last program's handshake: acquire-release counter, partials read past L1
            assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx, case
