"""``LLMEngine``: one engine on one device, from an ``EngineConfig`` to streamed ``RequestOutput``s.

It owns the tokenizer and the output processor (text, stop strings, ``n > 1``) around the ``EngineCore``
(scheduler + model runner). The offline ``LLM`` and the worker's RPC service both drive it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from typing import Sequence

import torch

from .config import EngineConfig
from .device import check_host_kv_fits, kernel_set, resolve_dtype, torch_device
from .engine.core import EngineCore
from .engine.kv_cache_manager import KVCacheManager
from .engine.output_processor import OutputProcessor
from .engine.outputs import RequestOutput
from .engine.request import Request, RequestStatus
from .engine.sampling_params import InvalidParam, SamplingParams
from .engine.scheduler import Scheduler, SchedulerConfig
from .executor.grammar import GrammarCompiler
from .executor.model_runner import ModelRunner, RunnerConfig, allocate_kv_caches, kv_bytes_per_block
from .models.loader import load_model, resolve_model
from .models.ops import kernel_ops

log = logging.getLogger(__name__)


def resolve_async_scheduling(config: EngineConfig, device: torch.device) -> bool:
    """``async_scheduling`` set: as set (EngineConfig refuses True with TP > 1). Unset: on for CUDA at
    one rank, where it was measured faster (H200, issue 15: 8B throughput +13 %, batch-1 5.14 -> 4.89 ms
    a token, serving +11-15 %), off on a CPU (nothing runs asynchronously there to overlap with) and
    with tensor parallelism (its executor runs each step to the end)."""
    if config.async_scheduling is not None:
        return bool(config.async_scheduling)
    return device.type == "cuda" and config.tensor_parallel_size == 1


CPU_MAX_MODEL_LEN = 8192


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        device = torch_device(config)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # Triton launches on the current device (this thread's)
        dtype = resolve_dtype(config.dtype, device)
        source = resolve_model(config.model)
        self.tokenizer = self._load_tokenizer(config, source)
        self.tp = None  # tensor_parallel_size > 1: the multi-process executor; self.model is rank 0's shard
        if config.tensor_parallel_size > 1:
            from .executor.tp_group import MultiprocTPExecutor

            self.tp = MultiprocTPExecutor(config, source)
            self.model = self.tp.model
        else:
            self.model = load_model(source, dtype=dtype, device=device, ops=kernel_ops(kernel_set(config)),
                                    load_format=config.load_format, seed=config.seed)
        mcfg = self.model.config
        self.model_config = mcfg
        self.max_model_len = config.max_model_len or min(
            mcfg.max_context_len, CPU_MAX_MODEL_LEN if device.type == "cpu" else 1 << 30)
        if self.max_model_len > mcfg.max_context_len:
            raise ValueError(f"max_model_len ({self.max_model_len}) must be <= {mcfg.context_limit_reason()}")
        # Batch limits: on a GPU fewer, larger steps pay (vLLM's H200 defaults, measured in
        # docs/benchmarks.md: +8.5 % on the 8B workload); on a CPU a step's cost grows with its tokens.
        default_budget, max_seqs = (2048, 256) if device.type == "cpu" else (16384, 1024)
        max_seqs = config.max_num_seqs or max_seqs
        budget = config.max_num_batched_tokens or (
            default_budget if config.enable_chunked_prefill else max(default_budget, self.max_model_len))
        runner_cfg = RunnerConfig(block_size=config.block_size, max_model_len=self.max_model_len,
                                  max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                  cuda_graphs=config.cuda_graphs)
        num_blocks = config.num_kv_blocks or self._fit_num_blocks(device, dtype, runner_cfg)
        if device.type == "cpu":
            check_host_kv_fits(num_blocks * kv_bytes_per_block(self.model, config.block_size, dtype),
                               "num_kv_blocks" if config.num_kv_blocks else "kv_cache_memory_gb")
        self.num_kv_blocks = num_blocks
        self.eos_token_ids = frozenset(mcfg.eos_token_ids) | (
            self.tokenizer.eos_token_ids if self.tokenizer is not None else frozenset())
        self.async_scheduling = resolve_async_scheduling(config, device)
        sched_cfg = SchedulerConfig(
            max_num_seqs=max_seqs, max_num_batched_tokens=budget,
            max_model_len=self.max_model_len, enable_chunked_prefill=config.enable_chunked_prefill,
            policy=config.scheduling_policy, async_scheduling=self.async_scheduling)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                       record_events=config.kv_events)
        # Structured output needs the tokenizer's vocabulary, and runs at one rank only for now.
        self.grammar = None
        if self.tokenizer is not None and self.tp is None:
            self.grammar = GrammarCompiler(self.tokenizer.to_json(), mcfg.vocab_size, sorted(self.eos_token_ids),
                                           max_seqs, pin_memory=device.type == "cuda")
        if self.tp is not None:
            self.tp.init_runners(runner_cfg, num_blocks)
            self.runner = self.tp.runner
        else:
            kv = allocate_kv_caches(self.model, num_blocks, config.block_size, dtype, device)
            self.runner = ModelRunner(self.model, kv, runner_cfg, device, grammar=self.grammar)
        self.scheduler = Scheduler(sched_cfg, self.kv_cache)
        self.core = EngineCore(self.scheduler, self.tp or self.runner, async_scheduling=self.async_scheduling)
        self.outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._kv_block_io = None
        if device.type == "cuda":
            self.warm_up()
        log.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d, async scheduling %s",
                 config.model, device, dtype, num_blocks, config.block_size, self.max_model_len,
                 "on" if self.async_scheduling else "off")

    # Dummy batches run before serving on CUDA: (prompts, tokens each) prefilled together, then one more
    # prompt beside their decodes.
    WARM_UP_WAVES = ((1, 100), (3, 33), (16, 32), (16, 512))

    def warm_up(self) -> None:
        """Run dummy batches through the real step path before serving (CUDA).

        Triton compiles a kernel at its first launch per specialization of its integer arguments (one
        sequence or several, counts divisible by 16 or not): graph capture covers the decode shapes,
        but the first wave of 16 prompts in a served c16 run stalled 2.9 s compiling the prefill ones
        (docs/benchmarks.md). Each wave is prefilled in one step, then a further prompt joins its
        decodes (a mixed step). Afterwards the prefix cache, the scheduler's counters and the step
        times are as a fresh engine's: nothing of it is visible to clients, metrics or benchmarks.
        """
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        vocab, limit = self.model_config.vocab_size, self.max_request_len - params.max_tokens
        budget = self.scheduler.config.max_num_batched_tokens
        start = 0
        for n, length in self.WARM_UP_WAVES:
            if length >= limit or n * length > budget:
                continue
            prompts = [[(start + i * length + t) % vocab for t in range(length)] for i in range(n + 1)]
            start += (n + 1) * length  # no wave shares a prefix with another
            for ids in prompts[:n]:
                self.add_request(ids, params)
            self.step()
            self.add_request(prompts[n], params)
            while self.has_unfinished_requests():
                self.step()
        self.kv_cache.reset_prefix_cache()
        self.scheduler.reset_stats()
        self.core.reset_times()
        self.runner.reset_times()

    @staticmethod
    def _load_tokenizer(config: EngineConfig, source):
        path = config.tokenizer or source.tokenizer_path
        if path is None:
            return None  # a shape preset: token-id prompts only
        from .tokenizer import Tokenizer

        return Tokenizer.from_path(path)

    def _fit_num_blocks(self, device: torch.device, dtype: torch.dtype, runner_cfg: RunnerConfig) -> int:
        per_block = kv_bytes_per_block(self.model, self.config.block_size, dtype)
        if device.type == "cuda":
            if self.tp is not None:
                peak = self.tp.profile_peak_memory(runner_cfg)  # every rank probes: the forward has collectives
            else:
                # One largest eager step over a one-block cache measures weights + activations + sampler.
                probe = ModelRunner(self.model, allocate_kv_caches(self.model, 1, self.config.block_size,
                                                                   dtype, device),
                                    replace(runner_cfg, cuda_graphs=False), device)
                peak = probe.profile_peak_memory()
                del probe
            torch.cuda.empty_cache()
            _, total = torch.cuda.mem_get_info(device)
            graphs_reserve = 512 << 20  # CUDA graph pools and allocator slack
            budget = total * self.config.gpu_memory_utilization - peak - graphs_reserve
        else:
            budget = self.config.kv_cache_memory_gb * (1 << 30)
        blocks_for_max_len = -(-self.max_model_len // self.config.block_size)
        num_blocks = int(budget // per_block)
        if num_blocks < blocks_for_max_len:
            raise ValueError(
                f"KV cache of {num_blocks} blocks cannot hold one max_model_len ({self.max_model_len}) "
                f"sequence: raise kv_cache_memory_gb / gpu_memory_utilization or lower max_model_len")
        return num_blocks

    # -- requests -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError(f"model {self.config.model!r} has no tokenizer: pass token ids as the prompt")
            return prompt, self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        return None, ids

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                    request_id: str | None = None, priority: int = 0) -> str:
        text, ids = self.encode_prompt(prompt)
        params = self.resolve_params(params)
        self.validate(ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        for child_id, child_params in self.outputs.add(request_id, text, ids, params):  # the n fan-out
            self.core.add_request(Request(child_id, ids, child_params, self.eos_token_ids, priority))
        return request_id

    def validate(self, ids: Sequence[int], params: SamplingParams) -> None:
        """Refuse what the engine cannot run, naming the field and the limit (reads config only)."""
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                             f"(the prompt plus at least one generated token must fit)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if params.logprobs is not None and params.logprobs > 20:
            raise ValueError(f"logprobs must be <= 20, got {params.logprobs}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > 20:
            raise InvalidParam("prompt_logprobs", f"prompt_logprobs must be <= 20, got {params.prompt_logprobs}")
        params.check_vocab(vocab)
        if params.bad_words and not params.bad_words_token_ids:
            raise InvalidParam("bad_words", "bad_words: not resolved to token ids (resolve_params; the model "
                                            "has no tokenizer)")
        if params.structured_outputs is not None:
            if self.grammar is None:
                why = "tensor_parallel_size > 1" if self.tp is not None else "the model has no tokenizer"
                raise InvalidParam(params.structured_outputs.field,
                                   f"{params.structured_outputs.field}: structured output is not available here "
                                   f"({why})")
            self.grammar.compile(params.structured_outputs)  # InvalidParam naming the field; cached for the run
        too_big = self.scheduler.admission_error(len(ids), params.max_tokens)  # would wait forever
        if too_big is not None:
            raise too_big

    def resolve_params(self, params: SamplingParams) -> SamplingParams:
        """``params`` with its bad words as token ids (this engine's tokenizer), when they are not yet."""
        if params.bad_words and not params.bad_words_token_ids and self.tokenizer is not None:
            return params.with_bad_words_resolved(lambda text: self.tokenizer.encode(text, add_special_tokens=False))
        return params

    @property
    def max_request_len(self) -> int:
        """The longest a request (prompt + generated tokens) can grow here: ``max_model_len``, or less
        when an explicit ``num_kv_blocks`` makes the KV cache smaller. Routers are told this one."""
        return self.scheduler.max_request_tokens

    def abort_request(self, request_id: str) -> None:
        self.core.finish_requests(self.outputs.abort(request_id), RequestStatus.FINISHED_ABORTED)

    @property
    def kv_block_io(self):
        """Whole-model reads and writes of KV blocks, whatever the TP size (disaggregated serving)."""
        if self._kv_block_io is None:
            from .executor.kv_transfer import CacheBlockIO

            self._kv_block_io = self.tp.block_io if self.tp is not None else CacheBlockIO(self.runner.kv_caches)
        return self._kv_block_io

    @property
    def stats(self):
        return self.scheduler.stats

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; a TP=1 engine holds nothing to stop)."""
        if self.tp is not None:
            self.tp.shutdown()

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One engine step; the requests it changed (``finished_only``: those it finished)."""
        results, stopped = self.outputs.process(self.core.step(), finished_only)
        for child_id, _ in stopped:
            self.core.finish_requests([child_id], RequestStatus.FINISHED_STOPPED)
        return results
