"""CUDA graphs for decode-only steps: one graph per batch size, replayed over the persistent buffers.

A decode step of a small model is mostly kernel-launch overhead; a graph replays the whole forward
with one launch. Batches are padded up to the nearest captured size with rows that write nothing.
"""

from __future__ import annotations

import bisect

import torch
import torch.distributed

from shoal.workers.models.llama import KVCache, LlamaForCausalLM

from .input_buffers import InputBuffers


def default_capture_sizes(max_num_seqs: int, limit: int = 512) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, every 8 to 256, every 16 to 512 (vLLM's largest), up to
    ``max_num_seqs``; a decode batch pads up to the next one (at most 15 dummy rows)."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, 513, 16))
    return [s for s in sizes if s <= min(max_num_seqs, limit)]


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[KVCache], buffers: InputBuffers,
                 block_size: int, max_model_len: int, sizes: list[int]):
        self.model = model
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = sorted(sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # batch size -> captured hidden states [bs, hidden]

    def size_for(self, num_seqs: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) and self.sizes[i] in self.graphs else None

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        width = self.buffers.max_blocks_per_seq
        # torch's default capture stream is made once per process, on whichever device was current
        # then: an engine on another GPU of the same process must bring its own.
        stream = torch.cuda.Stream(self.kv_caches[0][0].device)
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            n, seqs, _, _ = self.buffers.fill([], self.block_size, pad_to=bs)
            inputs = self.buffers.upload(n, seqs, [], 1, self.max_model_len, width)
            for _ in range(2):  # warm up: compile kernels, settle the allocator
                self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # With tensor parallelism the forward's all-reduces are captured too, while NCCL's watchdog
            # thread keeps querying events: a "global" capture would forbid that thread's CUDA calls.
            mode = "thread_local" if torch.distributed.is_initialized() else "global"
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=mode):
                out = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
            pool = graph.pool()
            self.graphs[bs] = graph
            self.outputs[bs] = out
        torch.cuda.synchronize()

    def replay(self, bs: int) -> torch.Tensor:
        self.graphs[bs].replay()
        return self.outputs[bs]
