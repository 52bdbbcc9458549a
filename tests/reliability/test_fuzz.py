"""Schema fuzzing of the router's own ``/openapi.json``, against a real router host and a tiny engine.

Each POST endpoint's request body, as the served schema declares it, drives hypothesis
(hypothesis-jsonschema turns the schema into a strategy): bodies the schema allows, the same bodies
with one field swapped for an arbitrary JSON value, and arbitrary JSON. Then hand-written nasty
bodies: wrong types, huge and negative numbers, NaN, deep nesting, empty bodies, invalid UTF-8, lone
surrogates, wrong content types, wrong methods and paths.

The contract checked on every answer: never a 5xx; every 4xx is an OpenAI error body
(``{"error": {"message", "type", "param", "code"}}``); a 200 stream carries no error event; and the
server still serves afterwards (``/ready`` 200, a plain request answers 200, 0 KV blocks in use).

Bounded and deterministic: a fixed number of examples per endpoint, ``derandomize=True`` (the same
examples every run, so CI sees no new ones), no example database, no deadline.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from tests.reliability.support import wait_kv_blocks_free

POST_PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize"]
GET_PATHS = ["/v1/models", "/version", "/health", "/ready", "/metrics", "/openapi.json"]
EXAMPLES = 150
WORKER = "fuzz-0"  # the tiny_router fixture's engine

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])

# Any JSON value, nested a little: what a field is swapped for, or a whole body.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


# -- checks ----------------------------------------------------------------------------------------------


def check_answer(r: httpx.Response, what) -> None:
    """The contract every answer keeps (``what`` is shown when it does not)."""
    assert r.status_code < 500, (what, r.status_code, r.text[:2000])
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            raise AssertionError((what, r.status_code, "not JSON", r.text[:500])) from None
        assert isinstance(body, dict) and set(body) == {"error"}, (what, r.status_code, body)
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, (what, err)
        assert isinstance(err["message"], str) and err["message"], (what, err)
        assert isinstance(err["type"], str) and err["type"], (what, err)
        assert err["param"] is None or isinstance(err["param"], str), (what, err)
        assert err["code"] is None or isinstance(err["code"], (str, int)), (what, err)
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        if r.text.startswith("event: "):  # the Responses API's: named events, no [DONE]
            assert all(e.get("type") != "error" for e in events), (what, events[-1:])  # a hidden 5xx
            assert events and events[-1]["type"] in ("response.completed", "response.incomplete"), (what, events[-1:])
        else:
            assert all("error" not in e for e in events), (what, events[-1:])  # a 200 stream that failed: a hidden 5xx
            assert r.text.rstrip().endswith("data: [DONE]"), (what, r.text[-500:])


def still_serving(client: httpx.Client, model: str) -> None:
    """Ready, answering, and every KV block the fuzzed requests took is back (no leak)."""
    assert client.get("/ready").status_code == 200
    r = client.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    wait_kv_blocks_free(str(client.base_url).rstrip("/"), {WORKER})


def post_raw(client: httpx.Client, path: str, content: bytes, content_type: str | None = "application/json",
             **headers: str) -> httpx.Response:
    if content_type is not None:
        headers["content-type"] = content_type
    return client.post(path, content=content, headers=headers)


def dumps(value) -> bytes:
    """JSON as a lenient client writes it: NaN/Infinity literals allowed, lone surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode()


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router(tiny_router):
    url, _app, _engine = tiny_router
    with httpx.Client(base_url=url, timeout=60) as client:
        schema = client.get("/openapi.json").json()
        model = client.get("/v1/models").json()["data"][0]["id"]
        yield client, schema, model


def body_schema(schema: dict, path: str) -> dict:
    """The request body schema of ``path``'s POST, with the components its ``$ref``s point into."""
    ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return {"$ref": ref, "components": schema["components"]}


def bodies(schema: dict, path: str, model: str) -> st.SearchStrategy:
    declared = body_schema(schema, path)
    props = sorted(schema["components"]["schemas"][declared["$ref"].rsplit("/", 1)[1]]["properties"])
    valid = from_schema(declared)

    def name_the_model(body: dict, named: bool) -> dict:
        # A random model name is always refused (model_not_found); most examples should get further.
        if named and isinstance(body, dict):
            body = {**body, "model": model}
        return body

    def swap_one(body: dict, field: str, value):
        return {**body, field: value}

    allowed = st.builds(name_the_model, valid, st.sampled_from([True, True, True, False]))
    mutated = st.builds(swap_one, allowed, st.sampled_from(props), JSON_VALUES)
    return st.one_of(allowed, mutated, JSON_VALUES)


