"""A chat request's tools before any model runs: the plan and its 400s, the forced-call grammar (it
accepts exactly the format's calls with schema-valid arguments), and the chat-template input
(arguments as objects; the fallback rendering for templates that take no tools)."""

from __future__ import annotations

import json

import llguidance
import pytest

from shoal.router.openai_protocol import ChatCompletionRequest
from shoal.router.tools import HermesToolParser, Llama3JsonToolParser
from shoal.router.tools.chat import prepare_chat_tools
from shoal.router.tools.grammar import forced_constraint
from shoal.router.tools.request import plan_tools
from shoal.router.tools.template import takes_tools, template_input
from shoal.workers.engine.invalid_param import InvalidParam
from shoal.workers.engine.structured_outputs import check

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping"}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]
# What Qwen2.5's template does with tools, in short: it reads the `tools` variable.
TOOLS_TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.tool_calls %}"
                  "{{ m.tool_calls[0].function.arguments.city }}{% endif %}\n{% endfor %}")
PLAIN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def plan(configured: str | None = "hermes", **fields):
    req = request(**fields)
    return plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, configured)


def refused(field: str, configured: str | None = "hermes", **fields) -> str:
    with pytest.raises(InvalidParam) as e:
        p = plan(configured, **fields)
        if p is not None and p.forced:
            forced_constraint(p)
    assert e.value.field == field, e.value
    return str(e.value)


def test_plans():
    assert plan(tools=[]) is None and plan(tool_choice="none") is None and plan(tool_choice="auto") is None
    auto = plan(tools=TOOLS)
    assert auto.choice == "auto" and auto.parses and not auto.forced and auto.parallel
    assert auto.parser is HermesToolParser
    named = plan(None, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}},
                 parallel_tool_calls=False)
    assert named.choice == "named" and named.named == "ping" and named.forced and not named.parallel
    assert named.parser is HermesToolParser  # forced calls need no configured parser
    assert plan("llama3_json", tools=TOOLS, tool_choice="required").parser is Llama3JsonToolParser
    none = plan(None, tools=TOOLS, tool_choice="none")
    assert none.choice == "none" and not none.parses


def test_refusals_name_the_field():
    assert "--tool-call-parser" in refused("tool_choice", None, tools=TOOLS)
    assert "'nope'" in refused("tool_choice.function.name", tools=TOOLS,
                               tool_choice={"type": "function", "function": {"name": "nope"}})
    refused("tool_choice", tool_choice="required")
    refused("tools.1.function.name", tools=[TOOLS[0], TOOLS[0]])
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "strin"}}}}}]
    assert "compiled" in refused("tools.0.function.parameters", tools=bad, tool_choice="required")
    with pytest.raises(ValueError, match="tool_choice"):
        request(tool_choice={"type": "function"})
    with pytest.raises(ValueError, match="parameters"):
        request(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}])


@pytest.fixture(scope="module")
def smol(smol_tokenizer):
    """The tokenizer, and the grammar engine's view of it."""
    tok = smol_tokenizer
    return tok, llguidance.LLTokenizer(tok.to_json(), n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_token_ids))


def accepts(grammar: str, smol, text: str) -> bool:
    tok, lltok = smol
    m = llguidance.LLMatcher(lltok, grammar, log_level=0)
    ok = m.consume_tokens(tok.encode(text, add_special_tokens=False))
    return bool(ok) and not m.is_error() and m.is_accepting()


@pytest.mark.parametrize("fmt,parallel", [("hermes", True), ("hermes", False), ("llama3_json", True)])
def test_forced_grammar_accepts_the_format_and_nothing_else(fmt, parallel, smol):
    p = plan(fmt, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel)
    grammar = check(forced_constraint(p))
    cls = p.parser
    one = cls.call_text([("get_weather", {"city": "Paris"})])
    assert accepts(grammar, smol, one)
    two = cls.call_text([("get_weather", {"city": "Rome"}), ("ping", {})])
    if fmt == "hermes":
        two = two.replace("\n<tool_call>", "<tool_call>")  # forced calls follow each other directly
    assert accepts(grammar, smol, two) == parallel
    assert not accepts(grammar, smol, cls.call_text([("get_weather", {"city": "Oslo"})]))
    assert not accepts(grammar, smol, cls.call_text([("nope", {})]))
    assert not accepts(grammar, smol, "Sure! " + one)


