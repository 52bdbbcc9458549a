"""``EngineConfig``: everything one engine needs to start, validated on construction.

The one place an engine option is declared (name, type, default, help, limits): the flags of
``shoal serve`` / ``shoal generate`` / ``python -m shoal.workers.server`` / the benches and the
deployment spec's ``pools.<role>.engine`` keys are generated from it (``workers/options.py``).
Torch-free on purpose: routers and the cluster CLI import it. What the options mean on a device
(torch dtype, torch device, kernel set) is ``workers/device.py``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

from .options import OptionError, option, validate

DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")
DEFAULT_MODEL = "smollm2-135m"  # what the command line serves without --model


def _is_device(device: str) -> bool:
    index = device.removeprefix("cuda:")
    return device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and index.isdigit())


@dataclass(frozen=True)
class EngineConfig:
    model: str = option(
        help="HF checkpoint dir, .gguf file, alias 'smollm2-135m', or a shape preset (llama-3.1-8b, "
             "qwen2.5-0.5b, ...) with --load-format dummy", cli_default=DEFAULT_MODEL)
    tokenizer: str | None = option(None, "tokenizer path if not the model's own")
    load_format: str = option("auto", "'dummy': random weights of the model's shape", choices=("auto", "dummy"))
    dtype: str = option("auto", "weights and KV cache; 'auto': float32 on CPU (exact reference numerics), "
                                "bfloat16 on GPU", choices=DTYPES)
    device: str = option("auto", "'auto': cuda when available, else cpu",
                         check=(_is_device, "'auto', 'cpu', 'cuda' or 'cuda:N'"))
    kernels: str = option("auto", "'auto': triton on cuda, cpu (torch, decode attention batched) on cpu; "
                                  "'reference': the plain torch oracle", choices=("auto", "reference", "cpu", "triton"))
    seed: int = option(0, "seed of dummy weights and of unseeded sampling")
    max_model_len: int | None = option(
        None, "longest sequence (prompt + output); default: the model's max_position_embeddings, "
              "capped at 8192 on CPU", minimum=2)
    block_size: int = option(16, "tokens per KV cache block", choices=(1, 2, 4, 8, 16, 32, 64, 128))
    enable_prefix_caching: bool = option(True, "reuse cached KV blocks of shared prompt prefixes",
                                         flag="--prefix-caching")
    num_kv_blocks: int | None = option(None, "explicit KV cache size in blocks; overrides the memory-based "
                                             "sizing", minimum=1)
    kv_cache_memory_gb: float = option(2.0, "CPU: GiB for the KV cache", exclusive_minimum=0)
    gpu_memory_utilization: float = option(0.9, "GPU: fraction of total memory the engine may use",
                                           exclusive_minimum=0, maximum=1)
    max_num_seqs: int | None = option(None, "sequences running at once; default: 1024 on GPU, 256 on CPU",
                                      minimum=1)
    max_num_batched_tokens: int | None = option(
        None, "token budget of one step; default: 16384 on GPU, 2048 on CPU (without chunked prefill, at "
              "least max_model_len)", minimum=1)
    enable_chunked_prefill: bool = option(True, "split long prompts over steps (else a step's budget "
                                                "must hold a whole prompt)", flag="--chunked-prefill")
    scheduling_policy: str = option("fcfs", "'priority': lower request priority first, then arrival",
                                    choices=("fcfs", "priority"))
    cuda_graphs: bool = option(True, "capture decode steps as CUDA graphs (GPU only)")
    async_scheduling: bool | None = option(
        None, "schedule step N+1 and post-process step N while the device runs N+1 (overlap host with GPU); "
              "unset: on for CUDA at tensor_parallel_size 1, off on CPU and with tensor parallelism")
    kv_events: bool = option(False, "record cached-block changes for subscribers (the router's prefix "
                                    "index; worker servers always turn it on)")
    tensor_parallel_size: int = option(1, "ranks one engine is split over (processes on this machine; gloo "
                                          "on CPU, NCCL on GPU); rank 0 runs here", minimum=1, aliases=("-tp",))

    def __post_init__(self) -> None:
        validate(self)
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise OptionError("EngineConfig.async_scheduling",
                              f"must be unset or false with tensor_parallel_size {self.tensor_parallel_size} > 1 "
                              "(the tensor-parallel executor runs each step to the end), got True",
                              "async_scheduling")
