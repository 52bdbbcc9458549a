"""Structured output end to end: ``shoal serve`` (router process, SmolLM2 worker over gRPC) and the
official openai client's ``chat.completions.parse`` with a pydantic model, plus vLLM's fields through
``extra_body`` and an uncompilable schema as the client's BadRequestError."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pydantic
import pytest

from tests.cluster.serve_support import start_serve

pytestmark = pytest.mark.slow  # loads the real SmolLM2 in a worker process

MODEL = "smollm2-135m"


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    size: Literal["small", "medium", "large"]


@pytest.fixture(scope="module")
def client():
    served = start_serve("--workers", "1")
    try:
        with openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=120) as c:
            yield c
    finally:
        served.stop()


def test_parse_with_a_pydantic_model_returns_a_parsed_object(client):
    done = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, max_tokens=60, temperature=0)
    message = done.choices[0].message
    assert isinstance(message.parsed, City), message.content
    assert City.model_validate_json(message.content) == message.parsed
    assert done.choices[0].finish_reason == "stop"


def test_vllm_fields_through_extra_body_and_a_bad_schema_is_a_400(client):
    r = client.completions.create(model=MODEL, prompt="A date:", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch("20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].text), r.choices[0].text
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick one."}], max_tokens=10, temperature=0.7,
        stream=True, extra_body={"guided_choice": ["alpha", "beta"]})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in ("alpha", "beta")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "strin" in json.dumps(e.value.body)
