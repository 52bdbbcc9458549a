"""Tokenizer: GGUF vocabs against llama.cpp's expected ids, SmolLM2 against HF transformers, chat templates.

Ground truth:
- tests/data/tokenizers/ggml-vocab-*.gguf(.gz) with .inp/.out: llama.cpp's own tokenizer test files
  (vendor/llama.cpp/models in the llama-cpp-python 0.3.36 sdist, MIT, see LICENSE-llama.cpp there).
  The vocab GGUFs are stored gzipped (16 MB -> 4.4 MB) and unpacked once per session.
- transformers loading the same SmolLM2 GGUF (``gguf_file=``): the test, not the code, imports it.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from shoal.workers.tokenizer import Tokenizer, read_gguf_metadata

DATA = Path(__file__).parent / "data" / "tokenizers"
VOCABS = ["gpt-2", "qwen2", "llama-bpe", "llama-spm"]

TRICKY = [
    "Hello world", "  leading and trailing  ", "a\n\n\tb\r\nc", "Äpfel über straße", "naïve café résumé",
    "日本語のテキスト、中文文本。", "emoji 🦙🚀😶‍🌫️ 👩‍👩‍👧 ✅", "12345 3.14159 1e-9 1,000,000 007",
    "def f(x):\n    return x**2  # square\n", "    indented\n\n\n   ", "I'm you're they'll it's WE'VE",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√", "Ελληνικά русский عربي हिन्दी ไทย", "<|im_start|>user\nhi<|im_end|>\n", "", " ",
    "x" * 300, "\u200b\u00a0\u3000 odd spaces", "{\"json\": [1, 2, {\"k\": null}]}",
]


def read_vocab_tests(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: inputs joined by "\\n__ggml_vocab_test__\\n" (a trailing
    separator ends the last one), and one line of space-separated ids per input."""
    raw = (DATA / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs = raw.split(sep)
    if raw.endswith(sep):
        inputs.pop()
    lines = (DATA / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(inputs) == len(lines), f"{name}: {len(inputs)} inputs vs {len(lines)} outputs"
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, lines)]


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vocabs")
    for name in VOCABS:
        with gzip.open(DATA / f"ggml-vocab-{name}.gguf.gz") as src, open(out / f"{name}.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


@pytest.fixture(scope="session")
def vocab_tokenizers(vocab_dir) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_path(vocab_dir / f"{name}.gguf") for name in VOCABS}


@pytest.fixture(scope="module")
def smol(smollm2_path) -> Tokenizer:
    return Tokenizer.from_path(smollm2_path)


@pytest.fixture(scope="module")
def hf_smol(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


# ------------------------------------------------------------------ llama.cpp vocab ground truth


def test_vocab_test_files_parse():
    cases = read_vocab_tests("gpt-2")
    assert len(cases) == 46
    assert dict(cases)["Hello world"] == [15496, 995]
    assert dict(cases)[""] == []
    assert dict(cases)["\n\n"] == [628]


@pytest.mark.parametrize("name", VOCABS)
def test_gguf_vocab_matches_llama_cpp(vocab_tokenizers, name):
    tok = vocab_tokenizers[name]
    cases = read_vocab_tests(name)
    wrong = [(text, tok.encode(text, add_special_tokens=False), want) for text, want in cases
             if tok.encode(text, add_special_tokens=False) != want]
    assert not wrong, wrong[:3]
    # Decoding gives the text back (SentencePiece strips exactly the space its encoder prepended).
    assert [tok.decode(tok.encode(t, add_special_tokens=False)) for t, _ in cases] == [t for t, _ in cases]


def test_gguf_special_ids_and_bos_policy(vocab_tokenizers):
    spm, bpe3, gpt2, qwen = (vocab_tokenizers[n] for n in ("llama-spm", "llama-bpe", "gpt-2", "qwen2"))
    # llama-spm sets add_bos_token in the file; llama-bpe relies on llama.cpp's default for Llama-3.
    assert spm.add_bos_token and spm.encode("Hello")[:2] == [1, 15043]
    assert bpe3.add_bos_token and bpe3.encode("Hello")[0] == 128000
    assert not gpt2.add_bos_token and gpt2.encode("Hello world") == [15496, 995]
    # Extra end-of-turn ids: <|eot_id|> for Llama-3, <|im_end|> for Qwen2.
    assert {128001, 128009} <= bpe3.eos_token_ids
    assert {151643, 151645} <= qwen.eos_token_ids
    assert spm.eos_token_ids == {2} and {0, 1, 2} <= spm.all_special_ids
    assert spm.vocab_size == 32000 and qwen.vocab_size == 151936
    # Control tokens in text become their ids, and skip_special_tokens drops them.
    ids = spm.encode("Hi</s>", add_special_tokens=False)
    assert ids[-1] == 2 and spm.decode(ids) == "Hi" and spm.decode(ids, skip_special_tokens=False) == "Hi</s>"


def test_partial_utf8_decodes_without_error(vocab_tokenizers, smol):
    for tok in (smol, vocab_tokenizers["llama-spm"], vocab_tokenizers["gpt-2"]):
        ids = tok.encode("🦙", add_special_tokens=False)
        assert len(ids) > 1  # the emoji is several byte tokens in all three vocabs
        assert tok.decode(ids[:-1]).endswith("\ufffd")  # the last byte is missing
        assert tok.decode(ids) == "🦙"


def test_metadata_reader_matches_gguf_reader(vocab_dir):
    import gguf

    path = vocab_dir / "llama-spm.gguf"
    ours = read_gguf_metadata(path)
    fields = gguf.GGUFReader(path).fields
    ref = {k: f.contents() for k, f in fields.items() if k.startswith(("tokenizer.", "general."))}
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key]) if key.endswith("scores") else ours[key] == ref[key], key


