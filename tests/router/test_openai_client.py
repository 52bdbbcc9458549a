"""The official ``openai`` client against the router over real SmolLM2 (greedy answers are meaningful).

One router (prefix_aware, one LocalWorker) serves the whole module; decode costs ~70 ms a token on
CPU, so every request asks for a handful of tokens.
"""

from __future__ import annotations

import time

import openai
import pytest

from shoal.router.local_worker import LocalWorker

MODEL = "smollm2"
PARIS = "The capital of France is"


@pytest.fixture(scope="module")
def router(serve_module, smol_engine, smol_tokenizer):
    url, app = serve_module([LocalWorker(smol_engine)], smol_tokenizer, policy="prefix_aware",
                            served_model_name=MODEL)
    return url, app


@pytest.fixture(scope="module")
def client(router):
    url, _ = router
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def idle(engine, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while engine.engine.core.has_unfinished_requests():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_greedy_completion_knows_paris(client, smol_tokenizer):
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text.startswith(" Paris")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(smol_tokenizer.encode(PARIS)) and r.usage.completion_tokens == 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + 2
    echoed = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text == PARIS + r.choices[0].text


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=5, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PARIS, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model=MODEL, prompt=PARIS, max_tokens=4, temperature=0, stream=True,
                                            stream_options=options))
    with_text = [c for c in chunks if c.choices]
    assert with_text and all(c.usage is not None for c in with_text)
    counts = [c.usage.completion_tokens for c in with_text]
    assert counts == sorted(counts) and counts[-1] == 4 and counts[0] < 4  # grows as tokens come
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, temperature=0, stream=True, stream_options=options))
    assert all(c.usage is not None for c in chat if c.choices)
    plain = list(client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain if c.choices)  # without it: usage in the last chunk only


def test_token_id_prompts_and_a_list_of_prompts(client, smol_tokenizer):
    germany = "The capital of Germany is"
    r = client.completions.create(model=MODEL, prompt=[PARIS, germany], max_tokens=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith(" Paris") and r.choices[1].text.startswith(" Berlin")
    ids = [smol_tokenizer.encode(PARIS), smol_tokenizer.encode(germany)]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices]
    single = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=2, temperature=0)
    assert single.choices[0].text == r.choices[0].text


def test_chat_completion_stream_and_whole(client, smol_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    msg = whole.choices[0].message
    assert whole.object == "chat.completion" and msg.role == "assistant" and "Paris" in msg.content
    template_ids = smol_tokenizer.encode(smol_tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert whole.usage.prompt_tokens == len(template_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n2_with_a_seed_is_reproducible(client, smol_engine):
    def ask():
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, n=2,
                                         temperature=1.0, seed=11)

    first, again = ask(), ask()
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 8

    chunks = list(client.chat.completions.create(model=MODEL, n=2, max_tokens=3, temperature=1.0, seed=3,
                                                 messages=[{"role": "user", "content": "Hi"}], stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    assert idle(smol_engine)


def test_stop_string_cuts_the_text_and_aborts_the_request(client, smol_engine):
    # Greedy continues " Paris.\n\nThe answer is:" (8 tokens); stop at the first newline.
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=8, temperature=0, stop=["\n"])
    assert r.choices[0].text == " Paris." and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 8  # the router aborted it on the worker at the stop string
    assert idle(smol_engine)

    chunks = list(client.completions.create(model=MODEL, prompt=PARIS, max_tokens=8, temperature=0,
                                            stop=".\n", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " Paris"  # the stop string never leaks
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert idle(smol_engine)


def test_logprobs_map_ids_to_token_strings(client):
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens[0] == " Paris" and "".join(lp.tokens) == r.choices[0].text
    assert all(x <= 0 for x in lp.token_logprobs) and len(lp.top_logprobs) == 3
    assert max(lp.top_logprobs[0], key=lp.top_logprobs[0].get) == " Paris"
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(" Paris")

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy took the most likely
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_a_repeated_prompt_reports_cached_tokens(client, router):
    prompt = "Here is a long instruction that repeats itself so the cache has full blocks. " * 4
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens > 48
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 48 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    url, app = router
    assert app.state.ctx.metrics.reported_cached._value.get() >= cached


def test_extra_sampling_fields_reach_the_sampler(client):
    # top_k=1 at temperature 1 is greedy; min_tokens + ignore_eos force the length.
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=2, temperature=1.0,
                                  extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0,
                                              "min_tokens": 2, "ignore_eos": True, "priority": 0})
    assert r.choices[0].text.startswith(" Paris") and r.usage.completion_tokens == 2


def test_client_sees_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PARIS, temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
