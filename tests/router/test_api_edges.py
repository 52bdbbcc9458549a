"""The router's HTTP edges, over real uvicorn and a tiny engine: fields shoal does not implement, unknown
fields, nesting and body-time limits, the API key, CORS, request ids, access logs, /version and the
OpenAPI schema. (Overload -> 429 with Retry-After: test_app.py::test_overload_answers_429_...)
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from importlib.metadata import version

import httpx
import pytest
from worker_support import RecordingWorker

from shoal.workers.engine.sampling_params import InvalidParam, SamplingParams

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.fixture(scope="module")
def tiny(make_tiny_engine):
    return make_tiny_engine("tiny-edges")


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return smol_tokenizer


def assert_error(r: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["param"] == param, err
    for word in words:
        assert word in err["message"], (word, err)
    return err


# -- fields -----------------------------------------------------------------------------------------------


UNSUPPORTED = [
    ("/v1/completions", "guided_decoding_backend", "xgrammar"),
    ("/v1/completions", "guided_whitespace_pattern", " "),
    ("/v1/completions", "use_beam_search", True),
    ("/v1/completions", "suffix", " the end"),
    ("/v1/completions", "logits_processors", ["x"]),
    ("/v1/chat/completions", "guided_decoding_backend", "llguidance"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", {"name": "f"}),
]


def test_fields_shoal_does_not_implement_are_400_naming_the_field(serve, tiny, tok):
    worker = RecordingWorker(tiny)
    url, _ = serve([worker], tok)
    with httpx.Client(base_url=url, timeout=30) as c:
        for path, name, value in UNSUPPORTED:
            body = {**(COMPLETION if path == "/v1/completions" else CHAT), name: value}
            err = assert_error(c.post(path, json=body), 400, name, name, "is not supported by shoal")
            assert err["type"] == "invalid_request_error"
        # A value that asks for nothing is what a client sending defaults sends: accepted.
        inert = {"logit_bias": None, "use_beam_search": False, "response_format": {"type": "text"},
                 "best_of": 1, "guided_json": None, "suffix": None}
        assert c.post("/v1/completions", json={**COMPLETION, **inert}).status_code == 200
        inert_chat = {"tools": [], "tool_choice": "none", "parallel_tool_calls": None, "logit_bias": {}}
        assert c.post("/v1/chat/completions", json={**CHAT, **inert_chat}).status_code == 200
    assert len(worker.request_ids) == 2, "a refused request reached the worker"


def test_unknown_fields_are_400_naming_the_field(serve, tiny, tok):
    url, _ = serve([tiny], tok)
    with httpx.Client(base_url=url, timeout=30) as c:
        for path, body, param in [
                ("/v1/completions", {**COMPLETION, "temprature": 0.5}, "temprature"),
                ("/v1/chat/completions", {**CHAT, "max_token": 3}, "max_token"),
                ("/v1/completions", {**COMPLETION, "stream": True, "stream_options": {"usage": True}},
                 "stream_options.usage"),
                ("/tokenize", {"prompt": "hi", "add_bos": True}, "add_bos"),
                ("/detokenize", {"tokens": [1], "skip": True}, "skip")]:
            err = assert_error(c.post(path, json=body), 400, param, param, "unrecognized")
            assert err["code"] == "unknown_field"


def test_sampling_errors_come_from_sampling_params_with_the_request_s_field_name(serve, tiny, tok):
    # The rule lives in SamplingParams, and its error carries the field as data.
    with pytest.raises(InvalidParam) as e:
        SamplingParams(top_p=0)
    assert e.value.field == "top_p" and isinstance(e.value, ValueError)
    url, _ = serve([tiny], tok)
    with httpx.Client(base_url=url, timeout=30) as c:
        for path, body, param in [
                ("/v1/chat/completions", {**CHAT, "max_tokens": None, "max_completion_tokens": 0},
                 "max_completion_tokens"),
                ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
                ("/v1/completions", {**COMPLETION, "logprobs": -1}, "logprobs"),
                ("/v1/completions", {**COMPLETION, "top_k": -5}, "top_k"),
                ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
                ("/v1/completions", {**COMPLETION, "stop": ["ok", ""]}, "stop"),
                ("/v1/completions", {**COMPLETION, "min_p": 1.5}, "min_p"),
                ("/v1/completions", {"prompt": "hi", "min_tokens": 17}, "min_tokens")]:  # > the default 16
            assert_error(c.post(path, json=body), 400, param, param)


# -- limits -----------------------------------------------------------------------------------------------


def test_a_deeply_nested_body_is_a_400_not_a_recursion_error(serve, tiny, tok):
    url, _ = serve([tiny], tok, max_json_depth=64)
    deep = '{"prompt": ' + "[" * 10_000 + "]" * 10_000 + "}"
    with httpx.Client(base_url=url, timeout=30) as c:
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
            r = c.post(path, content=deep, headers={"content-type": "application/json"})
            err = assert_error(r, 400, None, "max_json_depth", "64")
            assert err["code"] == "json_too_deep"
        # Brackets inside strings are text, not nesting; a body at the limit is parsed as usual.
        r = c.post("/v1/completions", json={**COMPLETION, "prompt": "[{" * 500 + '\\"'})
        assert r.status_code == 200, r.text
        at_limit = '{"prompt": ' + "[" * 63 + "1" + "]" * 63 + "}"
        r = c.post("/v1/completions", content=at_limit, headers={"content-type": "application/json"})
        assert_error(r, 400, "prompt", "prompt")  # deep, but a shape error naming the field
        assert c.get("/health").status_code == 200


def _raw_exchange(port: int, head: bytes, body: bytes) -> tuple[bytes, bool]:
    """Send ``head`` + ``body`` and read until the server closes: (what came back, closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except socket.timeout:
            return data, False
        return data, True


def test_a_body_that_never_arrives_in_full_gets_408_and_the_connection_closes(serve, tiny, tok):
    url, _ = serve([tiny], tok, body_timeout_s=0.5)
    port = int(url.rsplit(":", 1)[1])
    part = b'{"prompt": "hi", "max'
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")  # promises 100 bytes, sends 21
    data, closed = _raw_exchange(port, head, part)
    assert closed, "the server kept the connection open"
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), data
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"x-request-id" in headers.lower()
    err = json.loads(payload)["error"]
    assert err["code"] == "request_timeout" and "body_timeout_s" in err["message"]
    # The server still answers a whole request.
    assert httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=30).status_code == 200