# -- tests -----------------------------------------------------------------------------------------------


def test_every_post_route_declares_its_body_and_is_fuzzed(router):
    _client, schema, _model = router
    posts = {p for p, ops in schema["paths"].items() if "post" in ops}
    assert posts == set(POST_PATHS)  # a new POST route must join the fuzzing
    for path in POST_PATHS:
        assert "properties" in schema["components"]["schemas"][body_schema(schema, path)["$ref"].rsplit("/", 1)[1]]


@pytest.mark.parametrize("path", POST_PATHS)
def test_schema_fuzzing_finds_no_5xx_and_only_openai_errors(router, path):
    client, schema, model = router
    statuses: dict[int, int] = {}

    @FUZZ
    @given(body=bodies(schema, path, model))
    def one(body):
        r = post_raw(client, path, dumps(body))
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        check_answer(r, (path, body))

    one()
    # The fuzzing reached both sides of validation: some bodies were served, some refused.
    assert statuses.get(200) and statuses.get(400), statuses
    still_serving(client, model)


@pytest.mark.parametrize("path", GET_PATHS)
def test_get_routes_answer_and_refuse_other_methods(router, path):
    client, _schema, model = router
    check_answer(client.get(path), path)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        check_answer(client.request(method, path, content=b"{}"), (method, path))
    still_serving(client, model)


