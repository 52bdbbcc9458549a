"""What a request constrains its output to: a JSON schema, any JSON object, a regex, a choice, a grammar.

``StructuredOutputs`` is plain data (it travels inside ``SamplingParams``, over the worker's wire
too). :func:`grammar_text` turns it into the grammar engine's own text and :func:`check` compiles
that without a tokenizer, so the router refuses a bad constraint at the edge with the same message the
worker would give. The grammar engine is llguidance (no torch, no transformers): the router may import
this module.

JSON is generated compact (``", "`` and ``": "`` as separators, no other whitespace): a small model
given free whitespace can spend its whole budget on newlines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import llguidance

from .invalid_param import InvalidParam

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutputs:
    """One constraint. ``value``: the schema's JSON text (``json``), the pattern (``regex``), the
    EBNF/GBNF or Lark text (``grammar``), "" for ``json_object``; ``choices`` for ``choice``."""

    kind: Kind
    value: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.kind not in KINDS:
            raise InvalidParam("structured_outputs", f"structured_outputs: kind must be one of {list(KINDS)}, "
                                                     f"got {self.kind!r}", f"must be one of {list(KINDS)}")
        if self.kind == "choice":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise _invalid(self.kind, "must be a non-empty list of non-empty strings")
        elif self.choices:
            raise _invalid(self.kind, "takes no choices")
        if self.kind in ("json", "regex", "grammar") and not self.value:
            raise _invalid(self.kind, "must not be empty")

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> "StructuredOutputs":
        """From a schema object (or its JSON text), re-serialised compactly so equal schemas share a
        compiled grammar. Key order is kept: properties are generated in the schema's order."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise _invalid("json", f"is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise _invalid("json", f"must be a JSON schema object, got {type(schema).__name__}")
        return cls("json", json.dumps(schema, separators=(",", ":")))

    @property
    def field(self) -> str:
        """The ``structured_outputs`` field this constraint is spelled as (vLLM's names)."""
        return f"structured_outputs.{self.kind}"


def _invalid(kind: str, reason: str) -> InvalidParam:
    name = f"structured_outputs.{kind}"
    return InvalidParam(name, f"{name} {reason}", reason)


def grammar_text(spec: StructuredOutputs) -> str:
    """The llguidance grammar of ``spec`` (not yet checked: :func:`check` does that)."""
    try:
        if spec.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=_JSON_OPTIONS)
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type":"object"}', defaults=_JSON_OPTIONS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", list(spec.choices))
        return llguidance.grammar_from("grammar", spec.value)  # Lark, or GBNF/EBNF converted to Lark
    except ValueError as e:
        raise _invalid(spec.kind, f"cannot be compiled: {e}") from None


def check(spec: StructuredOutputs, tokenizer: "llguidance.LLTokenizer | None" = None) -> str:
    """The grammar text of ``spec``, after compiling it; ``InvalidParam`` naming the field (and the
    compiler's message, which names the schema part or the grammar line) when it cannot compile."""
    grammar = grammar_text(spec)
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise _invalid(spec.kind, f"cannot be compiled: {error.strip()}")
    return grammar
