"""The grammar that forces a tool call (``tool_choice`` required or a named function): the call
format's own markup around a JSON object whose name is one of the tools and whose arguments match
that tool's ``parameters`` schema, so a forced call always parses. Compiled at the edge, like any
structured-output constraint: a schema the grammar engine cannot compile is a 400 naming the tool."""

from __future__ import annotations

from shoal.workers.engine.invalid_param import InvalidParam
from shoal.workers.engine.structured_outputs import StructuredOutputs, check

from .request import ToolPlan

# The JSON inside the markup is compact, like every structured output (a small model given free
# whitespace can spend its budget on newlines); llguidance reads these options from the schema.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = {"type": "object"}


def call_schema(plan: ToolPlan) -> dict:
    """The JSON schema of one call object: ``{"name": <a tool's name>, <args key>: <its parameters>}``.

    Each tool's parameters move under the call's properties, so their ``$defs`` (pydantic writes
    them) move to the root, renamed per tool (two tools may both define ``Item``), and their
    ``#/$defs/...`` references with them.
    """
    key = plan.parser.arguments_key
    defs: dict = {}
    options = []
    for i, t in enumerate(plan.tools):
        if plan.named is not None and t.function.name != plan.named:
            continue
        params = _hoist_defs(t.function.parameters or _ANY_OBJECT, f"tool{i}_", defs)
        options.append({"type": "object", "additionalProperties": False, "required": ["name", key],
                        "properties": {"name": {"const": t.function.name}, key: params}})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {"x-guidance": _COMPACT, **schema, **({"$defs": defs} if defs else {})}


def _hoist_defs(schema: dict, prefix: str, defs: dict) -> dict:
    own = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    for name, sub in own.items():
        defs[prefix + name] = _renamed_refs(sub, prefix)
    return _renamed_refs(body, prefix)


def _renamed_refs(value, prefix: str):
    if isinstance(value, dict):
        out = {k: _renamed_refs(v, prefix) for k, v in value.items()}
        ref = out.get("$ref")
        if isinstance(ref, str):
            for root in ("#/$defs/", "#/definitions/"):
                if ref.startswith(root):
                    out["$ref"] = "#/$defs/" + prefix + ref[len(root):]
        return out
    if isinstance(value, list):
        return [_renamed_refs(v, prefix) for v in value]
    return value


def forced_constraint(plan: ToolPlan) -> StructuredOutputs:
    """The constraint of a forced plan, compiled; ``InvalidParam`` on the tool whose schema fails."""
    grammar = plan.parser.forced_grammar(call_schema(plan), parallel=plan.parallel and plan.named is None)
    spec = StructuredOutputs("grammar", grammar)
    try:
        check(spec)
    except InvalidParam as e:
        raise _blame(plan, e) from None
    return spec


def _blame(plan: ToolPlan, error: InvalidParam) -> InvalidParam:
    """The tool whose parameters do not compile alone (the first one), else the whole set."""
    for i, tool in enumerate(plan.tools):
        if plan.named is not None and tool.function.name != plan.named:
            continue
        try:
            check(StructuredOutputs.json_schema({"x-guidance": _COMPACT, **(tool.function.parameters or {})}))
        except InvalidParam as e:
            field = f"tools.{i}.function.parameters"
            return InvalidParam(field, f"{field} {e.reason or e}")
    return InvalidParam("tools", f"tools: the forced tool-call grammar {error.reason or error}")