# -- API key and CORS -------------------------------------------------------------------------------------


def test_api_key_guards_the_api_but_not_the_probes(serve, tiny, tok):
    url, _ = serve([tiny], tok, api_key="s3cret-key")
    with httpx.Client(base_url=url, timeout=30) as c:
        for headers, why in (({}, "no API key"), ({"Authorization": "Bearer wrong"}, "not valid"),
                             ({"Authorization": "s3cret-key"}, "not valid")):
            for method, path, body in (("POST", "/v1/completions", COMPLETION), ("POST", "/v1/chat/completions", CHAT),
                                       ("GET", "/v1/models", None), ("POST", "/tokenize", {"prompt": "hi"})):
                r = c.request(method, path, json=body, headers=headers)
                err = assert_error(r, 401, None, why)
                assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer" and "x-request-id" in r.headers
                assert "s3cret" not in r.text
        for path in ("/health", "/ready", "/metrics", "/version", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        good = {"Authorization": "Bearer s3cret-key"}
        assert c.post("/v1/completions", json=COMPLETION, headers=good).status_code == 200
        assert c.get("/v1/models", headers=good).status_code == 200
        # A browser's preflight carries no key: CORS answers it (vLLM's default: any origin).
        r = c.options("/v1/completions", headers={"Origin": "http://app.example",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert 'endpoint="completions",status="401"' in httpx.get(f"{url}/metrics").text


def test_cors_options(serve, tiny, tok):
    url, _ = serve([tiny], tok, allowed_origins=["http://ok.example"], allowed_methods=["POST"])
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/completions", json=COMPLETION, headers={"Origin": "http://ok.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        r = c.post("/v1/completions", json=COMPLETION, headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = c.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
        assert r.status_code == 400


# -- request ids, access log, /version, schema ------------------------------------------------------------


def test_request_id_is_taken_or_generated_echoed_and_prefixes_the_worker_request(serve, tiny, tok):
    worker = RecordingWorker(tiny)
    url, _ = serve([worker], tok)
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(2):  # a client may repeat its id: the worker ids stay unique
            r = c.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": "client-42.a:b"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "client-42.a:b"
        assert len(worker.request_ids) == 2 and len(set(worker.request_ids)) == 2
        assert all(rid.startswith("client-42.a:b-") for rid in worker.request_ids), worker.request_ids

        r = c.post("/v1/chat/completions", json=CHAT)
        generated = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated) and worker.request_ids[-1].startswith(generated)
        for bad in ("x" * 129, "has space", "semi;colon"):  # not used as given: a fresh one instead
            r = c.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": bad})
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), bad
        # Errors carry it too.
        r = c.post("/v1/completions", json={"prompt": ""}, headers={"X-Request-Id": "bad-one"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "bad-one"
        assert c.get("/health", headers={"X-Request-Id": "probe"}).headers["x-request-id"] == "probe"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_one_access_log_line_per_request_written_when_the_answer_ends(serve, tiny, tok, caplog, fmt):
    url, _ = serve([tiny], tok, access_log=fmt)
    caplog.set_level(logging.INFO, logger="shoal.router.access")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "shoal.router.access"]

    with httpx.Client(base_url=url, timeout=30) as c:
        c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True},
               headers={"X-Request-Id": "whole-1"})
        with c.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True,
                                                       "stream": True}, headers={"X-Request-Id": "stream-1"}) as s:
            assert list(s.iter_lines())[-2:] == ["data: [DONE]", ""]
        c.post("/v1/completions", json={"prompt": "hi", "bogus": 1}, headers={"X-Request-Id": "bad-1"})
    assert wait_until(lambda: len(lines()) == 3), lines()  # a stream's line follows its last byte
    by_id = {}
    for line in lines():
        if fmt == "json":
            rec = json.loads(line)
        else:
            method, path, status, *pairs = line.split(" ")
            rec = {"method": method, "path": path, "status": int(status), **dict(p.split("=", 1) for p in pairs)}
            for k in ("prompt_tokens", "completion_tokens"):
                rec[k] = None if rec[k] == "None" else int(rec[k])
            rec["latency_ms"] = float(rec["latency_ms"])
        by_id[rec["request_id"]] = rec
    assert set(by_id) == {"whole-1", "stream-1", "bad-1"}
    prompt_len = len(tok.encode("hi"))
    assert by_id["whole-1"] | {"latency_ms": 0} == {
        "method": "POST", "path": "/v1/completions", "status": 200, "request_id": "whole-1",
        "prompt_tokens": prompt_len, "completion_tokens": 3, "latency_ms": 0}
    assert by_id["stream-1"]["completion_tokens"] == 4 and by_id["stream-1"]["status"] == 200
    assert by_id["bad-1"]["status"] == 400 and by_id["bad-1"]["completion_tokens"] is None
    assert all(rec["latency_ms"] >= 0 for rec in by_id.values())


