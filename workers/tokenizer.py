"""Text <-> token ids and chat templates, from a Hugging Face tokenizer directory or a GGUF file.

The router imports this module, so it stays free of torch and transformers: the work is done by the
``tokenizers`` library (Rust), chat templates by ``jinja2``, and a GGUF's tokenizer is rebuilt from its
``tokenizer.ggml.*`` metadata the way llama.cpp reads it (``llama-vocab.cpp``), which is the reference
for what a GGUF's ids mean.

Invariants:
- ``encode(text, add_special_tokens=True) == [bos]*add_bos_token + encode(text, False) + [eos]*add_eos``:
  BOS/EOS are added here, not by a ``tokenizers`` post-processor, so both sources behave alike.
- ``decode`` never raises on a partial UTF-8 sequence (it yields U+FFFD); the incremental detokenizer
  relies on that to wait for the rest of a character.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import gguf
import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

__all__ = ["Tokenizer", "read_gguf_metadata"]


class Tokenizer:
    """One tokenizer with its special ids, BOS/EOS policy and chat template. Build with :meth:`from_path`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_eos_token_ids: Sequence[int] = (),
        special_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
    ) -> None:
        if add_bos_token and bos_token_id is None:
            raise ValueError("add_bos_token is set but the tokenizer has no bos_token_id")
        if add_eos_token and eos_token_id is None:
            raise ValueError("add_eos_token is set but the tokenizer has no eos_token_id")
        self._backend = backend
        self.vocab_size: int = vocab_size if vocab_size is not None else backend.get_vocab_size(True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        eos = {eos_token_id} if eos_token_id is not None else set()
        self.eos_token_ids: frozenset[int] = frozenset(eos | {int(i) for i in extra_eos_token_ids})
        named = {bos_token_id, eos_token_id, pad_token_id, unk_token_id} - {None}
        self.all_special_ids: frozenset[int] = frozenset(
            named | self.eos_token_ids | {int(i) for i in special_token_ids}
        )
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._prefix = [bos_token_id] if add_bos_token else []
        self._suffix = [eos_token_id] if add_eos_token else []

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "Tokenizer":
        """A tokenizer from an HF tokenizer directory, a ``.gguf`` file, or a directory holding one GGUF."""
        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                return _from_hf_dir(p)
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return _from_gguf(ggufs[0])
            raise ValueError(
                f"tokenizer path {str(p)!r} is a directory without tokenizer.json and with "
                f"{len(ggufs)} .gguf files (need tokenizer.json or exactly one .gguf)"
            )
        if p.is_file():
            if p.name == "tokenizer.json":
                return _from_hf_dir(p.parent)
            with open(p, "rb") as f:
                if f.read(4) == b"GGUF":
                    return _from_gguf(p)
            raise ValueError(f"tokenizer path {str(p)!r} is neither a GGUF file nor tokenizer.json")
        raise ValueError(f"tokenizer path {str(p)!r} does not exist")

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (e.g. ``<|im_start|>``) become their ids."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            return self._prefix + ids + self._suffix
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; an incomplete UTF-8 sequence decodes to U+FFFD, never an error."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._backend.id_to_token(int(i)) for i in ids]

    def to_json(self) -> str:
        """The ``tokenizers`` serialisation of the vocabulary and pipeline (a grammar engine reads it)."""
        return self._backend.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self._backend.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for ``messages``, rendered like HF ``apply_chat_template(tokenize=False)``.

        Extra keyword arguments (``tools``, ``documents``, ``enable_thinking``, ...) become template
        variables; ``chat_template=`` overrides the tokenizer's own template.
        """
        template = kwargs.pop("chat_template", None) or self.chat_template
        if not template:
            raise ValueError(
                "chat_template is missing: this tokenizer has none (looked in tokenizer_config.json, "
                "chat_template.jinja and GGUF tokenizer.chat_template); pass chat_template=..."
            )
        context: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "tools": None,
            "documents": None,
        }
        for name, tid in (("pad_token", self.pad_token_id), ("unk_token", self.unk_token_id)):
            if tid is not None:
                context[name] = self._backend.id_to_token(tid)
        context.update(kwargs)
        context["messages"] = messages
        context["add_generation_prompt"] = add_generation_prompt
        return _compile_template(template).render(**context)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={sorted(self.eos_token_ids)}, "
            f"add_bos_token={self.add_bos_token}, chat_template={'yes' if self.chat_template else 'no'})"
        )


# ================================================================================================
# Chat templates: the HF-compatible jinja2 environment.
# ================================================================================================


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF marks assistant spans with it): render the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON (as HF renders it).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Templates come from model files, i.e. untrusted: render them in jinja's immutable sandbox."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# ================================================================================================
# HF tokenizer directory.
# ================================================================================================


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any) -> str | None:
    """chat_template is a string, or a list of ``{"name", "template"}`` of which "default" is the one."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def _probe_added_ids(backend: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The ids tokenizer.json's post-processor puts before and after a text (e.g. Llama-3's BOS)."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k], full[k + len(plain) :]
    return [], []