def _nasty(model: str) -> list[tuple[str, bytes, str | None]]:
    """(path, body bytes, content type): each one a way a client gets it wrong."""
    c, chat = "/v1/completions", "/v1/chat/completions"
    ok = {"model": model, "prompt": "hi", "max_tokens": 2}
    msgs = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, bytes, str | None]] = []
    for path in POST_PATHS:
        for raw in (b"", b" ", b"null", b"[]", b"{}", b'"prompt"', b"123", b"true", b"{", b'{"prompt": }',
                    b'{"prompt": "hi"', b"\x00\x01\x02", b"\xff\xfe\xfd", b'{"prompt": "\xff\xfe"}',
                    b'{"prompt": "\\ud800"}', b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
                    b'{"tokens": [1, 2,]}', b"[" * 10_000 + b"]" * 10_000, b'{"prompt": ' + b"[" * 5000,
                    b'{"a": ' * 3000 + b"1" + b"}" * 3000, b"\xef\xbb\xbf{}", b'{"prompt": "hi", "prompt": 3}'):
            cases.append((path, raw, "application/json"))
        for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                      "application/json; charset=latin-1", "application/xml"):
            cases.append((path, dumps(ok), ctype))
        cases.append((path, b"prompt=hi&max_tokens=2", "application/x-www-form-urlencoded"))
    wrong = [("prompt", 3), ("prompt", None), ("prompt", {}), ("prompt", []), ("prompt", [[]]), ("prompt", [""]),
             ("prompt", [1.5]), ("prompt", [-1]), ("prompt", [10 ** 12]), ("prompt", [[10 ** 30]]),
             ("prompt", [True]), ("prompt", "x" * 100_000), ("prompt", ["a"] * 10_000),
             ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 10 ** 30), ("max_tokens", 1.5),
             ("max_tokens", "8"), ("max_tokens", True), ("max_tokens", 2 ** 63), ("max_tokens", -(2 ** 64)),
             ("n", 0), ("n", -5), ("n", 10 ** 20), ("n", 10 ** 4), ("n", "NaN"),
             ("temperature", math.nan), ("temperature", math.inf), ("temperature", -math.inf),
             ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", 1e308), ("temperature", -1),
             ("top_p", math.nan), ("top_p", 0), ("top_p", -0.5), ("top_p", 1e308), ("top_p", "1"),
             ("top_k", -2), ("top_k", 10 ** 12), ("top_k", math.nan), ("min_p", math.nan), ("min_p", 2),
             ("presence_penalty", math.inf), ("frequency_penalty", -1e308), ("repetition_penalty", 0),
             ("repetition_penalty", math.nan), ("seed", 2 ** 64), ("seed", -(2 ** 64)), ("seed", math.nan),
             ("logprobs", 10 ** 9), ("logprobs", -1), ("logprobs", True), ("echo", "yes"),
             ("stop", [""]), ("stop", ["a"] * 100), ("stop", 5), ("stop", [None]), ("stop", "x" * 10_000),
             ("stop_token_ids", [-1]), ("stop_token_ids", [10 ** 15]), ("stop_token_ids", "1"),
             ("min_tokens", -1), ("min_tokens", 10 ** 9), ("priority", 2 ** 70), ("priority", math.nan),
             ("stream", "true"), ("stream", 1), ("stream_options", {"include_usage": "x"}),
             ("stream_options", {"unknown": 1}), ("stream_options", []), ("user", 5), ("user", "x" * 100_000),
             ("model", 5), ("model", ""), ("model", "no-such-model"), ("model", ["a"]),
             ("ignore_eos", "no"), ("skip_special_tokens", None), ("no_such_field", 1), ("", 1),
             ("\x00", 1), ("prompt\ud800", 1)]
    for field, value in wrong:
        cases.append((c, dumps({**ok, field: value}), "application/json"))
        cases.append((c, dumps({**ok, field: value, "stream": True}), "application/json"))
    chat_ok = {"model": model, "messages": msgs, "max_tokens": 2}
    chat_wrong = [("messages", []), ("messages", None), ("messages", "hi"), ("messages", [{}]),
                  ("messages", [{"role": "wizard", "content": "hi"}]), ("messages", [{"role": 5}]),
                  ("messages", [{"role": "user", "content": 5}]), ("messages", [{"role": "user", "content": [5]}]),
                  ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                  ("messages", [{"role": "user", "content": [{"type": "text"}]}]),
                  ("messages", [{"role": "user", "content": [{"text": "no type"}]}]),
                  ("messages", [{"role": "user", "content": None}]),
                  ("messages", [{"role": "assistant", "content": "only an assistant"}]),
                  ("messages", [{"role": "user", "content": "hi", "tool_calls": [{"x": 1}]}]),
                  ("messages", [{"role": "tool", "content": "hi"}]),
                  ("messages", [{"role": "user", "content": "hi"}] * 5000),
                  ("messages", [{"role": "user", "content": "{% raise %}{{ 1/0 }}"}]),
                  ("max_completion_tokens", -1), ("max_completion_tokens", 10 ** 30),
                  ("top_logprobs", 10 ** 6), ("top_logprobs", -1), ("logprobs", "yes"),
                  ("chat_template_kwargs", {"add_generation_prompt": "x"}), ("chat_template_kwargs", []),
                  ("chat_template_kwargs", {"messages": 5}), ("chat_template_kwargs", {"tools": [1, 2]}),
                  ("continue_final_message", True), ("add_generation_prompt", None), ("tools", [{}]),
                  ("tool_choice", "auto"), ("response_format", {"type": "json_schema"}), ("n", 10 ** 9)]
    for field, value in chat_wrong:
        cases.append((chat, dumps({**chat_ok, field: value}), "application/json"))
        cases.append((chat, dumps({**chat_ok, field: value, "stream": True}), "application/json"))
    tok_wrong = [("/tokenize", {"prompt": 5}), ("/tokenize", {"prompt": "hi", "messages": msgs}),
                 ("/tokenize", {}), ("/tokenize", {"messages": []}), ("/tokenize", {"messages": [{"role": 1}]}),
                 ("/tokenize", {"prompt": "x" * 1_000_000}), ("/tokenize", {"prompt": "\ud800"}),
                 ("/detokenize", {"tokens": [-1]}), ("/detokenize", {"tokens": [10 ** 30]}),
                 ("/detokenize", {"tokens": [2 ** 63]}), ("/detokenize", {"tokens": [1.5]}),
                 ("/detokenize", {"tokens": "1 2"}), ("/detokenize", {"tokens": [None]}),
                 ("/detokenize", {"tokens": list(range(100_000))}), ("/detokenize", {})]
    for path, body in tok_wrong:
        cases.append((path, dumps(body), "application/json"))
    return cases


def test_hand_written_nasty_bodies_are_refused_cleanly(router):
    client, _schema, model = router
    cases = _nasty(model)
    for path, raw, ctype in cases:
        check_answer(post_raw(client, path, raw, ctype), (path, raw[:200], ctype))
    # Headers that lie about the body: a compressed body that is not, a transfer encoding, a charset.
    ok = dumps({"model": model, "prompt": "hi", "max_tokens": 2})
    for headers in ({"content-encoding": "gzip"}, {"content-encoding": "br"}, {"accept": "text/xml"},
                    {"x-request-id": "x" * 10_000}, {"x-request-id": b"\xff\xfe"}, {"x-request-id": "a b;c=d"},
                    {"x-session-id": b"\x80"},
                    {"authorization": "Bearer nonsense"}):
        check_answer(post_raw(client, "/v1/completions", ok, **headers), headers)
    for path in ("/v1/nothing", "/v1", "/", "/v1/completions/x", "/%ff", "/v1/completions?stream=true"):
        check_answer(client.get(path), path)
        check_answer(client.post(path, content=b"{}"), path)
    still_serving(client, model)
