"""The model runner: turns a ``SchedulerOutput`` into one forward pass and one sampled token per
request that reached the end of its known tokens.

It keeps its own copy of each request's tokens and block ids, updated from the scheduler's diffs and
its own samples, so nothing live crosses from the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shoal.workers.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.models.llama import KVCache, LlamaForCausalLM
from shoal.workers.models.ops import AttentionMetadata

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

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling] rows of the hidden states that sample
    sampling_ids: list[str] = field(default_factory=list)


def allocate_kv_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device) -> list[KVCache]:
    cfg = model.config
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)]


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[KVCache], block_size: int,
                 device: torch.device, sampler: Sampler | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = sampler or Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        # Kept across preemption so a seeded request draws the same numbers whether or not it was evicted.
        self._generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        batch = self._prepare_inputs(sched)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [num_sampling, vocab]
        rows = [self._sampling_row(self.requests[rid]) for rid in batch.sampling_ids]
        out = self.sampler(logits, rows)
        sampled: dict[str, int] = {}
        logprobs = {}
        for i, rid in enumerate(batch.sampling_ids):
            self.requests[rid].token_ids.append(out.token_ids[i])
            sampled[rid] = out.token_ids[i]
            if out.logprobs[i] is not None:
                logprobs[rid] = out.logprobs[i]
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids:
            self.requests.pop(rid, None)
            self._generators.pop(rid, None)
        for rid in sched.preempted_request_ids:
            self.requests.pop(rid, None)
        for new in sched.new_requests:
            p = new.sampling_params
            if p.seed is not None and new.request_id not in self._generators:
                self._generators[new.request_id] = make_generator(p.seed, self.device)
            self.requests[new.request_id] = CachedRequestState(
                request_id=new.request_id, token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens, params=p, block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens, eos_token_ids=new.eos_token_ids,
                generator=self._generators.get(new.request_id))
        for cached in sched.cached_requests:
            state = self.requests[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _prepare_inputs(self, sched: SchedulerOutput) -> BatchInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_indices: list[int] = []
        sampling_ids: list[str] = []
        for rid, n in sched.num_scheduled_tokens.items():
            state = self.requests[rid]
            start = state.num_computed_tokens
            end = start + n
            input_ids += state.token_ids[start:end]
            for pos in range(start, end):
                positions.append(pos)
                slots.append(state.block_ids[pos // bs] * bs + pos % bs)
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            tables.append(state.block_ids)
            state.num_computed_tokens = end
            if end == len(state.token_ids):  # caught up: this step yields its next token
                logits_indices.append(query_start[-1] - 1)
                sampling_ids.append(rid)
        width = max(len(t) for t in tables)
        table = torch.zeros((len(tables), width), dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=table.to(dev),
            max_query_len=max(b - a for a, b in zip(query_start, query_start[1:])),
            max_seq_len=max(seq_lens))
        return BatchInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta, logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=dev),
            sampling_ids=sampling_ids)

    @staticmethod
    def _sampling_row(state: CachedRequestState) -> SamplingRow:
        return SamplingRow(params=state.params, prompt_token_ids=state.token_ids[: state.num_prompt_tokens],
                           output_token_ids=state.output_token_ids, generator=state.generator,
                           eos_token_ids=state.eos_token_ids)
