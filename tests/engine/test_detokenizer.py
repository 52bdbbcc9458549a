"""IncrementalDetokenizer with real tokenizers: SmolLM2 (byte-level BPE, from its GGUF) and llama.cpp's
llama-spm vocab (SentencePiece with byte fallback, tests/data/tokenizers)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from shoal.workers.engine.detokenizer import IncrementalDetokenizer
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.tokenizer import Tokenizer

DATA = Path(__file__).parents[1] / "data" / "tokenizers"


@pytest.fixture(scope="module")
def smol(smollm2_path) -> Tokenizer:
    return Tokenizer.from_path(smollm2_path)


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("spm") / "llama-spm.gguf"
    with gzip.open(DATA / "ggml-vocab-llama-spm.gguf.gz") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return Tokenizer.from_path(path)


def split_prompt(tok: Tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt ids and the ids that follow them when ``prompt + completion`` is tokenized as one text."""
    prompt_ids, full = tok.encode(prompt), tok.encode(prompt + completion)
    assert full[: len(prompt_ids)] == prompt_ids, "the prompt must tokenize as a prefix of the full text"
    return prompt_ids, full[len(prompt_ids):]


def stream(tok, prompt_ids, ids, params=SamplingParams(), chunk=1):
    """Feed ``ids`` ``chunk`` at a time, collecting deltas; returns (detokenizer, deltas, stop hit)."""
    det = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas, hit = [], None
    for i in range(0, len(ids), chunk):
        hit = det.update(ids[i : i + chunk])
        done = hit is not None or i + chunk >= len(ids)
        deltas.append(det.get_next_output_text(finished=done, delta=True))
        assert "".join(deltas) == det.output_text[: len("".join(deltas))], "a delta is not a prefix of the text"
        if hit is not None:
            break
    return det, deltas, hit


