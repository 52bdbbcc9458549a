"""The sampler: one step's logits → one token per row, plus the logprobs a row asked for.

Order of the logit transforms (vLLM v1 / OpenAI semantics):

1. logprobs are taken from the *raw* logits (``log_softmax`` of the model output), before anything
   below changes them, so they describe the model, not the sampling rules;
2. token filters of the rows that set them (others are not touched), in vLLM's order: tokens
   outside ``allowed_token_ids`` and the last token of each bad word whose other tokens end the
   output (a one-token word: always) set to ``-inf``, then ``logit_bias`` added;
3. penalties: repetition (CTRL: divide positive / multiply negative logits of tokens seen in the
   prompt or the output), frequency (``count * penalty`` over the output), presence (``penalty``
   once per token present in the output);
4. ``min_tokens``: stop ids, and eos ids unless ``ignore_eos``, are set to ``-inf`` while the output
   is shorter than ``min_tokens`` (``ignore_eos`` only means "do not stop at eos": it never masks);
   then the grammar mask of constrained rows (structured output) sets every token it forbids to ``-inf``;
5. greedy rows (``temperature == 0``) take the argmax here and never consume randomness;
6. temperature → min_p → top_k → top_p → a draw by the exponential race
   ``argmax(probs / E)``, ``E ~ Exp(1)`` i.i.d. per token, which picks token ``i`` with
   probability ``probs[i]``.

A seeded row draws its noise from its own ``torch.Generator`` and every transform acts row-wise,
so its token depends only on its seed, its logits and its own history, never on the rest of the
batch or its position in it. Everything is vectorised over the batch except that per-seeded-row
noise draw (one ``exponential_`` call per seeded row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from shoal.workers.engine.outputs import TokenLogprobs
from shoal.workers.engine.sampling_params import SamplingParams

from .grammar import TokenMask

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingRow:
    """One request's view for this step.

    ``generator`` is the request's own RNG (see :func:`make_generator`), set when ``params.seed`` is;
    it must live on the logits' device. Token id sequences may be lists, numpy arrays or CPU tensors
    (arrays are cheapest for long prompts). ``eos_token_ids`` are suppressed together with
    ``params.stop_token_ids`` while ``len(output_token_ids) < params.min_tokens``, unless
    ``params.ignore_eos``.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    eos_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own RNG: same seed and same history of draws → same tokens."""
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Logit transforms. Each takes float32 logits [B, V] and one row per batch entry, and acts row-wise.
# ---------------------------------------------------------------------------------------------


def _row_token_index(
    token_lists: Sequence[Sequence[int]], vocab: int, field: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row, token) pairs of a ragged list, as two CPU int64 tensors; ids checked in [0, vocab).

    Each entry may be a list, a numpy array or a CPU tensor; arrays cost ~nothing here, lists of
    Python ints ~45 ns a token (a model runner with long prompts should keep arrays per request).
    """
    parts = [np.asarray(t, dtype=np.int64) for t in token_lists]
    lengths = np.fromiter((len(t) for t in parts), dtype=np.int64, count=len(parts))
    flat = np.concatenate(parts)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab):
        bad = int(flat.max()) if flat.max() >= vocab else int(flat.min())
        raise ValueError(f"{field} must hold token ids in [0, {vocab}) (the logits' vocab), got {bad}")
    rows = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)
    return torch.from_numpy(rows), torch.from_numpy(flat)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow], inplace: bool = False) -> torch.Tensor:
    """Repetition, then frequency, then presence penalties; returns new float32 logits [B, V]
    (``inplace``: the given float32 logits, changed).

    Only rows with a penalty set are touched; the others keep their logits bit for bit.
    """
    # logits: [B, V]
    out = logits if inplace else logits.to(torch.float32, copy=True)
    vocab = out.shape[1]
    picked = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
    if not picked:
        return out
    device = out.device
    sub_rows = [rows[i] for i in picked]
    idx = _to_device(picked, torch.int64, device)
    sub = out.index_select(0, idx)  # [P, V]
    p = torch.tensor(
        [[r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty]
         for r in sub_rows],
        dtype=torch.float32,
    ).to(device)
    rep, freq, pres = p[:, 0:1], p[:, 1:2], p[:, 2:3]  # each [P, 1]

    # counts[r, t] = occurrences of token t in row r's output; float adds of 1.0 are exact (< 2**24).
    r_out, t_out = _row_token_index([r.output_token_ids for r in sub_rows], vocab, "output_token_ids")
    counts = torch.zeros_like(sub)  # [P, V]
    counts.view(-1).index_add_(0, (r_out * vocab + t_out).to(device), torch.ones(len(t_out), device=device))
    in_output = counts > 0

    if any(r.params.repetition_penalty != 1.0 for r in sub_rows):
        r_pr, t_pr = _row_token_index([r.prompt_token_ids for r in sub_rows], vocab, "prompt_token_ids")
        seen = in_output.clone()
        seen.view(-1)[(r_pr * vocab + t_pr).to(device)] = True
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
    sub = sub - freq * counts - pres * in_output.to(sub.dtype)
    out.index_copy_(0, idx, sub)
    return out


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """In place: each row's ``logit_bias`` added to its tokens' logits (rows without one untouched)."""
    # logits: [B, V] float32, contiguous
    picked = [(i, r.params.logit_bias) for i, r in enumerate(rows) if r.params.logit_bias]
    if not picked:
        return logits
    vocab = logits.shape[1]
    flat = [i * vocab + t for i, bias in picked for t, _ in bias]
    values = [v for _, bias in picked for _, v in bias]
    if max(t for _, bias in picked for t, _ in bias) >= vocab:
        raise ValueError(f"logit_bias must hold token ids in [0, {vocab}) (the logits' vocab)")
    dev = logits.device
    logits.view(-1).index_add_(0, _to_device(flat, torch.int64, dev), _to_device(values, torch.float32, dev))
    return logits