def test_access_log_off_writes_nothing(serve, tiny, tok, caplog):
    url, _ = serve([tiny], tok, access_log="off")
    caplog.set_level(logging.INFO, logger="shoal.router.access")
    assert httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=30).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200
    assert not [r for r in caplog.records if r.name == "shoal.router.access"]


def test_version(serve, tok):
    url, _ = serve([], tok)
    assert httpx.get(f"{url}/version").json() == {"version": version("shoal")}


def test_openapi_declares_the_request_bodies(serve, tok):
    url, _ = serve([], tok)
    schema = httpx.get(f"{url}/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, model, field in (("/v1/completions", "CompletionRequest", "prompt"),
                               ("/v1/chat/completions", "ChatCompletionRequest", "messages"),
                               ("/tokenize", "TokenizeRequest", "prompt"),
                               ("/detokenize", "DetokenizeRequest", "tokens")):
        op = schema["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert op["requestBody"]["required"] and body == {"$ref": f"#/components/schemas/{model}"}
        declared = components[model]
        assert field in declared["properties"] and declared["additionalProperties"] is False
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    # Every reference resolves inside the document.
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(schema))
    assert refs and all(ref in components for ref in refs)
    # The unsupported fields are not offered: a schema-driven client never sends them.
    assert "guided_decoding_backend" not in components["CompletionRequest"]["properties"]
    chat = components["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "parallel_tool_calls"} <= set(chat) and "functions" not in chat
    assert {"none", "auto", "required"} <= set(chat["tool_choice"]["anyOf"][0]["enum"])
