"""Structured output over HTTP: every spelling of a constraint (OpenAI's ``response_format``, vLLM's
``structured_outputs`` and ``guided_*``) on a router over real SmolLM2, streamed and not, and the
400s that name the field (a second constraint, an uncompilable schema, a refused sub-field)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from shoal.router.local_worker import LocalWorker

pytestmark = pytest.mark.slow

MODEL = "smollm2"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
# Free-form JSON (json_object) from a small model needs an example to stay short.
FEW_SHOT = 'Bob is 30: {"name": "Bob", "age": 30}\nAnn is 41:'


@pytest.fixture(scope="module")
def url(serve_module, smol_engine, smol_tokenizer):
    url, _ = serve_module([LocalWorker(smol_engine)], smol_tokenizer, served_model_name=MODEL)
    return url


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json={"model": MODEL, **body}, timeout=120)


def chat_text(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [c["message"]["content"] for c in r.json()["choices"]]


def test_chat_response_format_json_schema_and_json_object(url):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = post(url, "chat/completions", {"messages": ASK, "response_format": fmt, "max_tokens": 60,
                                       "temperature": 0.8, "seed": 5, "n": 2})
    texts = chat_text(r)
    assert len(texts) == 2 and all(c["finish_reason"] == "stop" for c in r.json()["choices"])
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    ask = [{"role": "user", "content": f"Continue with one JSON object. {FEW_SHOT}"}]
    r = post(url, "chat/completions", {"messages": ask, "response_format": {"type": "json_object"},
                                       "max_tokens": 60, "temperature": 0})
    assert isinstance(json.loads(chat_text(r)[0]), dict)
    r = post(url, "chat/completions", {"messages": ASK, "response_format": {"type": "text"}, "max_tokens": 3})
    assert r.status_code == 200  # text asks for nothing


def test_vllm_spellings_on_completions_and_chat(url):
    prompt = "The answer (yes or no):"
    cases = [
        ({"structured_outputs": {"regex": "[0-9]{2}-[a-z]{3}"}}, lambda t: re.fullmatch("[0-9]{2}-[a-z]{3}", t)),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_choice": ["red", "blue"]}, lambda t: t in ("red", "blue")),
        ({"guided_regex": "(ab)+c"}, lambda t: re.fullmatch("(ab)+c", t)),
        ({"guided_grammar": 'root ::= "x" [0-9] "y"'}, lambda t: re.fullmatch("x[0-9]y", t)),
        ({"guided_json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ({"structured_outputs": {"json": json.dumps(PERSON)}},
         lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict)),
    ]
    for extra, ok in cases:
        p = FEW_SHOT if "json_object" in json.dumps(extra) else prompt
        r = post(url, "completions", {"prompt": p, "max_tokens": 40, "temperature": 0, **extra})
        assert r.status_code == 200, (extra, r.text)
        text = r.json()["choices"][0]["text"]
        assert ok(text), (extra, text)
    r = post(url, "chat/completions", {"messages": ASK, "max_tokens": 60, "temperature": 0,
                                       "structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(chat_text(r)[0]), PERSON)


def test_streamed_chat_concatenates_to_valid_json(url):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": ASK, "response_format": fmt, "max_tokens": 60,
                            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert len(events) > 4
    jsonschema.validate(json.loads(text), PERSON)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path, body, param, words", [
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}},
     "response_format.json_schema.schema", "strin"),
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/$defs/missing"}}}}, "response_format.json_schema.schema", "missing"),
    ("completions", {"guided_regex": "a(b"}, "guided_regex", "unclosed"),
    ("completions", {"structured_outputs": {"grammar": "start: nothing_here\n"}}, "structured_outputs.grammar",
     "nothing_here"),
    ("completions", {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ("completions", {"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ("completions", {"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "only one"),
    ("chat/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs.regex", "only one"),
    ("completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice",
     "only one"),
    ("completions", {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag",
     "not supported"),
    ("completions", {"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "not supported"),
    ("chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
])
def test_bad_constraints_are_400_naming_the_field(url, path, body, param, words):
    base = {"messages": ASK} if path.startswith("chat") else {"prompt": "x"}
    r = post(url, path, {**base, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