def apply_allowed_token_ids(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """In place: ``-inf`` on every token outside a row's ``allowed_token_ids`` (rows without it untouched)."""
    # logits: [B, V]
    picked = [i for i, r in enumerate(rows) if r.params.allowed_token_ids is not None]
    if not picked:
        return logits
    vocab, dev = logits.shape[1], logits.device
    r_idx, t_idx = _row_token_index([rows[i].params.allowed_token_ids for i in picked], vocab, "allowed_token_ids")
    keep = torch.zeros((len(picked), vocab), dtype=torch.bool, device=dev)  # [A, V]
    keep.view(-1)[(r_idx * vocab + t_idx).to(dev)] = True
    idx = _to_device(picked, torch.int64, dev)
    sub = logits.index_select(0, idx).masked_fill_(~keep, _NEG_INF)
    return logits.index_copy_(0, idx, sub)


def bad_word_bans(rows: Sequence[SamplingRow]) -> tuple[list[int], list[int]]:
    """(row, token) pairs to ban this step: a bad word's last token where its other tokens end the
    row's output (vLLM's rule; a one-token word is always banned)."""
    row_ids: list[int] = []
    tok_ids: list[int] = []
    for i, r in enumerate(rows):
        words = r.params.bad_words_token_ids
        if not words:
            continue
        out = r.output_token_ids
        n = len(out)
        for word in words:
            k = len(word) - 1
            if k > n or (k and list(out[n - k:]) != list(word[:k])):
                continue
            row_ids.append(i)
            tok_ids.append(word[-1])
    return row_ids, tok_ids


def apply_bad_words(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """In place: ``-inf`` on the tokens that would complete a bad word (see :func:`bad_word_bans`)."""
    # logits: [B, V]
    row_ids, tok_ids = bad_word_bans(rows)
    if row_ids:
        vocab, dev = logits.shape[1], logits.device
        keep = [j for j, t in enumerate(tok_ids) if 0 <= t < vocab]  # beyond the vocab: never sampled anyway
        logits[_to_device([row_ids[j] for j in keep], torch.int64, dev),
               _to_device([tok_ids[j] for j in keep], torch.int64, dev)] = _NEG_INF
    return logits


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """In place: ``-inf`` on stop ids (and eos ids unless ignore_eos) of rows still under min_tokens.

    Ids outside the logits' vocab cannot be sampled anyway and are skipped.
    """
    # logits: [B, V]
    vocab = logits.shape[1]
    row_ids: list[int] = []
    tok_ids: list[int] = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) >= r.params.min_tokens:
            continue
        banned = set(r.params.stop_token_ids)
        if not r.params.ignore_eos:
            banned |= r.eos_token_ids
        banned = [t for t in banned if 0 <= t < vocab]
        row_ids += [i] * len(banned)
        tok_ids += banned
    if row_ids:
        dev = logits.device
        logits[_to_device(row_ids, torch.int64, dev), _to_device(tok_ids, torch.int64, dev)] = _NEG_INF
    return logits


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """In place: ``-inf`` on the tokens a constrained row's grammar forbids (other rows untouched)."""
    # logits: [B, V]; mask.rows: [C]; mask.bitmask: [C, W] int32, W * 32 >= V
    vocab = logits.shape[1]
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((mask.bitmask.unsqueeze(-1) >> bits) & 1).view(mask.bitmask.shape[0], -1)[:, :vocab]  # [C, V]
    sub = logits.index_select(0, mask.rows).masked_fill_(allowed == 0, _NEG_INF)
    return logits.index_copy_(0, mask.rows, sub)


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """In place: drop tokens whose prob < ``min_p * max prob`` (min_p = 0 drops nothing)."""
    # logits: [B, V], min_p: B values in [0, 1]
    probs = logits.softmax(dim=-1)
    scale = _to_device(list(min_p), torch.float32, logits.device).unsqueeze(1)  # [B, 1]
    return logits.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * scale, _NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: Sequence[int] | None, top_p: Sequence[float] | None
) -> torch.Tensor:
    """In place: top_k (keep logits >= the k-th largest), then top_p on the renormalised rest.

    ``top_k`` <= 0 or >= V is off for that row; so is ``top_p`` = 1, and a None list turns the
    filter off for the whole batch. top_p keeps the smallest most-likely-first prefix whose mass
    reaches ``top_p``: a token stays iff the mass strictly before it is < top_p, so the most likely
    token always stays. Rows with top_p = 1 use an infinite threshold, so float rounding in the
    cumsum never trims their tail.
    """
    # logits: [B, V]; top_k, top_p: B values each, or None
    vocab = logits.shape[1]
    dev = logits.device
    ks = [k if 0 < k < vocab else vocab for k in top_k] if top_k is not None else None
    if ks is not None and min(ks) == vocab:
        ks = None
    if top_p is not None and min(top_p) >= 1:
        top_p = None
    if top_p is None:
        if ks is None:
            return logits
        # No sort needed: the k-th largest of each active row from one topk over the largest k.
        max_k = max(k for k in ks if k < vocab)
        k_idx = _to_device([min(k, max_k) - 1 for k in ks], torch.int64, dev).unsqueeze(1)  # [B, 1]
        kth = logits.topk(max_k, dim=-1).values.gather(1, k_idx)  # [B, 1]
        off = _to_device([k == vocab for k in ks], torch.bool, dev).unsqueeze(1)
        return logits.masked_fill_((logits < kth) & ~off, _NEG_INF)

    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V] each
    if ks is not None:
        kth = sorted_logits.gather(1, _to_device(ks, torch.int64, dev).unsqueeze(1) - 1)  # [B, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    threshold = _to_device([p if p < 1 else float("inf") for p in top_p], torch.float32, dev)
    remove = mass_before >= threshold.unsqueeze(1)
    remove[:, 0] = False
    sorted_logits.masked_fill_(remove, _NEG_INF)
    return logits.scatter_(1, order, sorted_logits)


