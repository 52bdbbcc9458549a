"""Workers: the engine (scheduler, KV cache, model runner) and the offline ``LLM`` API."""

from .engine.outputs import CompletionOutput, RequestOutput
from .engine.sampling_params import SamplingParams, StructuredOutputs


def __getattr__(name: str):
    # LLM pulls in torch; keep `import shoal.workers` light for torch-free users (the router).
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput", "CompletionOutput"]
