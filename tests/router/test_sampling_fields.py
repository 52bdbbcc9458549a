"""logit_bias, allowed_token_ids, bad_words, prompt_logprobs, echo with logprobs and best_of through the
router: the official openai client over real SmolLM2 (greedy answers are meaningful), and the 400s at
the edge over a tiny engine (a refused request never reaches a worker)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from worker_support import RecordingWorker

from shoal.router.local_worker import LocalWorker

MODEL = "smollm2"
PARIS = "The capital of France is"


@pytest.fixture(scope="module")
def router(serve_module, smol_engine, smol_tokenizer):
    url, _ = serve_module([LocalWorker(smol_engine)], smol_tokenizer, policy="prefix_aware",
                          served_model_name=MODEL)
    return url


@pytest.fixture(scope="module")
def client(router):
    with openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def token_id(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return ids[0]


# -- the fields at work (SmolLM2, the openai client) ----------------------------------------------------


def test_logit_bias_steers_completions_and_chat(client, smol_tokenizer):
    rome = token_id(smol_tokenizer, " Rome")
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=3, temperature=0,
                                  logit_bias={str(rome): 100})
    assert r.choices[0].text == " Rome" * 3
    plain = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0)
    paris = token_id(smol_tokenizer, " Paris")
    banned = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0,
                                       logit_bias={str(paris): -100})
    assert plain.choices[0].text.startswith(" Paris") and not banned.choices[0].text.startswith(" Paris")
    chat = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, logit_bias={str(rome): 100},
                                          messages=[{"role": "user", "content": "Say hi"}])
    assert chat.choices[0].message.content == " Rome" * 2


def test_vllm_filters_in_extra_body(client, smol_tokenizer):
    rome, comma = token_id(smol_tokenizer, " Rome"), token_id(smol_tokenizer, ",")
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=4, temperature=0.8, seed=3, n=2,
                                  extra_body={"allowed_token_ids": [rome, comma]})
    for c in r.choices:
        assert set(smol_tokenizer.encode(c.text, add_special_tokens=False)) <= {rome, comma}
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=12, temperature=0, extra_body={"bad_words": ["Paris"]},
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" not in chat.choices[0].message.content
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0, stream=True,
                                  extra_body={"bad_words": ["Paris"]})
    assert "Paris" not in "".join(chunk.choices[0].text for chunk in r if chunk.choices)


def test_prompt_logprobs_on_completion_choices_and_the_chat_response(client, smol_tokenizer):
    ids = smol_tokenizer.encode(PARIS)
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0, n=2,
                                  extra_body={"prompt_logprobs": 2})
    first = r.choices[0].model_extra["prompt_logprobs"]
    assert len(first) == len(ids) and first[0] is None
    for i, entry in enumerate(first[1:], start=1):
        assert str(ids[i]) in entry and 2 <= len(entry) <= 3  # the prompt token and the top 2
        mine = entry[str(ids[i])]
        assert mine["logprob"] <= 0 and mine["rank"] >= 1 and mine["decoded_token"]
        assert {e["rank"] for k, e in entry.items() if k != str(ids[i])} <= {1, 2}
    assert r.choices[1].model_extra["prompt_logprobs"] == first  # every choice: the same prompt
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # scored prompts are computed, never cached
    plain = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=1, temperature=0)
    assert "prompt_logprobs" not in plain.choices[0].model_extra
    chat = client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0,
                                          messages=[{"role": "user", "content": "Say hi"}],
                                          extra_body={"prompt_logprobs": 0})
    scored = chat.model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == chat.usage.prompt_tokens
    assert all(len(e) == 1 for e in scored[1:])


def test_prompt_logprobs_stream_once_per_completion_choice_and_once_per_chat(client, smol_tokenizer):
    ids = smol_tokenizer.encode(PARIS)
    chunks = [ch for ch in client.completions.create(model=MODEL, prompt=PARIS, max_tokens=3, temperature=0, n=2,
                                                      stream=True, extra_body={"prompt_logprobs": 1})
              if ch.choices]
    carried = [(ch.choices[0].index, ch.choices[0].model_extra.get("prompt_logprobs")) for ch in chunks]
    per_choice = {i: [p for j, p in carried if j == i and p is not None] for i in (0, 1)}
    assert all(len(found) == 1 and len(found[0]) == len(ids) for found in per_choice.values())
    whole = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=3, temperature=0,
                                      extra_body={"prompt_logprobs": 1})
    assert per_choice[0][0] == whole.choices[0].model_extra["prompt_logprobs"]
    chat = list(client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, n=2, stream=True,
                                               messages=[{"role": "user", "content": "Say hi"}],
                                               extra_body={"prompt_logprobs": 0}))
    found = [ch.model_extra["prompt_logprobs"] for ch in chat if ch.model_extra.get("prompt_logprobs")]
    assert len(found) == 1 and found[0][0] is None


def test_echo_with_logprobs_scores_the_prompt_tokens_first(client, smol_tokenizer):
    ids = smol_tokenizer.encode(PARIS)
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0, echo=True, logprobs=1,
                                  extra_body={"prompt_logprobs": 1})
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(PARIS + " Paris")
    assert len(lp.tokens) == len(ids) + 2 and len(lp.token_logprobs) == len(ids) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:len(ids)]) == PARIS
    assert lp.text_offset[:len(ids)] == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert lp.text_offset[len(ids)] == len(PARIS)
    scored = c.model_extra["prompt_logprobs"]
    for i in range(1, len(ids)):  # the same numbers as prompt_logprobs
        assert lp.token_logprobs[i] == pytest.approx(scored[i][str(ids[i])]["logprob"])
    # streamed: the echo and its logprobs come with the choice's first event
    chunks = [ch for ch in client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0,
                                                      echo=True, logprobs=1, stream=True) if ch.choices]
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    streamed = [v for ch in chunks if ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:])
    plain = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0, echo=True)
    assert plain.choices[0].text == c.text and plain.choices[0].logprobs is None


def test_best_of_returns_the_n_candidates_with_the_highest_cumulative_logprob(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=1.0, seed=11)
    every = client.completions.create(n=4, logprobs=0, **kw)  # the same children best_of=4 runs (seed + i)
    ranked = sorted(every.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert all(c.logprobs is None for c in best.choices)  # logprobs ranked them; not asked for, not shown
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in every.choices)
    with_lp = client.completions.create(n=1, best_of=4, logprobs=2, **kw)
    assert with_lp.choices[0].text == ranked[0].text
    assert math.isclose(sum(with_lp.choices[0].logprobs.token_logprobs), sum(ranked[0].logprobs.token_logprobs),
                        abs_tol=1e-4)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(n=1, best_of=2, stream=True, **kw)
    assert e.value.body["param"] == "best_of"


# -- the 400s (a tiny engine: the answers are noise, the edge is the point) ------------------------------


@pytest.fixture(scope="module")
def edge(serve_module, make_tiny_engine, smol_tokenizer):
    worker = RecordingWorker(make_tiny_engine("tiny-sampling-fields"))
    url, _ = serve_module([worker], smol_tokenizer)
    return url, worker


BAD = [
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"logit_bias": {"5": "x"}}, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"logit_bias": {"49152": 1}}, "logit_bias", "vocabulary"),
    ("/v1/chat/completions", {"logit_bias": {"-4": 1}}, "logit_bias", "token ids"),
    ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids", "non-empty"),
    ("/v1/chat/completions", {"allowed_token_ids": [1, 49152]}, "allowed_token_ids", "vocabulary"),
    ("/v1/completions", {"bad_words": ["ok", " "]}, "bad_words", "blank"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs", "20"),
    ("/v1/chat/completions", {"prompt_logprobs": -1}, "prompt_logprobs", ">= 0"),
    ("/v1/completions", {"best_of": 0}, "best_of", ">= 1"),
    ("/v1/completions", {"best_of": 2, "n": 3}, "best_of", ">= n"),
    ("/v1/completions", {"best_of": 2, "stream": True}, "best_of", "stream"),
    ("/v1/completions", {"best_of": 9, "prompt": ["a", "b"]}, "best_of", "max_n"),
    ("/v1/completions", {"echo": True, "logprobs": 21}, "logprobs", "20"),
]


@pytest.mark.parametrize("path, fields, param, words", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_values_are_400_naming_the_field(edge, path, fields, param, words):
    url, worker = edge
    before = len(worker.request_ids)
    base = ({"prompt": "hi", "max_tokens": 2} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    r = httpx.post(f"{url}{path}", json={**base, **fields}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert words in err["message"] and param in err["message"], err
    assert len(worker.request_ids) == before, "a refused request reached the worker"


def test_the_fields_are_accepted_together_and_reach_the_worker(edge):
    url, worker = edge
    body = {"prompt": "hi", "max_tokens": 3, "n": 2, "best_of": 3, "echo": True, "logprobs": 1,
            "logit_bias": {"5": 2.5}, "allowed_token_ids": [5, 6, 7], "bad_words": ["x y"], "prompt_logprobs": 1}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for c in choices:
        assert c["logprobs"]["token_logprobs"][0] is None and len(c["prompt_logprobs"]) == 1  # "hi": one token
        assert c["text"].startswith("hi")
    assert len(worker.request_ids) >= 3  # best_of children
