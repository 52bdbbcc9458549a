"""Tool calling end to end: the official ``openai`` client against a router over real SmolLM2.

``tool_choice`` required / named is forced by the grammar engine, so even this 135M model must
produce a call whose arguments parse and match the tool's schema; a round trip then sends the call
and the tool's result back in the history (rendered by the fallback: SmolLM2's template takes no
tools). ``auto`` needs ``tool_call_parser`` (a second router has none: its 400 names the flag).
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from shoal.router.local_worker import LocalWorker

pytestmark = pytest.mark.slow

MODEL = "smollm2"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The local time in a city",
                                           "parameters": {"type": "object", "additionalProperties": False,
                                                          "required": ["city"],
                                                          "properties": {"city": {"type": "string",
                                                                                  "maxLength": 12}}}}}]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def urls(serve_module, smol_engine, smol_tokenizer):
    """Routers over one engine: with the hermes parser, without a parser, with llama3_json."""
    return tuple(serve_module([LocalWorker(smol_engine)], smol_tokenizer, served_model_name=MODEL,
                              tool_call_parser=parser)[0] for parser in ("hermes", None, "llama3_json"))


@pytest.fixture(scope="module")
def client(urls):
    with openai.OpenAI(base_url=f"{urls[0]}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def plain_client(urls):
    with openai.OpenAI(base_url=f"{urls[1]}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _check_weather_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER)
    return args


def test_named_call_round_trip(plain_client):
    # Forced calls need no parser: the router without one serves them.
    r = plain_client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                             max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    args = _check_weather_call(choice.message.tool_calls[0])
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    call = choice.message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None,
                      "tool_calls": [{"id": call.id, "type": "function",
                                      "function": {"name": call.function.name,
                                                   "arguments": call.function.arguments}}]},
                     {"role": "tool", "tool_call_id": call.id,
                      "content": json.dumps({"city": args["city"], "temperature": 21, "sky": "sunny"})}]
    final = plain_client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                                 max_tokens=40, temperature=0)
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    assert "21" in answer.message.content, answer.message.content  # it answered from the tool's result
    assert final.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt


def test_required_call_streamed_equals_whole(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60,
                  temperature=0, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "tool_calls"
    calls = whole.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    json.loads(calls[0].function.arguments)

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas)  # no markup leaked into content
    pieces = [t for d in deltas for t in (d.tool_calls or [])]
    assert pieces and pieces[0].id.startswith("call_") and pieces[0].type == "function"
    assert pieces[0].function.name == calls[0].function.name
    assert all(p.index == 0 for p in pieces) and all(p.id is None for p in pieces[1:])
    assert "".join(p.function.arguments or "" for p in pieces) == calls[0].function.arguments
    assert len(pieces) > 2, "the arguments came in one piece: not streamed"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"]

    # The streamed call goes back into the history; the answer streams as text.
    call = {"id": pieces[0].id, "type": "function",
            "function": {"name": pieces[0].function.name,
                         "arguments": "".join(p.function.arguments or "" for p in pieces)}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"answer": 21})}]
    answer = list(client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=16,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    assert text.strip() and not any(c.choices[0].delta.tool_calls for c in answer if c.choices)
    assert answer[-1].choices[0].finish_reason in ("stop", "length")


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: Literal["Paris", "London"]
    unit: Literal["celsius", "fahrenheit"]


def test_the_client_s_parse_and_stream_helpers(client):
    tool = openai.pydantic_function_tool(GetWeather)  # strict: true, pydantic's schema
    named = {"type": "function", "function": {"name": "GetWeather"}}
    done = client.chat.completions.parse(model=MODEL, messages=ASK, tools=[tool], tool_choice=named,
                                         max_tokens=40, temperature=0)
    parsed = done.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, GetWeather)
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=[tool], tool_choice=named,
                                        max_tokens=40, temperature=0) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == parsed


def test_parallel_required_calls_parse(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, temperature=0.8, seed=3, n=2)
    for choice in r.choices:
        calls = choice.message.tool_calls
        if choice.finish_reason == "length":  # several calls may run past max_tokens; each whole one parses
            calls = calls[:-1] if calls else []
        else:
            assert choice.finish_reason == "tool_calls" and calls
        for call in calls:
            assert call.function.name in ("get_weather", "get_time")
            json.loads(call.function.arguments)
        assert len({c.id for c in calls}) == len(calls)


def test_auto_streamed_equals_whole_and_no_markup_in_content(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call>" not in content and "<tool_call>" not in (whole.message.content or "")
    assert content == (whole.message.content or "")
    names = [t.function.name for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])
             if t.function and t.function.name]
    assert names == [t.function.name for t in whole.message.tool_calls or []]


# A free ('auto') answer that calls a tool, made certain with a regex constraint (the tiny model would
# rather answer in words): the parser reads the call out of real generated tokens.
FORCED_TEXT = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
               r'\{"city": "(Paris|London)", "unit": "celsius"\}\}\n</tool_call>')


def test_auto_reads_a_call_out_of_generated_text(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                  extra_body={"structured_outputs": {"regex": FORCED_TEXT}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Checking."
    [call] = whole.message.tool_calls
    assert _check_weather_call(call)["unit"] == "celsius"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking."
    pieces = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].function.name == "get_weather" and pieces[0].id.startswith("call_")
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_llama3_json_format_forced_and_parsed(urls):
    with openai.OpenAI(base_url=f"{urls[2]}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=60,
                                      temperature=0)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    _check_weather_call(r.choices[0].message.tool_calls[0])


def test_tool_choice_none_is_plain_text(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].message.content, str)


def _bad(client, param: str, *words: str, **kwargs) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=4, **{"messages": ASK, **kwargs})
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param, err
    for word in words:
        assert word in err["message"], (word, err)


def test_errors_name_the_field(client, plain_client):
    _bad(plain_client, "tool_choice", "--tool-call-parser", "auto", tools=TOOLS)
    _bad(plain_client, "tool_choice", "--tool-call-parser", tools=TOOLS, tool_choice="auto")
    _bad(client, "tool_choice.function.name", "get_wether", tools=TOOLS,
         tool_choice={"type": "function", "function": {"name": "get_wether"}})
    _bad(client, "tool_choice", "needs tools", tool_choice="required")
    _bad(client, "tool_choice", "must be", tools=TOOLS, tool_choice="always")
    _bad(client, "tools.0.function.name", tools=[{"type": "function", "function": {"description": "x"}}])
    _bad(client, "tools.0.function.name", tools=[{"type": "function", "function": {"name": "a b"}}])
    _bad(client, "tools.1.function.name", "twice", tools=[TOOLS[0], TOOLS[0]])
    _bad(client, "tools.0.function.parameters", "object",
         tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}])
    _bad(client, "tools.0.function.parameters", "compiled", tool_choice="required",
         tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                             "properties": {"a": {"type": "strin"}}}}}])
    _bad(client, "tools.0.type", tools=[{"type": "retrieval", "function": {"name": "f"}}])
    _bad(client, "response_format", "tool_choice", tools=TOOLS, tool_choice="required",
         response_format={"type": "json_object"})
    _bad(client, "functions", "not supported", "tools", functions=[{"name": "f"}])
    _bad(client, "function_call", "not supported", function_call={"name": "f"})
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]
    _bad(client, "messages.1.tool_calls.0.function.arguments", "JSON", messages=history, tools=TOOLS)


def test_tokenize_renders_tools_as_chat_does(client, urls):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    counted = httpx.post(f"{urls[0]}/tokenize", json={"model": MODEL, "messages": ASK, "tools": TOOLS}).json()
    assert counted["count"] == r.usage.prompt_tokens
    bare = httpx.post(f"{urls[0]}/tokenize", json={"model": MODEL, "messages": ASK}).json()
    assert bare["count"] < counted["count"]  # the tools are in the prompt
