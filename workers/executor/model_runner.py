"""The model runner: turns a ``SchedulerOutput`` into one forward pass and one sampled token per
request that reached the end of its known tokens.

It keeps its own copy of each request's tokens and block ids, updated from the scheduler's diffs and
its own samples, so nothing live crosses from the scheduler. Inputs go through persistent buffers;
on CUDA, decode-only steps replay captured graphs. The only host sync per step is reading the
sampled ids back.

``execute`` is ``submit`` then ``collect``. Under async scheduling the engine submits step N+1 before it
collects step N: a decode token whose id the host does not have yet (step N sampled it) is gathered on
the device from step N's sampled-id tensor into N+1's input ids (``InputBuffers.gather_ids``), so
nothing waits for the GPU between the two. Only a row whose sampler reads its output ids on the host
(penalties, min_tokens, a grammar: its mask needs the previous token consumed) makes the runner
collect step N first, so steps with constrained rows run without overlap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from shoal.workers.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.models.llama import KVCache, LlamaForCausalLM

from .cuda_graphs import DecodeGraphs, default_capture_sizes
from .grammar import GrammarCompiler, SequenceGrammar
from .input_buffers import InputBuffers, StepInputs
from . import prompt_logprobs
from .pending_step import PendingStep
from .sampler import Sampler, SamplingRow, make_generator


@dataclass
class CachedRequestState:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    # its sampler reads the output ids on the host (penalties, min_tokens, a grammar, a multi-token bad word)
    needs_history: bool = False
    grammar: SequenceGrammar | None = None  # structured output: its place in its grammar
    num_pending: int = 0  # tokens sampled by submitted steps, not collected yet
    pending_row: int = -1  # its row in the last submitted step's sampled ids
    pending_step: int = -1  # which submission sampled it last
    table_row: int = -1  # its row of the device block tables (InputBuffers.block_tables)
    _row: SamplingRow | None = None  # the sampler's row, when it reads no history (then it never changes)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def sampling_row(self) -> SamplingRow:
        """This step's row for the sampler. Slicing a long prompt every step costs real time and only
        penalties read it; a row that reads no history is built once (256 rows a step add up)."""
        if self._row is not None:
            return self._row
        p = self.params
        penalties = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        prompt = self.token_ids[: self.num_prompt_tokens] if penalties else ()
        output = self.output_token_ids if penalties or p.min_tokens or _multi_token_bad_words(p) else ()
        row = SamplingRow(params=p, prompt_token_ids=prompt, output_token_ids=output,
                          generator=self.generator, eos_token_ids=self.eos_token_ids)
        if not self.needs_history:
            self._row = row
        return row


def _multi_token_bad_words(p: SamplingParams) -> bool:
    return any(len(w) > 1 for w in p.bad_words_token_ids)


@dataclass
class RunnerTimes:
    """Summed seconds per part of ``execute``. ``gpu_s`` is device time (CUDA events, read a step late)."""

    prepare_s: float = 0.0  # host: states, numpy inputs, uploads
    forward_s: float = 0.0  # host: launching the model (all of it on CPU, where nothing is async)
    sample_s: float = 0.0  # host: logits + sampler + the wait for the sampled ids (the two below)
    sample_launch_s: float = 0.0  # host: queuing lm_head and the sampler (on CPU: running them)
    sample_wait_s: float = 0.0  # host: blocked until the GPU has the sampled ids (forward included)
    early_collects: int = 0  # async: steps collected before the next submit (a row needed its ids)
    gpu_s: float = 0.0
    gpu_forward_s: float = 0.0  # device: the model up to the hidden states (CUDA events)
    gpu_sample_s: float = 0.0  # device: lm_head + sampler + the ids' copy back
    graph_steps: int = 0
    eager_steps: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class RunnerConfig:
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    cuda_graphs: bool = True  # on CUDA only; decode batches up to 256 sequences


def allocate_kv_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device) -> list[KVCache]:
    cfg = model.config
    # The head count of the weights (not the config) so a tensor-parallel shard sizes its own cache.
    num_kv_heads = model.model.layers[0].self_attn.num_local_kv_heads
    shape = (num_blocks, block_size, num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)]


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    num_kv_heads = model.model.layers[0].self_attn.num_local_kv_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[KVCache], config: RunnerConfig,
                 device: torch.device, sampler: Sampler | None = None, grammar: GrammarCompiler | None = None):
        self.model = model
        self.grammar = grammar  # None: requests with structured_outputs are refused
        self.kv_caches = kv_caches
        self.config = config
        self.block_size = config.block_size
        self.device = device
        self.sampler = sampler or Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        # Kept across preemption so a seeded request draws the same numbers whether or not it was evicted.
        self._generators: dict[str, torch.Generator] = {}
        max_seqs = max(config.max_num_seqs, 1)
        self.buffers = InputBuffers(max(config.max_num_batched_tokens, max_seqs), max_seqs,
                                    -(-config.max_model_len // config.block_size), device)
        self.times = RunnerTimes()
        # The sampled ids come back through pinned memory: the step's one host sync is on an event.
        # Two buffers: step N+1's copy may land before the host has read step N's.
        self._ids_host = [torch.empty(max_seqs, dtype=torch.int64, pin_memory=device.type == "cuda")
                          for _ in range(2)]
        self._submitted = 0  # steps submitted so far
        self._last: PendingStep | None = None  # the last submitted step
        self._last_ids: torch.Tensor | None = None  # its sampled ids on the device: [num_sampled]
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda":
            self._compile_lm_head(model, max_seqs)
        if config.cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(model, kv_caches, self.buffers, config.block_size,
                                       config.max_model_len, default_capture_sizes(max_seqs))
            self.graphs.capture()

    def reset_times(self) -> None:
        self.times = RunnerTimes()

    @staticmethod
    @torch.inference_mode()
    def _compile_lm_head(model: LlamaForCausalLM, max_seqs: int) -> None:
        """The LM head runs outside the decode graphs, and the skinny GEMM it may use for up to 8 rows
        (``shoal.kernels.gemv``) compiles at its first call per row count: call it at each count now,
        so that compile is not paid in a served step. In every rank's runner (with tensor parallelism
        the head's all-gather is a collective), which is why this is not part of ``LLMEngine.warm_up``."""
        weight = model.lm_head.weight
        for rows in range(1, min(max_seqs, 8) + 1):
            model.compute_logits(torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device))

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.submit(sched).collect()

    @torch.inference_mode()
    def submit(self, sched: SchedulerOutput) -> PendingStep:
        """Queue the step (inputs, forward, sampling, the ids' copy back) without waiting for it."""
        self._update_states(sched)
        if sched.is_empty:
            return PendingStep.ready(ModelRunnerOutput(sampled_token_ids={}))
        self._collect_for_history(sched)
        t0 = time.perf_counter()
        inputs, states, graph_bs, prompt_plan = self._prepare_inputs(sched)
        events = self._gpu_events_start()
        t1 = time.perf_counter()
        if graph_bs is not None:
            hidden = self.graphs.replay(graph_bs)
            self.times.graph_steps += 1
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
            self.times.eager_steps += 1
        t2 = time.perf_counter()
        mid = self._gpu_event(events)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_sampling, vocab]
        rows = [state.sampling_row() for state in states]
        mask = self.grammar.fill([s.grammar for s in states], self.device) if self.grammar is not None else None
        ids_dev = self.sampler.sample_ids(logits, rows, mask)  # [num_sampling]
        ids_host = self._ids_host[self._submitted % 2][:len(rows)]
        ids_host.copy_(ids_dev, non_blocking=self.device.type == "cuda")
        wanted = any(r.params.logprobs is not None for r in rows)
        lps = self.sampler.logprobs_launch(logits, rows, ids_dev) if wanted else None
        plps = prompt_logprobs.launch(self.model.compute_logits, hidden, prompt_plan) if prompt_plan else None
        end = self._gpu_event(events)  # after every copy of the step: what collect() waits on
        self._submitted += 1
        for i, state in enumerate(states):
            state.num_pending += 1
            state.pending_row, state.pending_step = i, self._submitted
        self._last_ids = ids_dev
        t3 = time.perf_counter()
        t = self.times
        t.prepare_s, t.forward_s = t.prepare_s + t1 - t0, t.forward_s + t2 - t1
        t.sample_launch_s += t3 - t2
        t.sample_s += t3 - t2
        self._last = PendingStep(states=states, ids_host=ids_host, done=end, logprobs=lps, prompt_logprobs=plps,
                                 timing=(events, mid, end) if events is not None else None,
                                 finish=self._collect)
        return self._last

    def _collect(self, pending: PendingStep) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        if pending.done is not None:
            pending.done.synchronize()
        token_ids = pending.ids_host.tolist()
        t1 = time.perf_counter()
        lps = self.sampler.logprobs_read(pending.logprobs) if pending.logprobs is not None else None
        t = self.times
        t.sample_wait_s += t1 - t0
        t.sample_s += time.perf_counter() - t0
        if pending.timing is not None:
            s, m, e = pending.timing
            t.gpu_s += s.elapsed_time(e) / 1e3
            t.gpu_forward_s += s.elapsed_time(m) / 1e3
            t.gpu_sample_s += m.elapsed_time(e) / 1e3
        sampled, logprobs, grammar_done = {}, {}, []
        for i, state in enumerate(pending.states):
            state.num_pending -= 1
            rid = state.request_id
            if self.requests.get(rid) is state:  # not dropped (finished, preempted) since it was submitted
                state.token_ids.append(token_ids[i])
                if state.grammar is not None:
                    state.grammar.accept(token_ids[i])
                    if state.grammar.finished:
                        grammar_done.append(rid)
            sampled[rid] = token_ids[i]
            if lps is not None and lps[i] is not None:
                logprobs[rid] = lps[i]
        plps = prompt_logprobs.read(pending.prompt_logprobs) if pending.prompt_logprobs is not None else {}
        return ModelRunnerOutput(sampled, logprobs, frozenset(grammar_done), plps)

    def _collect_for_history(self, sched: SchedulerOutput) -> None:
        """A row whose sampler reads its output ids on the host needs last step's token there now."""
        last = self._last
        if last is None or last.collected:
            return
        for rid in sched.num_scheduled_tokens:
            state = self.requests[rid]
            if state.num_pending and state.needs_history:
                self.times.early_collects += 1
                last.collect()
                return

    def _gpu_events_start(self):
        if self.device.type != "cuda":
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    @staticmethod
    def _gpu_event(start):
        if start is None:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _update_states(self, sched: SchedulerOutput) -> None:
        tables = self.buffers.block_tables
        for rid in sched.finished_request_ids:
            self.requests.pop(rid, None)
            self._generators.pop(rid, None)
            tables.close(rid)
        for rid in sched.preempted_request_ids:
            self.requests.pop(rid, None)
            tables.close(rid)
        for new in sched.new_requests:
            p = new.sampling_params
            if p.seed is not None and new.request_id not in self._generators:
                self._generators[new.request_id] = make_generator(p.seed, self.device)
            penalties = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            grammar = self._start_grammar(p, new.token_ids[new.num_prompt_tokens:])
            self.requests[new.request_id] = CachedRequestState(
                request_id=new.request_id, token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens, params=p, block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens, eos_token_ids=new.eos_token_ids,
                generator=self._generators.get(new.request_id),
                needs_history=penalties or p.min_tokens > 0 or grammar is not None or _multi_token_bad_words(p),
                grammar=grammar,
                table_row=tables.open(new.request_id))
        for cached in sched.cached_requests:
            state = self.requests[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _start_grammar(self, p: SamplingParams, output_token_ids) -> SequenceGrammar | None:
        """A constrained request's grammar state, rebuilt over what it generated before (a request
        resumed after preemption comes back as new, with its tokens)."""
        if p.structured_outputs is None:
            return None
        if self.grammar is None:
            raise ValueError("structured_outputs: this model runner has no grammar compiler (no tokenizer)")
        return self.grammar.start(p.structured_outputs, output_token_ids)

    def _prepare_inputs(self, sched: SchedulerOutput) -> tuple[
            StepInputs, list[CachedRequestState], int | None, prompt_logprobs.PromptLogprobsPlan | None]:
        rows = []
        prompt_plan = None  # rows that asked for prompt logprobs and compute prompt positions this step
        logits_indices: list[int] = []
        sampling: list[CachedRequestState] = []
        gather_dst: list[int] = []  # flat token positions whose id is last step's sample on the device
        gather_src: list[int] = []  # ... and its row in last step's sampled ids
        t = 0
        for rid, n in sched.num_scheduled_tokens.items():
            state = self.requests[rid]
            start = state.num_computed_tokens
            end = start + n
            known = len(state.token_ids)
            if end > known:  # its last token is in flight: sampled by the step submitted just before
                if end - known != 1 or state.num_pending != 1 or state.pending_step != self._submitted:
                    raise RuntimeError(f"request {rid}: {end - known} tokens to compute are unknown, "
                                       f"{state.num_pending} in flight (only the last step's token can be)")
                tokens = state.token_ids[start:known] + [0]
                gather_dst.append(t + n - 1)
                gather_src.append(state.pending_row)
            else:
                tokens = state.token_ids[start:end]
            rows.append((tokens, start, n, state.block_ids, state.table_row))
            k = state.params.prompt_logprobs
            if k is not None and start < state.num_prompt_tokens - 1:
                prompt_plan = prompt_plan or prompt_logprobs.PromptLogprobsPlan()
                prompt_plan.add(rid, state.token_ids, state.num_prompt_tokens, start, end, t, k)
            t += n
            state.num_computed_tokens = end
            if end == known + state.num_pending:  # caught up: this step yields its next token
                logits_indices.append(t - 1)
                sampling.append(state)
        decode_only = t == len(rows)
        graph_bs = self.graphs.size_for(len(rows)) if self.graphs is not None and decode_only else None
        num_tokens, num_seqs, max_q, max_s = self.buffers.fill(rows, self.block_size, pad_to=graph_bs)
        width = self.buffers.max_blocks_per_seq if graph_bs else max(len(r[3]) for r in rows)
        inputs = self.buffers.upload(num_tokens, num_seqs, logits_indices, max_q, max_s, width)
        if gather_dst:
            self.buffers.gather_ids(gather_dst, gather_src, self._last_ids)
        return inputs, sampling, graph_bs, prompt_plan

    @torch.inference_mode()
    def profile_peak_memory(self) -> int:
        """Peak bytes of one largest eager step (weights included), for sizing the KV cache on CUDA.

        Runs ``max_num_batched_tokens`` dummy tokens in sequences of at most ``max_model_len`` that
        write nothing to the cache (slot -1) and attend to block 0.
        """
        cfg = self.config
        left = self.buffers.max_num_tokens
        rows = []
        while left > 0 and len(rows) < self.buffers.max_num_seqs:
            n = min(left, cfg.max_model_len - 1)
            rows.append(([0] * n, 0, n, [0] * -(-n // cfg.block_size), None))
            left -= n
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens, num_seqs, max_q, max_s = self.buffers.fill(rows, cfg.block_size)
        self.buffers.h_slots[:num_tokens] = -1
        inputs = self.buffers.upload(num_tokens, num_seqs, [num_tokens - 1], max_q, max_s,
                                     max(len(r[3]) for r in rows))
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        logits = self.model.compute_logits(hidden[:1].expand(cfg.max_num_seqs, -1))
        self.sampler(logits, [SamplingRow(SamplingParams(top_p=0.9), [0], [])] * cfg.max_num_seqs)
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)
