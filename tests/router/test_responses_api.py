"""``/v1/responses`` end to end: the official ``openai`` client against a router over real SmolLM2.

The Responses API is served as the chat request it maps to, so greedy answers equal chat's; a stream's
events are the ones the SDK parses (it raises on a shape it does not know only for errors, so the
tests check the event types and their order themselves).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from shoal.router.local_worker import LocalWorker

pytestmark = pytest.mark.slow

MODEL = "smollm2"
ASK = "What is the capital of France?"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The current weather in a city",
          "parameters": WEATHER, "strict": True}]


@pytest.fixture(scope="module")
def url(serve_module, smol_engine, smol_tokenizer):
    return serve_module([LocalWorker(smol_engine)], smol_tokenizer, served_model_name=MODEL)[0]


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_plain_response_equals_chat(client):
    r = client.responses.create(model=MODEL, input=ASK, max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.status in ("completed", "incomplete")
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}], max_tokens=8,
                                          temperature=0)
    assert r.output_text == chat.choices[0].message.content and r.output_text.strip()
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0
    # instructions are the system message; a list of message items is the same conversation
    listed = client.responses.create(model=MODEL, instructions="You are terse.", max_output_tokens=8, temperature=0,
                                     input=[{"role": "user", "content": [{"type": "input_text", "text": ASK}]}])
    chat2 = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": ASK}])
    assert listed.output_text == chat2.choices[0].message.content and listed.instructions == "You are terse."


def test_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model=MODEL, input=ASK, max_output_tokens=2, temperature=0, metadata={"k": "v"})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.metadata == {"k": "v"}


def test_stream_events_and_text_equal_the_whole(client):
    kwargs = dict(model=MODEL, input=ASK, max_output_tokens=8, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    types = [e.type for e in events]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-4].text == text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == whole.usage.output_tokens
    assert final.id == events[0].response.id


def test_stream_lines_are_named_events(url):
    body = {"model": MODEL, "input": ASK, "max_output_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas] and "[DONE]" not in lines[-1]


def test_json_schema_format(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string",
                                                                                       "maxLength": 20}}}
    r = client.responses.create(model=MODEL, input="Name a city and its country as JSON.", max_output_tokens=60,
                                temperature=0, text={"format": {"type": "json_schema", "name": "place",
                                                                "schema": schema, "strict": True}})
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_function_call_round_trip(client):
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    r = client.responses.create(model=MODEL, input=ask, tools=TOOLS, max_output_tokens=60, temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"})
    calls = [i for i in r.output if i.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    args = json.loads(calls[0].arguments)
    jsonschema.validate(args, WEATHER)

    events = list(client.responses.create(model=MODEL, input=ask, tools=TOOLS, max_output_tokens=60, temperature=0,
                                          tool_choice={"type": "function", "name": "get_weather"}, stream=True))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(deltas) == done.arguments == calls[0].arguments and len(deltas) > 1
    assert not [e for e in events if e.type == "response.output_text.delta"]

    history = ask + [{"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
                      "arguments": calls[0].arguments},
                     {"type": "function_call_output", "call_id": calls[0].call_id,
                      "output": json.dumps({"city": args["city"], "temperature": 21, "sky": "sunny"})}]
    final = client.responses.create(model=MODEL, input=history, tools=TOOLS, tool_choice="none",
                                    max_output_tokens=40, temperature=0)
    assert [i.type for i in final.output] == ["message"]
    assert "21" in final.output_text, final.output_text
    assert final.usage.input_tokens > r.usage.input_tokens


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "wizard"}}}}, "text.format.schema"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}, "tools.0.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"model": "gpt-5"}, "model"),
])
def test_refusals_name_the_field(url, extra, param):
    r = httpx.post(f"{url}/v1/responses", json={"model": MODEL, "input": "hi", **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert param.split(".")[0] in err["message"]


def test_inert_values_are_accepted(client):
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=1, store=False, background=False,
                                include=[], truncation="disabled", text={"format": {"type": "text"}},
                                parallel_tool_calls=True, user="u1")
    assert r.status == "incomplete" and r.user == "u1"


def test_openapi_declares_it(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    body = schema["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ResponsesRequest")
    tools = schema["components"]["schemas"]["ResponsesRequest"]["properties"]["tools"]
    assert "parameters" in json.dumps(tools)


@pytest.fixture(scope="module")
def hermes_client(serve_module, smol_engine, smol_tokenizer):
    url = serve_module([LocalWorker(smol_engine)], smol_tokenizer, served_model_name=MODEL,
                       tool_call_parser="hermes")[0]
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_required_calls_streamed_equal_the_whole(hermes_client):
    tools = TOOLS + [{"type": "function", "name": "get_time", "description": "The local time in a city",
                      "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                                     "properties": {"city": {"type": "string", "maxLength": 12}}}}]
    kwargs = dict(model=MODEL, input="What is the weather and the time in Paris and in London?", tools=tools,
                  tool_choice="required", max_output_tokens=120, temperature=0)
    whole = hermes_client.responses.create(**kwargs)
    calls = [(i.name, i.arguments) for i in whole.output if i.type == "function_call"]
    assert calls and all(json.loads(a) for _, a in calls)
    events = list(hermes_client.responses.create(**kwargs, stream=True))
    final = events[-1].response
    assert [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in final.output] == \
        [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in whole.output]
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == done == list(range(len(final.output)))  # items open and close in order, one at a time
    # auto: the parser reads the text; plain text stays one message item
    auto = hermes_client.responses.create(model=MODEL, input="Say hello.", tools=tools, max_output_tokens=8,
                                          temperature=0)
    assert auto.tool_choice == "auto" and auto.output


def test_an_error_mid_stream_is_an_error_event(serve, smol_engine, smol_tokenizer):
    url = serve([LocalWorker(smol_engine)], smol_tokenizer, served_model_name=MODEL, request_timeout_s=1.0)[0]
    body = {"model": MODEL, "input": "Tell me a long story about a dragon.", "max_output_tokens": 400,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-2] == "event: error" and "[DONE]" not in lines[-1]
    last = json.loads(lines[-1][len("data: "):])
    assert last["type"] == "error" and last["code"] == "deadline_exceeded"
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        with pytest.raises(openai.APIError, match="request_timeout_s|deadline"):
            for _ in c.responses.create(**body):
                pass