TEXTS = [
    "Llamas 🦙 and rockets 🚀, a family 👩‍👩‍👧 and a flag 🏳️‍🌈.",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "def f(x):\n    return {'k': [1, 2]}  # ok\n\n\tdone",
    "  spaces   and\n\nnewlines  ",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_equals_decoded_text(smol, text, chunk):
    ids = smol.encode(text, add_special_tokens=False)
    det, deltas, hit = stream(smol, smol.encode("Say:"), ids, chunk=chunk)
    assert hit is None
    assert "".join(deltas) == det.output_text == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_chars_split_over_tokens_come_out_whole(smol):
    text = "🦙日本"
    ids = smol.encode(text, add_special_tokens=False)
    # The test means something only if characters really are split over tokens.
    assert any("\ufffd" in smol.decode([i]) for i in ids)
    det = IncrementalDetokenizer(smol, [], SamplingParams())
    seen = []
    for i in ids:
        det.update([i])
        seen.append(det.output_text)
    assert all("\ufffd" not in s for s in seen)
    assert seen[-1] == text and set(seen) >= {"🦙", "🦙日", "🦙日本"}  # each char appears once complete


def test_sentencepiece_first_token_keeps_its_space(spm):
    prompt_ids, gen = split_prompt(spm, "The capital of France is", " Paris.")
    assert spm.decode(gen) == "Paris."  # decoded alone, SentencePiece drops the leading space
    det, deltas, _ = stream(spm, prompt_ids, gen)
    assert det.output_text == "".join(deltas) == " Paris."


def test_sentencepiece_byte_fallback(spm):
    text = " កាន់តែ 🦙 ok"  # Khmer and the emoji are <0xNN> byte tokens in this vocab
    prompt_ids, gen = split_prompt(spm, "Hi", text)
    assert any(t.startswith("<0x") for t in spm.convert_ids_to_tokens(gen))
    det, deltas, _ = stream(spm, prompt_ids, gen)
    assert det.output_text == "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_skip_special_tokens(smol):
    ids = smol.encode("Hi there<|im_end|>", add_special_tokens=False)
    assert ids[-1] == 2
    assert stream(smol, [], ids)[0].output_text == "Hi there"
    raw = stream(smol, [], ids, SamplingParams(skip_special_tokens=False))[0]
    assert raw.output_text == "Hi there<|im_end|>"


STOP_TEXT = "The answer is 42. Then the END arrives, and the END again."


def test_stop_string_across_tokens_cuts_exactly(smol):
    ids = smol.encode(STOP_TEXT, add_special_tokens=False)
    stop = "the END"
    assert not any(stop in smol.decode([i]) for i in ids)  # it spans several tokens
    det, deltas, hit = stream(smol, [], ids, SamplingParams(stop=[stop]))
    assert hit == stop == det.stop_reason
    assert det.output_text == "".join(deltas) == "The answer is 42. Then "
    # It stopped on the token that completed the stop string, not later.
    assert det.num_output_tokens == len(smol.encode(STOP_TEXT[: STOP_TEXT.index(stop) + len(stop)],
                                                     add_special_tokens=False))


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_stop_string_with_include_and_chunking(smol, chunk):
    ids = smol.encode(STOP_TEXT, add_special_tokens=False)
    params = SamplingParams(stop=["the END"], include_stop_str_in_output=True)
    det, deltas, hit = stream(smol, [], ids, params, chunk=chunk)
    assert hit == "the END"
    assert det.output_text == "".join(deltas) == "The answer is 42. Then the END"
    # Tokens after the stop (a step already in flight) change nothing.
    assert det.update(smol.encode(" more", add_special_tokens=False)) is None
    assert det.output_text == "The answer is 42. Then the END"


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_first_completed_stop_wins_whatever_the_chunking(smol, chunk):
    ids = smol.encode(STOP_TEXT, add_special_tokens=False)
    # "answer is 42" starts first but "is 4" ends first: a token-by-token stream stops there, and so
    # must a stream that delivers everything at once.
    det, deltas, hit = stream(smol, [], ids, SamplingParams(stop=["answer is 42", "is 4", "END"]), chunk=chunk)
    assert hit == "is 4"
    assert det.output_text == "".join(deltas) == "The answer "


def test_stop_string_never_leaks_into_deltas(smol):
    text = "Count: 1, 2, 3, STOP! 4, 5"
    ids = smol.encode(text, add_special_tokens=False)
    det, deltas, hit = stream(smol, [], ids, SamplingParams(stop=["STOP!", "nope"]))
    assert hit == "STOP!"
    streamed = "".join(deltas)
    assert streamed == det.output_text == "Count: 1, 2, 3, "
    assert not any(c in d for d in deltas for c in "STOP!")


def test_stop_string_made_of_multibyte_chars(smol):
    ids = smol.encode("I love 🦙 llamas", add_special_tokens=False)
    det, deltas, hit = stream(smol, [], ids, SamplingParams(stop=["🦙"]))
    assert hit == "🦙" and det.output_text == "".join(deltas) == "I love "


def test_hold_back_until_finished(smol):
    ids = smol.encode("abcdefghij", add_special_tokens=False)
    det = IncrementalDetokenizer(smol, [], SamplingParams(stop=["STOP!"]))  # hold back 4 chars
    assert det.update(ids) is None
    assert det.get_next_output_text(finished=False, delta=False) == "abcdef"
    assert det.get_next_output_text(finished=False, delta=True) == "abcdef"
    assert det.get_next_output_text(finished=False, delta=True) == ""
    assert det.get_next_output_text(finished=True, delta=True) == "ghij"
    assert det.get_next_output_text(finished=True, delta=False) == "abcdefghij"


def test_min_tokens_defers_stop_strings(smol):
    ids = smol.encode("one two one two", add_special_tokens=False)
    det, _, hit = stream(smol, [], ids, SamplingParams(stop=["two"], min_tokens=len(ids), max_tokens=64))
    assert hit is None and det.output_text == "one two one two"
    det, _, hit = stream(smol, [], ids, SamplingParams(stop=["two"], min_tokens=2, max_tokens=64))
    assert hit == "two" and det.output_text == "one two one "


class _WindowRecorder:
    """The real tokenizer, recording how many ids each decode call is given."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decoding_is_incremental_not_quadratic(smol):
    text = " ".join(TEXTS) * 20
    ids = smol.encode(text, add_special_tokens=False)
    assert len(ids) > 1000
    rec = _WindowRecorder(smol)
    det, deltas, _ = stream(rec, smol.encode("Go:"), ids)
    assert det.output_text == text
    assert max(rec.sizes) <= 12  # a window of a few tokens, never the whole output
    assert sum(rec.sizes) <= 8 * len(ids)