# ------------------------------------------------------------------ SmolLM2 against transformers


def test_smollm2_ids_match_transformers(smol, hf_smol):
    for text in TRICKY:
        for special in (True, False):
            ours = smol.encode(text, add_special_tokens=special)
            assert ours == hf_smol.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert smol.decode(ours, skip) == hf_smol.decode(ours, skip_special_tokens=skip), (text, skip)
    ids = smol.encode("hello world")
    assert smol.convert_ids_to_tokens(ids) == hf_smol.convert_ids_to_tokens(ids) == ["hello", "Ġworld"]
    assert (smol.bos_token_id, smol.eos_token_id, smol.vocab_size) == (1, 2, 49152)
    assert set(hf_smol.all_special_ids) <= smol.all_special_ids
    assert not smol.add_bos_token


CHATS = [
    [{"role": "user", "content": "Hi 🦙"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\n  Explain."}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(smol, hf_smol, add_generation_prompt):
    for chat in CHATS:
        ours = smol.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        ref = hf_smol.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == ref
    assert ours.startswith("<|im_start|>system\n")


def test_hf_dir_matches_transformers(smol, hf_smol, tmp_path):
    from transformers import AutoTokenizer

    hf_smol.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    ours = Tokenizer.from_path(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TRICKY:
        assert ours.encode(text) == ref.encode(text) == smol.encode(text), text
    assert ours.chat_template == smol.chat_template
    assert ours.apply_chat_template(CHATS[1]) == ref.apply_chat_template(CHATS[1], tokenize=False,
                                                                         add_generation_prompt=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos_token) == (1, 2, False)
    assert ours.eos_token_ids == {2, 7}  # generation_config adds its eos list
    assert {0, 1, 2} <= ours.all_special_ids


def test_hf_dir_config_flags_and_template_file(smol, hf_smol, tmp_path):
    hf_smol.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = True
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tok = Tokenizer.from_path(tmp_path)
    assert tok.add_bos_token and tok.encode("hi") == [1] + smol.encode("hi", add_special_tokens=False)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>[x]"


# ------------------------------------------------------------------ chat template environment


def test_chat_template_environment(smol):
    msgs = [{"role": "user", "content": "<b>&</b>"}]
    render = lambda t, **kw: smol.apply_chat_template(msgs, chat_template=t, **kw)  # noqa: E731
    # tojson does not HTML-escape, and takes indent; trim_blocks/lstrip_blocks drop block whitespace.
    assert render("{{ messages[0].content | tojson }}") == '"<b>&</b>"'
    assert render("{{ {'a': 1} | tojson(indent=2) }}") == '{\n  "a": 1\n}'
    assert render("  {% if true %}\nx\n  {% endif %}\n") == "x\n"
    assert render("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "01"
    extra = render("{{ tools | length }}:{{ enable_thinking }}", tools=[{"name": "f"}], enable_thinking=False)
    assert extra == "1:False"
    assert render("{{ add_generation_prompt }}", add_generation_prompt=False) == "False"
    assert len(render("{{ strftime_now('%Y-%m-%d') }}")) == 10
    assert render("{% generation %}kept{% endgeneration %}") == "kept"
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")


def test_missing_chat_template_is_a_clear_error(vocab_tokenizers):
    tok = vocab_tokenizers["gpt-2"]
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    # The qwen2 vocab carries one.
    out = vocab_tokenizers["qwen2"].apply_chat_template([{"role": "user", "content": "hi"}])
    assert out.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_from_path_accepts_a_directory_with_one_gguf(smol, smollm2_path):
    tok = Tokenizer.from_path(smollm2_path.parent)
    assert tok.encode("Hello 🦙") == smol.encode("Hello 🦙") and tok.chat_template == smol.chat_template


def test_from_path_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "nope")
    with pytest.raises(ValueError, match="without tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="neither a GGUF"):
        Tokenizer.from_path(tmp_path / "x.bin")


def test_import_is_torch_and_transformers_free():
    code = ("import sys, shoal.workers.tokenizer, shoal.workers.engine.detokenizer; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