def _from_hf_dir(d: Path) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    cfg = _read_json(d / "tokenizer_config.json")
    gen = _read_json(d / "generation_config.json")

    def token_id(name: str) -> int | None:
        content = _token_content(cfg.get(name))
        return backend.token_to_id(content) if content is not None else None

    bos, eos, pad, unk = (token_id(n) for n in ("bos_token", "eos_token", "pad_token", "unk_token"))
    gen_eos = gen.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if eos is None and gen_eos:
        eos = gen_eos[0]
    if bos is None and isinstance(gen.get("bos_token_id"), int):
        bos = gen["bos_token_id"]

    special = [tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special]
    for name in ("additional_special_tokens", "extra_special_tokens"):
        extra = cfg.get(name) or []
        for content in extra.values() if isinstance(extra, dict) else extra:
            tid = backend.token_to_id(_token_content(content) or "")
            if tid is not None:
                special.append(tid)

    # BOS/EOS: explicit tokenizer_config flags win; otherwise whatever tokenizer.json's post-processor adds.
    prefix, suffix = _probe_added_ids(backend)
    add_bos = cfg["add_bos_token"] if "add_bos_token" in cfg else (bos is not None and prefix == [bos])
    add_eos = cfg["add_eos_token"] if "add_eos_token" in cfg else (eos is not None and suffix == [eos])

    template_file = d / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    else:
        template = _pick_template(cfg.get("chat_template")) or _pick_template(
            _read_json(d / "chat_template.json").get("chat_template")
        )
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_id=eos,
        extra_eos_token_ids=gen_eos,
        special_token_ids=special,
        chat_template=template,
        add_bos_token=bool(add_bos) and bos is not None,
        add_eos_token=bool(add_eos) and eos is not None,
        pad_token_id=pad,
        unk_token_id=unk,
    )


# ================================================================================================
# GGUF: a fast metadata reader, and the tokenizer rebuilt from tokenizer.ggml.* keys.
# ================================================================================================

_VT = gguf.GGUFValueType
_SCALAR_FORMATS = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
    _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d",
}


