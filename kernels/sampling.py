"""Sampling one token per row on the GPU, with per-row seeds and no host sync (Triton).

Semantics (those of :func:`reference.sample_reference` and of the engine's torch sampler):

- ``temperature == 0``: greedy, the first index of the row's maximum raw logit; filters are ignored.
- otherwise the logits are divided by the temperature, then ``min_p`` (drop tokens whose probability
  is below ``min_p * max prob``), ``top_k`` (keep tokens >= the k-th largest remaining logit) and
  ``top_p`` (keep the smallest most-likely-first set whose mass, renormalised over what is left,
  reaches ``top_p``) restrict the support, and one token is drawn from the renormalised rest.
  ``top_k <= 0`` or ``>= vocab``, ``top_p >= 1`` and ``min_p <= 0`` turn a filter off. Tokens tied at
  a cut-off are kept together (the cut is a threshold on the logit value).

How, without sorting: every filter keeps an *upper set* of the logits, so the support is
``{i : key(x_i) >= tau}`` for one threshold ``tau`` on a monotone int32 key of the fp32 logit. The
top-k and top-p thresholds are found exactly by a 16-way search over the 2**32 keys (at most 8
passes over the row, each counting tokens or summing probability above 16 candidates at once). The
draw is a Gumbel-max race, ``argmax(x_i / T + g_i)`` over the support, whose noise ``g_i`` comes
from a counter-based RNG (Philox keyed by the row's seed, counter ``(step, i // 4)``). A row's token
therefore depends only on its logits, its seed and its step, never on the batch or the tile size.

Cost: one pass for greedy, two for a plain temperature draw, a few more per active filter; one
program per row, so a small batch leaves most SMs idle (see ``benchmark.sampling``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_utils  # noqa: F401  (the interpreter fix for Triton < 3.7)


_NO_KEY = tl.constexpr(2147483647)  # int32 max: above every key of a non-NaN logit


@triton.jit
def _order_key(x):
    """fp32 -> int32 that orders like the float: negative floats get their magnitude bits flipped.

    Loops inline this expression instead of calling it: the interpreter re-patches the language on
    every nested jit call, which makes a call per tile ~100x slower than the arithmetic under test.
    """
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


# Every scan below keeps lane-wise running values ([BLOCK_V] or [BLOCK_V, FANOUT]) and reduces across
# lanes once at the end of the pass, not once per tile.


@triton.jit
def _max_argmax(row_ptr, vocab, BLOCK_V: tl.constexpr):
    """Row maximum and the first index holding it."""
    best = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_V], dtype=tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        better = x > best  # strict: each lane keeps its earliest maximum
        best_i = tl.where(better, cols, best_i)
        best = tl.where(better, x, best)
    x_max = tl.max(best, axis=0)
    first = tl.min(tl.where(best == x_max, best_i, _NO_KEY), axis=0)
    return x_max, first.to(tl.int64)


@triton.jit
def _search_threshold(row_ptr, vocab, x_max, inv_temp, lo, hi, top_k, top_p,
                      BY_MASS: tl.constexpr, FANOUT: tl.constexpr, BLOCK_V: tl.constexpr):
    """The largest key ``t`` in [lo, hi) whose upper set ``{key >= t}`` still holds ``top_k`` tokens
    (``BY_MASS`` False) or ``top_p`` of the mass of ``{key >= lo}`` (``BY_MASS`` True); ``lo`` when
    even ``{key >= lo}`` falls short. Invariant: ``lo`` qualifies (or is that fallback), ``hi`` does not.

    Each pass over the row scores FANOUT candidates at once: ``lo``, ``lo + 1`` and evenly spaced
    keys up to ``hi``; for each it counts the tokens (or sums the probability) at or above it and
    finds the smallest key actually present there. The interval then shrinks to the last qualifying
    candidate, snapped up to that present key, and the next failing one; it ends when ``lo + 1``
    fails, i.e. ``lo`` is the key of the last token kept. At most 8 passes at FANOUT 16, usually
    4-6 on a 150k vocab, since snapping skips the empty key ranges between the row's values.
    """
    # lo, hi: int64 scalars (hi may be 2**31); candidates and keys are int32
    j = tl.arange(0, FANOUT).to(tl.int64)
    target = tl.full([], -1.0, dtype=tl.float32)  # top_p * mass(key >= initial lo), set on pass 1
    while hi - lo > 1:
        cand = tl.where(j == 0, lo, lo + 1 + ((hi - lo - 1) * (j - 1)) // (FANOUT - 1)).to(tl.int32)
        count = tl.zeros([BLOCK_V, FANOUT], dtype=tl.int32)
        mass = tl.zeros([BLOCK_V, FANOUT], dtype=tl.float32)
        present = tl.full([BLOCK_V, FANOUT], _NO_KEY, dtype=tl.int32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = cols < vocab
            x = tl.load(row_ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
            b = x.to(tl.int32, bitcast=True)
            key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)  # _order_key, inlined
            sel = ok[:, None] & (key[:, None] >= cand[None, :])  # [BLOCK_V, FANOUT]
            present = tl.minimum(present, tl.where(sel, key[:, None], _NO_KEY))
            if BY_MASS:
                p = tl.exp((x - x_max) * inv_temp)
                mass += tl.where(sel, p[:, None], 0.0)
            else:
                count += sel.to(tl.int32)
        if BY_MASS:
            cand_mass = tl.sum(mass, axis=0)  # [FANOUT]
            target = tl.where(target < 0.0, top_p * tl.sum(tl.where(j == 0, cand_mass, 0.0), axis=0), target)
            good = cand_mass >= target
        else:
            good = tl.sum(count, axis=0) >= top_k
        present_min = tl.min(present, axis=0).to(tl.int64)  # [FANOUT]
        last = tl.max(tl.where(good, j, -1), axis=0)  # counts and masses fall as cand rises
        done = last <= 0  # lo + 1 fails: lo is the answer (or the fallback)
        new_lo = tl.sum(tl.where(j == last, present_min, 0), axis=0)
        new_hi = tl.min(tl.where(good, hi, cand.to(tl.int64)), axis=0)
        hi = tl.where(done, lo, new_hi)
        lo = tl.where(done, lo, new_lo)
    return lo


@triton.jit
def _min_p_threshold(row_ptr, vocab, x_max, inv_temp, log_min_p, BLOCK_V: tl.constexpr):
    """The smallest key among tokens with prob >= min_p * max prob (the max token always is one)."""
    tau = tl.full([BLOCK_V], _NO_KEY, dtype=tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < vocab
        x = tl.load(row_ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
        keep = ok & ((x - x_max) * inv_temp >= log_min_p)
        b = x.to(tl.int32, bitcast=True)
        key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)  # _order_key, inlined
        tau = tl.minimum(tau, tl.where(keep, key, _NO_KEY))
    return tl.min(tau, axis=0).to(tl.int64)


@triton.jit
def _race(row_ptr, vocab, x_max, inv_temp, tau, seed, step, BLOCK_V: tl.constexpr):
    """Gumbel-max over the tokens with key >= tau.

    Token ``c``'s uniform is word ``c % 4`` of Philox(seed, counter = step * 2**32 + c // 4): one
    Philox evaluation serves four tokens, and the draw does not depend on the tile size.
    """
    QUARTER: tl.constexpr = BLOCK_V // 4
    tau32 = tau.to(tl.int32)
    best = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_V], dtype=tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < vocab
        x = tl.load(row_ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
        counter = step * 4294967296 + (start // 4 + tl.arange(0, QUARTER)).to(tl.int64)
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        # [QUARTER, 2, 2] -> [BLOCK_V]: token start + 4 i + m takes word (r0, r2, r1, r3)[m]
        bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK_V]).to(tl.int32, bitcast=True)
        # uniform in (0, 1): tl.rand's mapping, shifted half a step so that 0 never occurs
        u = (tl.where(bits < 0, -bits - 1, bits).to(tl.float32) + 0.5) * 4.6566127342e-10
        gumbel = -tl.log(-tl.log(u))
        b = x.to(tl.int32, bitcast=True)
        key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)  # _order_key, inlined
        score = tl.where(ok & (key >= tau32), (x - x_max) * inv_temp + gumbel, float("-inf"))
        better = score > best
        best_i = tl.where(better, cols, best_i)
        best = tl.where(better, score, best)
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, best_i, _NO_KEY), axis=0).to(tl.int64)


@triton.jit
def _store_support(row_ptr, mask_ptr, vocab, tau, only, BLOCK_V: tl.constexpr):
    """Write the support as a bool row: key >= tau, or just token ``only`` when it is >= 0 (greedy)."""
    tau32 = tau.to(tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < vocab
        x = tl.load(row_ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
        b = x.to(tl.int32, bitcast=True)
        key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)  # _order_key, inlined
        keep = tl.where(only >= 0, cols == only, key >= tau32)
        tl.store(mask_ptr + cols, keep.to(tl.int8), mask=ok)


@triton.jit(do_not_specialize=["step_scalar"])
def _sample_kernel(
    logits_ptr,  # [B, V]
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,  # [B] each
    seed_ptr,  # [B] int64
    step_ptr,  # [B] int64 (STEP_PER_ROW) or unused
    out_ptr,  # [B] int64 token ids, or [B, V] int8 support (SUPPORT_ONLY)
    stride_row, vocab, step_scalar,
    STEP_PER_ROW: tl.constexpr, SUPPORT_ONLY: tl.constexpr, FANOUT: tl.constexpr,
    BLOCK_V: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    x_max, argmax = _max_argmax(row_ptr, vocab, BLOCK_V)
    temp = tl.load(temperature_ptr + row).to(tl.float32)
    if temp <= 0.0:
        if SUPPORT_ONLY:
            _store_support(row_ptr, out_ptr + row * vocab, vocab, tl.zeros([], dtype=tl.int64), argmax, BLOCK_V)
        else:
            tl.store(out_ptr + row, argmax)
        return
    inv_temp = 1.0 / temp
    top_k = tl.load(top_k_ptr + row).to(tl.int64)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    min_p = tl.load(min_p_ptr + row).to(tl.float32)

    tau = tl.full([], -2147483648, dtype=tl.int64)  # key threshold of the support: all to start with
    if min_p > 0.0:
        tau = _min_p_threshold(row_ptr, vocab, x_max, inv_temp, tl.log(min_p), BLOCK_V)
    key_end = _order_key(x_max).to(tl.int64) + 1  # nothing has a larger key than the maximum
    if (top_k > 0) & (top_k < vocab):
        tau = _search_threshold(row_ptr, vocab, x_max, inv_temp, tau, key_end, top_k, top_p,
                                False, FANOUT, SEARCH_BLOCK)
    if top_p < 1.0:
        tau = _search_threshold(row_ptr, vocab, x_max, inv_temp, tau, key_end, top_k, top_p,
                                True, FANOUT, SEARCH_BLOCK)

    if SUPPORT_ONLY:
        _store_support(row_ptr, out_ptr + row * vocab, vocab, tau, tl.full([], -1, dtype=tl.int64), BLOCK_V)
    else:
        seed = tl.load(seed_ptr + row).to(tl.int64)
        if STEP_PER_ROW:
            step = tl.load(step_ptr + row).to(tl.int64)
        else:
            step = step_scalar.to(tl.int64)
        tl.store(out_ptr + row, _race(row_ptr, vocab, x_max, inv_temp, tau, seed, step, BLOCK_V))


def sample(
    logits: torch.Tensor,  # [B, V] float (fp32 from the model runner)
    temperature: torch.Tensor,  # [B] float; 0 = greedy
    top_k: torch.Tensor,  # [B] int; <= 0 or >= V = off
    top_p: torch.Tensor,  # [B] float in (0, 1]; 1 = off
    min_p: torch.Tensor,  # [B] float in [0, 1]; 0 = off
    seeds: torch.Tensor,  # [B] int64
    step: int | torch.Tensor,  # the draw's counter: one int for the batch, or [B] int64 per row
    *,
    block_v: int | None = None,
) -> torch.Tensor:  # [B] int64 token ids
    """One token per row; the draw depends only on (row's logits, seed, step). See the module doc.

    Pass a per-row ``step`` (e.g. the number of tokens the request has generated) to make a seeded
    request reproducible whatever batches it joins; ``block_v`` (a power of two) only sets the tile.
    """
    _check(logits, temperature, top_k, top_p, min_p)
    batch = logits.shape[0]
    if seeds.shape != (batch,) or seeds.dtype != torch.int64:
        raise ValueError(f"seeds must be int64 [batch={batch}], got {seeds.dtype} {tuple(seeds.shape)}")
    step_per_row = isinstance(step, torch.Tensor)
    if step_per_row and step.shape != (batch,):
        raise ValueError(f"step must be an int or [batch={batch}], got {tuple(step.shape)}")
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    _launch(logits, temperature, top_k, top_p, min_p, seeds, step, out, block_v, support_only=False)
    return out


def support_mask(
    logits: torch.Tensor,  # [B, V]
    temperature: torch.Tensor,  # [B]
    top_k: torch.Tensor,  # [B]
    top_p: torch.Tensor,  # [B]
    min_p: torch.Tensor,  # [B]
    *,
    block_v: int | None = None,
) -> torch.Tensor:  # [B, V] bool
    """The tokens :func:`sample` may draw for each row (same kernel, same thresholds, no draw):
    for tests of the filters, and for anything that needs the processed support on the GPU."""
    _check(logits, temperature, top_k, top_p, min_p)
    out = torch.empty(logits.shape, dtype=torch.int8, device=logits.device)
    _launch(logits, temperature, top_k, top_p, min_p, None, 0, out, block_v, support_only=True)
    return out.bool()


def _check(logits, temperature, top_k, top_p, min_p) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [batch, vocab >= 1], got {tuple(logits.shape)}")
    batch = logits.shape[0]
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        if t.shape != (batch,):
            raise ValueError(f"{name} must be [batch={batch}], got {tuple(t.shape)}")


def _launch(logits, temperature, top_k, top_p, min_p, seeds, step, out, block_v, *, support_only: bool,
            search_block: int | None = None, num_warps: int | None = None) -> None:
    """``block_v``: the tile of the single-pass scans; ``search_block``: the (smaller) tile of the
    threshold search, whose passes hold a [search_block, FANOUT] comparison."""
    batch, vocab = logits.shape
    if batch == 0:
        return
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if block_v is None:
        block_v = max(16, min(triton.next_power_of_2(vocab), 4096 if logits.is_cuda else 1024))
    if search_block is None:
        search_block = min(block_v, 512 if logits.is_cuda else 1024)  # H100 sweep: 512-1024 best
    for name, v in (("block_v", block_v), ("search_block", search_block)):
        if v < 4 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 4, got {v}")
    if num_warps is None:
        num_warps = 8 if block_v >= 2048 else 4
    step_per_row = isinstance(step, torch.Tensor)
    dummy = temperature  # stands in for the pointers a mode does not read
    _sample_kernel[(batch,)](
        logits, temperature, top_k, top_p, min_p,
        dummy if seeds is None else seeds, step if step_per_row else dummy, out,
        logits.stride(0), vocab, 0 if step_per_row else int(step),
        STEP_PER_ROW=step_per_row, SUPPORT_ONLY=support_only, FANOUT=16,
        BLOCK_V=block_v, SEARCH_BLOCK=search_block, num_warps=num_warps,
    )
