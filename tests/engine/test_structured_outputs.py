"""Structured output on the real SmolLM2-135M (CPU): every constrained output parses and matches its
constraint, greedy and sampled, in one batch with unconstrained requests, and through preemption,
prefix caching, chunked prefill, ``n > 1`` and async scheduling."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from shoal.workers import LLM, SamplingParams
from shoal.workers.engine.sampling_params import InvalidParam
from shoal.workers.engine.structured_outputs import StructuredOutputs
from structured_schemas import SCHEMAS

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def make_llm(**overrides) -> LLM:
    opts = dict(device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=256, block_size=16)
    opts.update(overrides)
    return LLM("smollm2-135m", **opts)


@pytest.fixture(scope="module")
def llm():
    return make_llm()


def chat_prompt(llm: LLM, text: str) -> list[int]:
    tok = llm.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True),
                      add_special_tokens=False)


def json_params(schema: dict, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 64)
    return SamplingParams(structured_outputs=StructuredOutputs.json_schema(schema), **kw)


def assert_valid(out, schema: dict) -> None:
    c = out.outputs[0]
    assert c.finish_reason == "stop", (c.finish_reason, c.text)
    jsonschema.validate(json.loads(c.text), schema)


def test_every_schema_greedy_and_sampled_in_one_batch_with_unconstrained(llm):
    prompts, params, schemas = [], [], []
    for i, schema in enumerate(SCHEMAS):
        prompt = chat_prompt(llm, f"Give an example answer as JSON (case {i}).")
        for p in (json_params(schema, temperature=0), json_params(schema, temperature=1.0, seed=i)):
            prompts.append(prompt)
            params.append(p)
            schemas.append(schema)
    free = ["The capital of France is", "Once upon a time"]
    outs = llm.generate(prompts + free, params + [SamplingParams(temperature=0, max_tokens=8)] * len(free))
    for out, schema in zip(outs, schemas):
        assert_valid(out, schema)
    assert outs[len(schemas)].outputs[0].text.startswith(" Paris")  # the unconstrained rows are untouched
    assert all(o.outputs[0].finish_reason == "length" for o in outs[len(schemas):])


def test_regex_choice_and_grammar_match(llm):
    prompt = chat_prompt(llm, "Answer.")
    cases = [
        (StructuredOutputs("regex", r"[0-9]{3}-[a-z]{2,5}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
        (StructuredOutputs("regex", r"(yes|no), because [a-z ]{1,20}\."),
         lambda t: re.fullmatch(r"(yes|no), because [a-z ]{1,20}\.", t)),
        (StructuredOutputs("choice", choices=("Paris", "London", "Rome")), lambda t: t in ("Paris", "London", "Rome")),
        (StructuredOutputs("grammar", 'root ::= "(" [0-9] " + " [0-9] ")"'),
         lambda t: re.fullmatch(r"\([0-9] \+ [0-9]\)", t)),
        (StructuredOutputs("grammar", 'start: "a" "b"+ "c"\n'), lambda t: re.fullmatch("ab+c", t)),
        (StructuredOutputs("json_object"), lambda t: isinstance(json.loads(t), dict)),
    ]
    params = [SamplingParams(temperature=temperature, seed=7, max_tokens=48, structured_outputs=s)
              for temperature in (0.0, 0.9) for s, _ in cases]
    for out, (spec, ok) in zip(llm.generate([prompt] * len(params), params), cases * 2):
        assert ok(out.outputs[0].text), (spec, out.outputs[0].text)
        assert out.outputs[0].finish_reason == "stop"


def test_uncompilable_constraints_name_the_field(llm):
    for spec, field in [(StructuredOutputs.json_schema({"type": "strin"}), "structured_outputs.json"),
                        (StructuredOutputs("regex", "a(b"), "structured_outputs.regex"),
                        (StructuredOutputs("grammar", "start: foo\n"), "structured_outputs.grammar")]:
        with pytest.raises(InvalidParam) as e:
            llm.generate("x", SamplingParams(structured_outputs=spec))
        assert e.value.field == field and "cannot be compiled" in str(e.value)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidParam, match="structured_outputs.choice"):
        StructuredOutputs("choice", choices=())


def test_n_greater_than_one_and_prefix_caching(llm):
    prompt = chat_prompt(llm, "Describe a person as JSON.")
    first = llm.generate(prompt, json_params(PERSON, temperature=1.0, seed=3, n=3))[0]
    again = llm.generate(prompt, json_params(PERSON, temperature=1.0, seed=3, n=3))[0]
    assert again.num_cached_tokens > 0
    for out in (first, again):
        assert len(out.outputs) == 3
        for c in out.outputs:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.text), PERSON)
    assert [c.text for c in first.outputs] == [c.text for c in again.outputs]  # same seeds, same grammar


def test_preemption_chunked_prefill_and_async_scheduling_keep_outputs_valid(llm):
    prompt = chat_prompt(llm, "Describe it as JSON, please.")
    cases = (0, 12, 22)
    params = [json_params(SCHEMAS[i], temperature=0, max_tokens=40) for i in cases]
    reference = [o.outputs[0].text for o in llm.generate([prompt] * len(cases), params)]
    # 7 blocks of 16 tokens cannot hold three sequences of ~50 tokens: requests are preempted and
    # recomputed (their matchers rebuilt), 16-token steps chunk the prompts, async scheduling overlaps.
    other = make_llm(num_kv_blocks=7, max_num_batched_tokens=16, enable_prefix_caching=False,
                     async_scheduling=True)
    outs = other.generate([prompt] * len(cases), params)
    assert [o.outputs[0].text for o in outs] == reference
    assert other.engine.stats.num_preemptions > 0
    for out, i in zip(outs, cases):
        assert_valid(out, SCHEMAS[i])


def test_stream_yields_the_valid_json_piece_by_piece(llm):
    pieces = list(llm.stream(chat_prompt(llm, "A person as JSON."), json_params(PERSON, temperature=0)))
    assert len(pieces) > 3
    jsonschema.validate(json.loads("".join(pieces)), PERSON)