# ---------------------------------------------------------------------------------------------
# The sampler.
# ---------------------------------------------------------------------------------------------


class Sampler:
    """Samples one token per row; see the module docstring for the order of transforms.

    ``generator`` is the shared RNG of unseeded rows (on the logits' device); None uses torch's
    default generator for that device. Tests inject one to make unseeded draws repeatable.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        # logits: [B, V] (any float dtype); the caller's tensor is never modified.
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        if not rows:
            return SamplerOutput([], [])
        token_ids = self.sample_ids(logits, rows)
        ids = token_ids.tolist()
        return SamplerOutput(ids, self.logprobs(logits, rows, token_ids))

    def sample_ids(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                   mask: TokenMask | None = None) -> torch.Tensor:
        """The sampled ids as a device tensor [B], queued without waiting for the GPU (the model
        runner copies them back itself, so it can tell the wait for the GPU from sampling). ``mask``:
        the grammar's allowed tokens for the constrained rows."""
        if not rows:
            return torch.empty(0, dtype=torch.int64, device=logits.device)
        if any(r.params.has_token_filters for r in rows):  # before the penalties, as vLLM's
            x = logits.to(torch.float32, copy=True)
            apply_allowed_token_ids(x, rows)
            apply_bad_words(x, rows)
            apply_logit_bias(x, rows)
            apply_penalties(x, rows, inplace=True)
        else:
            x = apply_penalties(logits, rows)  # float32 copy
        apply_min_tokens(x, rows)
        if mask is not None:
            apply_token_mask(x, mask)
        greedy = [r.params.greedy for r in rows]
        token_ids = x.argmax(dim=-1) if any(greedy) else None  # [B]
        if not all(greedy):
            sampled = self._sample(x, rows, greedy)
            if token_ids is None:
                token_ids = sampled
            else:
                token_ids = torch.where(_to_device(greedy, torch.bool, x.device), token_ids, sampled)
        return token_ids

    @staticmethod
    def logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow],
                 token_ids: torch.Tensor) -> list[TokenLogprobs | None]:
        return logprobs_read(logprobs_launch(logits, rows, token_ids))

    @staticmethod
    def logprobs_launch(logits: torch.Tensor, rows: Sequence[SamplingRow],
                        token_ids: torch.Tensor) -> "LogprobsInFlight":
        """Queue the logprobs and their copy to the host; read them with :meth:`logprobs_read`
        once the step is done (no host sync here)."""
        return logprobs_launch(logits, rows, token_ids)

    @staticmethod
    def logprobs_read(pending: "LogprobsInFlight") -> list[TokenLogprobs | None]:
        return logprobs_read(pending)

    def _sample(self, x: torch.Tensor, rows: Sequence[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        """Random rows' tokens (greedy rows get a meaningless value); ``x`` is consumed."""
        # x: [B, V] float32 after penalties and min_tokens
        dev = x.device
        ps = [r.params for r in rows]
        # Greedy rows get neutral values so the batch stays one tensor; their result is discarded.
        temps = [1.0 if g else p.temperature for p, g in zip(ps, greedy)]
        if min(temps) == max(temps):  # one temperature for the batch (the common case): no upload
            if temps[0] != 1.0:
                x.div_(temps[0])
        else:
            x.div_(_to_device(temps, torch.float32, dev).unsqueeze(1))
        if any(p.min_p > 0 for p in ps):
            apply_min_p(x, [p.min_p for p in ps])
        apply_top_k_top_p(x, [p.top_k for p in ps], [p.top_p for p in ps])
        probs = x.softmax(dim=-1)
        return probs.div_(self._noise(probs, rows, greedy)).argmax(dim=-1)

    def _noise(self, probs: torch.Tensor, rows: Sequence[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        """Exp(1) noise [B, V]: seeded rows from their own generator, other random rows from the shared."""
        q = torch.empty_like(probs)
        shared = [i for i, (r, g) in enumerate(zip(rows, greedy)) if not g and r.generator is None]
        if len(shared) == len(rows):
            q.exponential_(generator=self.generator)
        else:
            q.fill_(1.0)  # greedy rows: no draw, a harmless constant
            if shared:
                draw = torch.empty((len(shared), q.shape[1]), device=q.device)
                draw.exponential_(generator=self.generator)
                q.index_copy_(0, _to_device(shared, torch.int64, q.device), draw)
            for i, (r, g) in enumerate(zip(rows, greedy)):
                if not g and r.generator is not None:
                    q[i].exponential_(generator=r.generator)
        # A draw of exactly 0 would turn a masked token's 0/0 into NaN, which argmax picks.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)


def _to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-step tensor on ``device``. A copy from pageable host memory waits for the whole
    stream (the forward in flight) before it starts; from pinned memory it is queued like a kernel."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass(frozen=True)
class LogprobsInFlight:
    """Logprobs of one step on their way to the host (pinned copies queued on CUDA)."""

    num_rows: int
    want: tuple[int, ...]  # rows that asked for logprobs
    counts: tuple[int, ...]  # top-n each asked for
    token: torch.Tensor | None = None  # [W] sampled ids
    token_logprob: torch.Tensor | None = None  # [W]
    rank: torch.Tensor | None = None  # [W]
    top_logprobs: torch.Tensor | None = None  # [W, n_max]
    top_ids: torch.Tensor | None = None  # [W, n_max]


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A queued copy into pinned memory on CUDA (read it after the step's event); as is on CPU."""
    if x.device.type != "cuda":
        return x
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)


def logprobs_launch(logits: torch.Tensor, rows: Sequence[SamplingRow], token_ids: torch.Tensor) -> LogprobsInFlight:
    """Raw logprobs (log_softmax of the unmodified logits) of the sampled token, its rank and the top-n."""
    # logits: [B, V] raw model output, token_ids: [B]
    want = tuple(i for i, r in enumerate(rows) if r.params.logprobs is not None)
    counts = tuple(rows[i].params.logprobs for i in want)
    if not want:
        return LogprobsInFlight(len(rows), want, counts)
    idx = _to_device(list(want), torch.int64, logits.device)
    lp = logits.index_select(0, idx).to(torch.float32).log_softmax(dim=-1)  # [W, V]
    tok = token_ids.index_select(0, idx).unsqueeze(1)  # [W, 1]
    tok_lp = lp.gather(1, tok)  # [W, 1]
    rank = (lp >= tok_lp).sum(dim=-1)  # [W]; ties count against the token, as in vLLM
    n_max = min(max(counts), lp.shape[1])
    top_lp, top_ids = lp.topk(n_max, dim=-1) if n_max else (lp[:, :0], tok[:, :0])  # [W, n_max]
    return LogprobsInFlight(len(rows), want, counts, _to_host(tok.squeeze(1)), _to_host(tok_lp.squeeze(1)),
                            _to_host(rank), _to_host(top_lp), _to_host(top_ids))


def logprobs_read(pending: LogprobsInFlight) -> list[TokenLogprobs | None]:
    """The host values of :func:`logprobs_launch` (on CUDA: only after the step's copies are done)."""
    out: list[TokenLogprobs | None] = [None] * pending.num_rows
    if not pending.want:
        return out
    tok_l, tok_lp_l, rank_l = pending.token.tolist(), pending.token_logprob.tolist(), pending.rank.tolist()
    top_lp_l, top_ids_l = pending.top_logprobs.tolist(), pending.top_ids.tolist()
    for j, (i, n) in enumerate(zip(pending.want, pending.counts)):
        top = tuple(zip(top_ids_l[j][:n], top_lp_l[j][:n]))
        out[i] = TokenLogprobs(tok_l[j], tok_lp_l[j], rank_l[j], top)
    return out
