"""A simulated worker replica: the engine's continuous batching, timed by the profile.

Each step takes every decoding request's next token, then prompt chunks (first come, first served)
up to the step's token budget, admitting waiting requests while ``max_num_seqs`` and the KV cache
allow; its duration is :meth:`Profile.step_time`. A ``prefill`` worker hands a request on once its
prompt is computed; a ``decode`` worker receives requests whose prompt is already computed.

A replica is ``starting`` (its cold start), ``ready``, ``draining`` (no new requests; in-flight ones
finish), then ``gone``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shoal.workers.protocol import WorkerLoad

from ..profile import Profile


@dataclass(slots=True)
class SimRequest:
    request_id: str
    arrival: float
    prompt_ids: tuple[int, ...]
    output_len: int
    computed: int = 0  # prompt tokens computed
    generated: int = 0
    first_token: float | None = None
    last_token: float | None = None
    queued_at: float = 0.0  # when it entered its current queue (router or worker)
    prompt_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.computed >= self.prompt_len

    @property
    def done(self) -> bool:
        return self.generated >= self.output_len

    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def itl(self) -> float | None:
        """The request's mean inter-token latency (0 for a single token)."""
        if self.last_token is None or not self.done:
            return None
        return (self.last_token - self.first_token) / (self.generated - 1) if self.generated > 1 else 0.0


@dataclass
class SimWorker:
    worker_id: str
    role: str  # unified | prefill | decode
    profile: Profile
    created: float
    ready_at: float
    state: str = "starting"
    ended: float | None = None
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    busy: bool = False
    tokens_computed: int = 0  # since start, prefill + decode
    _step: tuple = ()  # (decoding requests, [(request, chunk)]) of the step in progress

    @property
    def open_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def load(self) -> WorkerLoad:
        used = sum(r.computed + r.generated for r in self.running)
        total = self.profile.kv_capacity_tokens
        return WorkerLoad(num_running=len(self.running), num_waiting=len(self.waiting),
                          kv_usage=min(1.0, used / total), num_free_blocks=max(0, total - used),
                          num_total_blocks=total)

    def enqueue(self, request: SimRequest, now: float) -> None:
        request.queued_at = now
        self.waiting.append(request)

    def oldest_wait(self, now: float) -> float:
        return now - self.waiting[0].queued_at if self.waiting else 0.0

    # -- one engine step ----------------------------------------------------------------------------

    def start_step(self) -> float | None:
        """Plan the next step; its duration, or None when there is nothing to do."""
        p = self.profile
        budget = p.max_num_batched_tokens
        used = sum(r.prompt_len + r.output_len for r in self.running)
        while self.waiting and len(self.running) < p.max_num_seqs:
            nxt = self.waiting[0]
            if used + nxt.prompt_len + nxt.output_len > p.kv_capacity_tokens and self.running:
                break
            used += nxt.prompt_len + nxt.output_len
            self.running.append(self.waiting.popleft())
        decoding, prefilling, context = [], [], 0
        for r in self.running:
            if r.computed >= r.prompt_len:
                decoding.append(r)
                context += r.prompt_len + r.generated
            else:
                prefilling.append(r)
        budget -= len(decoding)
        chunks = []
        for r in prefilling:
            if budget <= 0:
                break
            chunk = min(budget, r.prompt_len - r.computed)
            chunks.append((r, chunk))
            budget -= chunk
        if not decoding and not chunks:
            return None
        context = context / len(decoding) if decoding else 0.0
        self._step = (decoding, chunks)
        self.busy = True
        return p.step_time(len(decoding), context, sum(c for _, c in chunks))

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the step that just ended: (requests finished here, prompts prefilled for handing on)."""
        decoding, chunks = self._step
        self._step, self.busy = (), False
        finished, handed = [], []
        for r in decoding:
            self._token(r, now)
        for r, chunk in chunks:
            r.computed += chunk
            if r.prefilled and self.role != "prefill":
                self._token(r, now)  # the step that completes a prompt samples its first token
        self.tokens_computed += len(decoding) + sum(c for _, c in chunks)
        keep = []
        for r in self.running:
            if self.role == "prefill" and r.prefilled:
                handed.append(r)
            elif r.done:
                finished.append(r)
            else:
                keep.append(r)
        self.running = keep
        return finished, handed

    @staticmethod
    def _token(r: SimRequest, now: float) -> None:
        if r.first_token is None:
            r.first_token = now
        r.last_token = now
        r.generated += 1
