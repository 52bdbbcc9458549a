"""The real SmolLM2-135M from its GGUF: the right answer, and logits equal to transformers' own load."""

from __future__ import annotations

import pytest
import torch

from shoal.workers import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", device="cpu", dtype="float32", num_kv_blocks=64)


def test_capital_of_france_is_paris(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))[0]
    assert out.outputs[0].text.startswith(" Paris")


def test_chat_template_and_stream(llm):
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=8))[0]
    assert "Paris" in out.outputs[0].text
    streamed = "".join(llm.stream("The capital of France is", SamplingParams(temperature=0, max_tokens=6)))
    assert streamed == llm.generate("The capital of France is",
                                    SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text


def test_stop_string_cuts_exactly(llm):
    full = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))[0]
    text = full.outputs[0].text
    stop = text[len(" Paris"):][:3].strip() or "."
    cut = llm.generate("The capital of France is",
                       SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0].outputs[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    llm.engine.kv_cache.check_no_leak()


def test_logits_match_transformers_gguf_load(llm, smollm2_path):
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(smollm2_path.parent), smollm2_path.name
    cfg = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(str(smollm2_path), return_tensors=True, model_to_load=meta,
                                   torch_dtype=torch.float32)["tensors"]
    hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    hf.load_state_dict(tensors, strict=False)
    hf.tie_weights()
    ids = llm.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    got = _last_logits(llm, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _last_logits(llm, ids):
    """Our model's logits for the prompt's last position, through the engine's own paged path."""
    from shoal.workers.engine.outputs import NewRequestData, SchedulerOutput

    runner = llm.engine.runner
    new = NewRequestData("probe", tuple(ids), len(ids), SamplingParams(temperature=0), (0,), 0)
    sched = SchedulerOutput((new,), (), {"probe": len(ids)}, frozenset())
    runner._update_states(sched)
    inputs, *_ = runner._prepare_inputs(sched)
    with torch.no_grad():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta)
        logits = runner.model.compute_logits(hidden[-1:])[0]
    runner.requests.pop("probe")
    assert llm.engine.kv_cache.pool.reset_prefix_cache()  # block 0 was overwritten: forget what it held
    return logits
