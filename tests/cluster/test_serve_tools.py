"""Tool calling end to end through ``shoal serve --tool-call-parser hermes``: the flag reaches the
router process, a forced call's grammar crosses gRPC to the worker, and ``auto`` (which needs the
flag) is served."""

from __future__ import annotations

import json

import openai
import pytest

from tests.cluster.serve_support import start_serve

pytestmark = pytest.mark.slow  # loads the real SmolLM2 in a worker process

MODEL = "smollm2-135m"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                                          "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}}}}]
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def client():
    served = start_serve("--workers", "1", "--tool-call-parser", "hermes")
    try:
        with openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=120) as c:
            yield c
    finally:
        served.stop()


def test_a_forced_call_and_auto_through_shoal_serve(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=40, temperature=0)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")  # served: the flag enabled auto


def test_the_responses_api_through_shoal_serve(client):
    tools = [{"type": "function", **TOOLS[0]["function"]}]
    kwargs = dict(model=MODEL, input=ASK, tools=tools, tool_choice={"type": "function", "name": "get_weather"},
                  max_output_tokens=40, temperature=0)
    whole = client.responses.create(**kwargs)
    [call] = whole.output
    assert call.type == "function_call" and json.loads(call.arguments)["city"] in ("Paris", "Rome")
    events = list(client.responses.create(**kwargs, stream=True))
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