def read_gguf_metadata(path: str | os.PathLike, prefixes: tuple[str, ...] = ("tokenizer.", "general.")) -> dict:
    """The GGUF key/values whose key starts with one of ``prefixes``; tensors are not touched.

    ``gguf.GGUFReader`` builds a numpy view per array element, which takes seconds for a 128k vocab
    with 280k merges; this walks the header once with ``struct`` (~10x faster) and returns strings as
    ``str``, numeric arrays as lists, scalars as Python numbers.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _parse_gguf_header(buf, prefixes)
        finally:
            buf.release()


def _parse_gguf_header(buf: memoryview, prefixes: tuple[str, ...]) -> dict:
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file: magic is not b'GGUF'")
    (version,) = struct.unpack_from("<I", buf, 4)
    # A big-endian file reads its version byte-swapped (its low 16 bits are then zero).
    e = "<" if version & 0xFFFF else ">"
    (version,) = struct.unpack_from(e + "I", buf, 4)
    if version < 2:
        raise ValueError(f"GGUF version must be >= 2, got {version}")
    _, n_kv = struct.unpack_from(e + "QQ", buf, 8)
    pos = 24
    out: dict[str, Any] = {}

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from(e + "Q", buf, pos)
        return str(buf[pos + 8 : pos + 8 + n], "utf-8", "replace"), pos + 8 + n

    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from(e + "I", buf, pos)
        pos += 4
        keep = key.startswith(prefixes)
        if vtype == _VT.STRING:
            value, pos = string(pos)
        elif vtype == _VT.ARRAY:
            etype, count = struct.unpack_from(e + "IQ", buf, pos)
            pos += 12
            if etype == _VT.STRING:
                value = []
                for _ in range(count):
                    s, pos = string(pos) if keep else (None, pos + 8 + struct.unpack_from(e + "Q", buf, pos)[0])
                    value.append(s)
            elif etype in _SCALAR_FORMATS:
                dtype = np.dtype(_SCALAR_FORMATS[etype]).newbyteorder(e)
                value = np.frombuffer(buf, dtype, count, pos).tolist() if keep else None
                pos += count * dtype.itemsize
            else:
                raise ValueError(f"GGUF key {key!r}: nested arrays (element type {etype}) are not supported")
        elif vtype in _SCALAR_FORMATS:
            fmt = e + _SCALAR_FORMATS[vtype]
            (value,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
        else:
            raise ValueError(f"GGUF key {key!r}: unknown value type {vtype}")
        if keep:
            out[key] = value
    return out


_K = gguf.Keys.Tokenizer
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = (int(t) for t in gguf.TokenType)

# Pre-tokenizer regexes by tokenizer.ggml.pre, as llama.cpp applies them (each splits the pieces the
# previous one made; matches and the text between them both become pieces). The contractions are
# spelled case by case rather than with (?i:...), as llama.cpp does.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")
# llama.cpp: the Llama-3 family takes a whole pre-token that is itself in the vocab before any merge,
# and adds BOS unless the file says otherwise.
_LLAMA3_FAMILY = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "lfm2"})
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT_SPLITS,
    **{name: (_LLAMA3_SPLIT,) for name in (*_LLAMA3_FAMILY, "dbrx", "smaug-bpe")},
    **{name: (_QWEN2_SPLIT,) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
    **{name: (_GPT2_SPLIT,) for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4")},
    **{name: (r"\p{N}", _GPT2_SPLIT) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell")},
}


def _from_gguf(path: Path) -> Tokenizer:
    meta = read_gguf_metadata(path)
    model = meta.get(_K.MODEL)
    tokens: list[str] | None = meta.get(_K.LIST)
    if not tokens:
        raise ValueError(f"GGUF {path.name}: no {_K.LIST} (this file carries no tokenizer)")
    types: list[int] = meta.get(_K.TOKEN_TYPE) or [_NORMAL] * len(tokens)
    if model == "gpt2":
        pre = meta.get(_K.PRE) or "default"
        backend = _byte_level_bpe(tokens, meta.get(_K.MERGES) or [], pre)
        defaults = {"bos": None, "eos": None, "add_bos": pre in _LLAMA3_FAMILY}
    elif model == "llama":
        add_prefix = bool(meta.get(_K.ADD_PREFIX, True))
        backend = _sentencepiece_bpe(tokens, meta.get(_K.SCORES), types, meta.get(_K.UNK_ID, 0), add_prefix)
        defaults = {"bos": 1, "eos": 2, "add_bos": True}
    else:
        raise ValueError(f"GGUF {path.name}: {_K.MODEL} must be 'gpt2' or 'llama', got {model!r}")

    def tid(key: str, default: int | None = None) -> int | None:
        value = meta.get(key, default)
        return value if value is not None and 0 <= value < len(tokens) else None

    bos, eos = tid(_K.BOS_ID, defaults["bos"]), tid(_K.EOS_ID, defaults["eos"])
    end_ids = [t for t in (tid(_K.EOT_ID), tid(_K.EOM_ID)) if t is not None]
    # llama.cpp also ends generation on control tokens with these well-known end-of-turn spellings.
    end_ids += [i for i, t in enumerate(tokens) if t in _END_OF_TURN_TOKENS and types[i] == _CONTROL]
    special = [i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
    _add_special_tokens(backend, tokens, types)
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_id=eos,
        extra_eos_token_ids=end_ids,
        special_token_ids=special,
        chat_template=meta.get(_K.CHAT_TEMPLATE),
        add_bos_token=bool(meta.get(_K.ADD_BOS, defaults["add_bos"])) and bos is not None,
        add_eos_token=bool(meta.get(_K.ADD_EOS, False)) and eos is not None,
        vocab_size=len(tokens),
        pad_token_id=tid(_K.PAD_ID),
        unk_token_id=tid(_K.UNK_ID),
    )


_END_OF_TURN_TOKENS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<|end_of_text|>"}
)


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    # A spelling listed twice maps to its last id, as in llama.cpp's token_to_id.
    return {t: i for i, t in enumerate(tokens)}


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    """GPT-2-style BPE over bytes spelled as printable chars (``Ġ`` is a space)."""
    if pre not in _PRE_SPLITS:
        raise ValueError(
            f"tokenizer.ggml.pre {pre!r} is not supported; supported: {sorted(_PRE_SPLITS)}"
        )
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)  # llama.cpp's split: the first space after the first char
        if cut > 0:
            pairs.append((m[:cut], m[cut + 1 :]))
    model = models.BPE(_vocab_dict(tokens), pairs, ignore_merges=pre in _LLAMA3_FAMILY)
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float] | None, types: list[int], unk_id: int, add_space_prefix: bool
) -> tokenizers.Tokenizer:
    """llama.cpp's SPM tokenizer as a ``tokenizers`` BPE.

    llama.cpp repeatedly joins the adjacent pair whose joined text is the best-scored token; BPE with
    merges ranked by that score (ties: lower id first) makes the same joins. Characters with no token
    fall back to ``<0xNN>`` byte tokens. Spaces are ``▁``, and a ``▁`` is prepended to each run of text
    (llama.cpp's add_space_prefix, also after a special token); decoding strips that one space.
    """
    if scores is None:
        raise ValueError(f"a 'llama' GGUF tokenizer needs {_K.SCORES}")
    vocab = _vocab_dict(tokens)
    mergeable = {t: i for t, i in vocab.items() if types[i] in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for tok, i in mergeable.items():
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()
    model = models.BPE(
        vocab,
        [(left, right) for *_, left, right in ranked],
        unk_token=tokens[unk_id] if 0 <= unk_id < len(tokens) else None,
        byte_fallback=True,
        fuse_unk=True,
    )
    backend = tokenizers.Tokenizer(model)
    norm = [normalizers.Replace(" ", "▁")]
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
        steps.append(decoders.Strip(" ", 1, 0))
    backend.normalizer = normalizers.Sequence(norm)
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens are special (matched whole in text, skipped by skip_special_tokens);
    user-defined tokens are matched whole too but are ordinary text when decoding (as in llama.cpp)."""
    control = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)
    ]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
