"""Benchmark workloads, built without a tokenizer so they run against any OpenAI-compatible server.

A workload is a list of :class:`Session`: a session is one request, or the turns of one conversation
(each turn re-sends the history, including the server's real replies). Prompts are token ids drawn
from ``token_id_range`` (exact lengths, for ``/v1/completions``) or rendered as plain words, one word
per id (about one token each with most BPE vocabularies; the server's ``usage`` gives the real count).
Rendering is a pure function of the ids, so prompts that share token ids share text too.

* ``random``: independent prompts, lengths uniform in ``[L * (1 - r), L * (1 + r)]``.
* ``shared-prefix``: ``num_groups`` groups of ``prompts_per_group`` prompts; a group shares a
  ``prefix_len``-token prefix, each prompt adds a unique ``suffix_len``-token suffix; shuffled.
* ``multi-turn``: ``num_prompts`` conversations of ``num_turns`` user turns.
* ``sharegpt``: the first human turn of each conversation of a ShareGPT-format JSON file, with the
  first reply's length (about 4 characters a token) as the output length.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("random", "shared-prefix", "multi-turn", "sharegpt")

# Short, common words: about one token each (with their leading space) in Llama, Qwen, GPT-2 vocabs.
_WORDS = """
the of and to in is was for on that with as by at from his it an were are which this be or has had
not first one their its new after who they have her she two been other when there all during into
school time may years more most only over city some world would where later up such used many can
state about national out known university united then made under team year part high name since
three well both de being american people no film between these while through game season because
her series new work called war best music him life around men four day group same long both second
early east west north south river church back make five house side area film around like city small
""".split()
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS))  # order kept, duplicates dropped


@dataclass(frozen=True)
class Turn:
    """One request's user content: token ids (exact length) or text (``prompt_len`` is an estimate)."""

    prompt: tuple[int, ...] | str
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Session:
    """One request, or one conversation's user turns (sent in order, each after the previous reply)."""

    session_id: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "random"
    num_prompts: int = 100  # requests (random, sharegpt) or conversations (multi-turn)
    seed: int = 0
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 512  # shared-prefix
    suffix_len: int = 64
    num_groups: int = 8
    prompts_per_group: int = 16
    num_turns: int = 4  # multi-turn
    path: str | None = None  # sharegpt
    prompt_format: str = "ids"  # "ids" | "text"
    token_id_range: tuple[int, int] = (1000, 20000)

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, limit: str) -> None:
            if not ok:
                raise ValueError(f"dataset {field} must be {limit}, got {getattr(self, field)!r}")

        check(self.name in DATASETS, "name", f"one of {list(DATASETS)}")
        check(self.num_prompts >= 1, "num_prompts", ">= 1")
        check(self.input_len >= 1, "input_len", ">= 1")
        check(self.output_len >= 1, "output_len", ">= 1")
        check(0 <= self.range_ratio < 1, "range_ratio", "in [0, 1)")
        check(self.prefix_len >= 0, "prefix_len", ">= 0")
        check(self.suffix_len >= 1, "suffix_len", ">= 1")
        check(self.num_groups >= 1, "num_groups", ">= 1")
        check(self.prompts_per_group >= 1, "prompts_per_group", ">= 1")
        check(self.num_turns >= 1, "num_turns", ">= 1")
        check(self.prompt_format in ("ids", "text"), "prompt_format", "'ids' or 'text'")
        lo, hi = self.token_id_range
        check(0 <= lo < hi, "token_id_range", "0 <= low < high")
        check(self.name != "sharegpt" or bool(self.path), "path", "a ShareGPT JSON file for sharegpt")
        check(self.name not in ("multi-turn", "sharegpt") or self.prompt_format == "text",
              "prompt_format", "'text' for multi-turn and sharegpt (replies come back as text)")


def ids_to_text(ids: tuple[int, ...] | list[int]) -> str:
    """One word per id: equal id prefixes give equal text prefixes."""
    return " ".join(WORDS[i % len(WORDS)] for i in ids)


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    return rng.randint(max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio))))


def _ids(rng: random.Random, n: int, cfg: DatasetConfig) -> tuple[int, ...]:
    lo, hi = cfg.token_id_range
    return tuple(rng.randrange(lo, hi) for _ in range(n))


def _turn(ids: tuple[int, ...], output_len: int, cfg: DatasetConfig) -> Turn:
    prompt = ids if cfg.prompt_format == "ids" else ids_to_text(ids)
    return Turn(prompt, len(ids), output_len)


def random_sessions(cfg: DatasetConfig) -> list[Session]:
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.num_prompts):
        ids = _ids(rng, _length(rng, cfg.input_len, cfg.range_ratio), cfg)
        out.append(Session(f"random-{i}", (_turn(ids, _length(rng, cfg.output_len, cfg.range_ratio), cfg),)))
    return out


def shared_prefix_sessions(cfg: DatasetConfig) -> list[Session]:
    rng = random.Random(cfg.seed)
    out = []
    for g in range(cfg.num_groups):
        prefix = _ids(rng, cfg.prefix_len, cfg)
        for p in range(cfg.prompts_per_group):
            ids = prefix + _ids(rng, cfg.suffix_len, cfg)
            out.append(Session(f"group-{g}-{p}", (_turn(ids, cfg.output_len, cfg),)))
    rng.shuffle(out)  # interleave groups, as independent users would
    return out


def multi_turn_sessions(cfg: DatasetConfig) -> list[Session]:
    rng = random.Random(cfg.seed)
    out = []
    for c in range(cfg.num_prompts):
        turns = tuple(_turn(_ids(rng, _length(rng, cfg.input_len, cfg.range_ratio), cfg),
                            _length(rng, cfg.output_len, cfg.range_ratio), cfg)
                      for _ in range(cfg.num_turns))
        out.append(Session(f"conversation-{c}", turns))
    return out


def estimate_tokens(text: str) -> int:
    """About four characters a token (English, BPE); only used where no server count exists."""
    return max(1, round(len(text) / 4))


def sharegpt_sessions(cfg: DatasetConfig) -> list[Session]:
    """Filtered like vLLM's benchmark: prompt and reply >= 4 tokens, prompt <= 1024, sum <= 2048."""
    path = Path(cfg.path)
    if not path.is_file():
        raise ValueError(f"dataset path {cfg.path!r} is not a file")
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"dataset path {cfg.path!r}: expected a JSON list of ShareGPT conversations")
    pairs = []
    for entry in entries:
        turns = entry.get("conversations") or entry.get("conversation") or []
        human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        reply = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant", "model")), None)
        if not human or not reply:
            continue
        prompt_len, output_len = estimate_tokens(human), estimate_tokens(reply)
        if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        pairs.append((str(entry.get("id", len(pairs))), Turn(human, prompt_len, output_len)))
    if not pairs:
        raise ValueError(f"dataset path {cfg.path!r} has no usable ShareGPT conversations")
    rng = random.Random(cfg.seed)
    rng.shuffle(pairs)
    picked = [pairs[i % len(pairs)] for i in range(cfg.num_prompts)]  # repeat if the file is small
    return [Session(f"sharegpt-{i}-{sid}", (turn,)) for i, (sid, turn) in enumerate(picked)]


def build_sessions(cfg: DatasetConfig) -> list[Session]:
    return {"random": random_sessions, "shared-prefix": shared_prefix_sessions,
            "multi-turn": multi_turn_sessions, "sharegpt": sharegpt_sessions}[cfg.name](cfg)
