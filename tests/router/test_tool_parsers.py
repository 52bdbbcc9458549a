"""The tool-call parsers on their own: whole texts, and the same texts streamed in every split, which
must say exactly what the whole text says (no markup in content, arguments streamed as they come)."""

from __future__ import annotations

import json
import random

import pytest

from shoal.router.tools import (CallDelta, HermesToolParser, Llama3JsonToolParser, ParsedText,
                                available_tool_parsers, tool_parser_class)
from shoal.router.tools.base import partial_suffix
from shoal.router.tools.output import ToolCallOutput, whole_message


def calls_of(parsed: ParsedText) -> list[tuple[str, str]]:
    """(name, arguments) per call, the pieces joined."""
    out: dict[int, list] = {}
    for d in parsed.calls:
        if d.name is not None:
            assert d.index not in out, "a call was named twice"
            out[d.index] = [d.name, ""]
        else:
            assert d.index in out, "arguments before the call's name"
            out[d.index][1] += d.arguments
    assert sorted(out) == list(range(len(out)))
    return [tuple(v) for _, v in sorted(out.items())]


def streamed(cls, text: str, cuts: list[int]) -> tuple[ParsedText, list[str]]:
    parser, total, contents = cls(), ParsedText(), []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        part = parser.feed(text[a:b])
        contents.append(part.content)
        total += part
    end = parser.finish()
    contents.append(end.content)
    return total + end, contents


def every_split(cls, text: str, seed: int = 0) -> ParsedText:
    """Streamed one character at a time and in random pieces: the same content and calls as whole."""
    whole = cls().parse(text)
    rnd = random.Random(seed)
    splits = [list(range(1, len(text)))] + [sorted(rnd.sample(range(1, len(text)), k))
                                            for k in (1, 2, 5, 11) for _ in range(15) if k < len(text)]
    for cuts in splits:
        got, contents = streamed(cls, text, cuts)
        assert got.content == whole.content, cuts
        assert calls_of(got) == calls_of(whole), cuts
        for piece in contents if "<tool_call" not in whole.content else ():  # a non-call keeps its text
            assert "<tool_call" not in piece and "</tool_call" not in piece, (cuts, piece)
    return whole


HERMES_CASES = [
    # (text, content, [(name, arguments)])
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", '{"city": "Paris"}')]),
    ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": [1, "}{\\"]"], "b": {"c": null}}}\n</tool_call>',
     "Let me check.", [("f", '{"a": [1, "}{\\"]"], "b": {"c": null}}')]),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {"x": 1}}'
     '</tool_call>', "", [("f", "{}"), ("g", '{"x": 1}')]),
    ('<tool_call>\n{"arguments": {"q": "otters"}, "name": "search"}\n</tool_call>', "",
     [("search", '{"q": "otters"}')]),  # arguments first: held until the name
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("f", '{"a": 1}')]),
    ('<tool_call>{"name": "f"}</tool_call>', "", [("f", "{}")]),
    ('<tool_call>{"name": "f", "id": 7, "arguments": {"a": 1}}</tool_call>', "", [("f", '{"a": 1}')]),
    ("No tools needed: 2 < 3 and <tool is a word.\n", "No tools needed: 2 < 3 and <tool is a word.\n", []),
    ("a <tool_call> not json </tool_call> b", "a <tool_call> not json </tool_call> b", []),
    ('<tool_call>{"answer": 42}</tool_call>', '<tool_call>{"answer": 42}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": {"a": 1', "", [("f", '{"a": 1')]),  # cut off by max_tokens
    ('Hi <tool_call>{"na', "Hi <tool_call>{\"na", []),  # cut off before its name: content after all
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes(text, content, calls):
    whole = every_split(HermesToolParser, text)
    assert whole.content == content
    assert calls_of(whole) == calls
    for _, args in calls:
        if args.endswith("}"):
            assert isinstance(json.loads(args), dict)


LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", '{"city": "Paris"}')]),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}', "", [("f", '{"a": 1}')]),
    ('  {"name": "f", "parameters": {"a": 1}}; {"name": "g", "arguments": {}}', "",
     [("f", '{"a": 1}'), ("g", "{}")]),
    ("The weather is fine.", "The weather is fine.", []),
    ('{"answer": "not a call"}', '{"answer": "not a call"}', []),
    ('Sure: {"name": "f", "parameters": {}}', 'Sure: {"name": "f", "parameters": {}}', []),
    ('{"name": "f", "parameters": {"a": "b"}} and more', "and more", [("f", '{"a": "b"}')]),
]


@pytest.mark.parametrize("text,content,calls", LLAMA_CASES)
def test_llama3_json(text, content, calls):
    whole = every_split(Llama3JsonToolParser, text)
    assert whole.content == content
    assert calls_of(whole) == calls


def test_held_back_text_is_released_when_it_is_no_tag():
    p = HermesToolParser()
    assert p.feed("Hello <tool").content == "Hello"
    assert p.feed("box> is here").content == " <toolbox> is here"
    assert p.finish() == ParsedText()
    p = Llama3JsonToolParser()
    assert p.feed(" <|python").content == ""
    assert p.feed(" no").content == " <|python no"
    assert partial_suffix("abc<tool_ca", "<tool_call>") == 8 and partial_suffix("abc", "<tool_call>") == 0


def test_arguments_stream_as_they_arrive():
    p = HermesToolParser()
    assert p.feed('<tool_call>\n{"name": "f", ').calls == (CallDelta(0, name="f"),)
    assert p.feed('"arguments": {"a": ').calls == (CallDelta(0, arguments='{"a": '),)
    assert p.feed('"xy"}}\n</tool_call>').calls == (CallDelta(0, arguments='"xy"}'),)


def test_registry():
    assert {"hermes", "llama3_json"} <= set(available_tool_parsers())
    assert tool_parser_class("hermes") is HermesToolParser
    with pytest.raises(ValueError, match="hermes"):
        tool_parser_class("nope")


def test_output_ids_indexes_parallel_and_finish_reason():
    ids = iter(["call_a", "call_b"])
    text = ('<tool_call>{"name": "f", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "g", "arguments": {"x": 1}}</tool_call>')
    out = ToolCallOutput(HermesToolParser(), new_id=lambda: next(ids))
    content, calls = whole_message(out, text)
    assert content is None
    assert calls == [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                     {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}}]
    assert out.finish_reason("stop") == "tool_calls" and out.finish_reason("length") == "length"
    only_first = ToolCallOutput(HermesToolParser(), parallel=False)
    assert [c["function"]["name"] for c in whole_message(only_first, text)[1]] == ["f"]
    plain = ToolCallOutput(HermesToolParser())
    assert whole_message(plain, "just text ") == ("just text ", []) and plain.finish_reason("stop") == "stop"
    streaming = ToolCallOutput(HermesToolParser(), new_id=lambda: "call_s")
    assert streaming.delta("<tool_call>", False) == {}
    assert streaming.delta('{"name": "f", "arguments": {"a"', False) == {"tool_calls": [
        {"index": 0, "id": "call_s", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]}
    assert streaming.delta(": 1}}</tool_call>", True) == {
        "tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}


def test_history_rendering_round_trips_through_the_parser():
    for cls in (HermesToolParser, Llama3JsonToolParser):
        text = cls.call_text([("f", {"a": 1}), ("g", {})])
        assert calls_of(cls().parse(text)) == [("f", '{"a": 1}'), ("g", "{}")], cls


def test_a_name_that_is_no_tool_is_content():
    names = frozenset({"get_weather"})
    for cls, text in ((Llama3JsonToolParser, '{"name": "Bob", "age": 30}'),
                      (HermesToolParser, 'Hi <tool_call>{"name": "get_time", "arguments": {}}</tool_call>')):
        assert cls(names).parse(text) == ParsedText(text), cls
        parser, pieces = cls(names), []
        for ch in text:
            part = parser.feed(ch)
            assert not part.calls
            pieces.append(part.content)
        assert "".join(pieces) + parser.finish().content == text
    ok = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert calls_of(Llama3JsonToolParser(names).parse(ok)) == [("get_weather", '{"city": "Paris"}')]