def test_named_grammar_allows_only_that_tool(smol):
    p = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}})
    grammar = check(forced_constraint(p))
    assert accepts(grammar, smol, HermesToolParser.call_text([("ping", {})]))
    assert not accepts(grammar, smol, HermesToolParser.call_text([("get_weather", {"city": "Paris"})]))


def test_pydantic_schemas_with_defs_keep_their_references(smol):
    item = {"type": "object", "properties": {"sku": {"type": "string", "enum": ["a1", "b2"]}}, "required": ["sku"],
            "additionalProperties": False}
    order = {"type": "object", "$defs": {"Item": item}, "required": ["items"], "additionalProperties": False,
             "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1,
                                      "maxItems": 2}}}
    other = {"type": "object", "definitions": {"Item": {"type": "integer"}}, "required": ["n"],
             "additionalProperties": False, "properties": {"n": {"$ref": "#/definitions/Item"}}}
    tools = [{"type": "function", "function": {"name": "order", "parameters": order}},
             {"type": "function", "function": {"name": "count", "parameters": other}}]
    grammar = check(forced_constraint(plan(tools=tools, tool_choice="required", parallel_tool_calls=False)))
    assert accepts(grammar, smol, HermesToolParser.call_text([("order", {"items": [{"sku": "b2"}]})]))
    assert accepts(grammar, smol, HermesToolParser.call_text([("count", {"n": 3})]))
    assert not accepts(grammar, smol, HermesToolParser.call_text([("order", {"items": [{"sku": "zz"}]})]))
    assert not accepts(grammar, smol, HermesToolParser.call_text([("count", {"n": "3"})]))


HISTORY = USER + [
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 22}'}]


def test_template_that_takes_tools_gets_them_and_argument_objects(smol_tokenizer):
    assert takes_tools(TOOLS_TEMPLATE) and not takes_tools(PLAIN_TEMPLATE)
    assert not takes_tools(smol_tokenizer.chat_template)  # the bundled SmolLM2: the fallback
    p = plan(tools=TOOLS)
    messages, extra = template_input(HISTORY, p.template_tools(), p.parser, TOOLS_TEMPLATE)
    assert extra == {"tools": p.template_tools()} and messages[1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris"}
    text = smol_tokenizer.apply_chat_template(messages, chat_template=TOOLS_TEMPLATE, **extra)
    assert text.startswith("<tools>get_weather;ping;</tools>") and "assistant: Paris" in text


def test_fallback_rendering_in_the_format_s_words(smol_tokenizer):
    p = plan(tools=TOOLS)
    system = [{"role": "system", "content": "Be brief."}]
    messages, extra = template_input(system + HISTORY, p.template_tools(), p.parser, PLAIN_TEMPLATE)
    assert extra == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    system_text = messages[0]["content"]
    assert system_text.startswith("Be brief.\n\n# Tools") and '"name": "get_weather"' in system_text
    assert messages[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                      '</tool_call>')
    assert messages[3:] == HISTORY[2:]
    assert "tool_calls" not in messages[2]
    no_system, _ = template_input(USER, p.template_tools(), Llama3JsonToolParser, PLAIN_TEMPLATE)
    assert no_system[0]["role"] == "system" and '"parameters"' in no_system[0]["content"]
    untouched, _ = template_input(USER, None, HermesToolParser, PLAIN_TEMPLATE)
    assert untouched == USER


def test_history_errors_name_the_field():
    bad = USER + [{"role": "assistant", "content": None,
                   "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]
    with pytest.raises(InvalidParam) as e:
        prepare_chat_tools(bad, None, None, None, "hermes", PLAIN_TEMPLATE)
    assert e.value.field == "messages.1.tool_calls.0.function.arguments"
    with pytest.raises(InvalidParam) as e:
        prepare_chat_tools(USER + [{"role": "assistant", "tool_calls": [{"function": {}}]}], None, None, None, None,
                           PLAIN_TEMPLATE)
    assert e.value.field == "messages.1.tool_calls.0.function.name"
