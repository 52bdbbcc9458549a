"""Chat templates: the router's ``--chat-template`` (inline or a file), a request's ``chat_template``
and ``chat_template_kwargs``, over a router and real SmolLM2 (the ``openai`` client for chat; /tokenize
shows what was rendered). A template that is not Jinja is refused naming the option or the field."""

from __future__ import annotations

import httpx
import openai
import pytest

from shoal.cluster.spec import DeploymentSpec, RouterSpec, SpecError
from shoal.router.config import RouterConfig
from shoal.router.local_worker import LocalWorker
from shoal.workers.options import OptionError

MODEL = "smollm2"
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}" \
        "assistant:{% endif %}"
GREETING = "{{ greeting }}|" + PLAIN
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def urls(serve_module, smol_engine, smol_tokenizer, tmp_path_factory):
    """Routers over one engine: the tokenizer's template, an inline --chat-template, one from a file."""
    path = tmp_path_factory.mktemp("tpl") / "greeting.jinja"
    path.write_text(GREETING)
    return tuple(serve_module([LocalWorker(smol_engine)], smol_tokenizer, served_model_name=MODEL,
                              **({"chat_template": t} if t else {}))[0] for t in (None, PLAIN, str(path)))


def _rendered(url: str, **body) -> list[int]:
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": MSGS, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_the_router_option_inline_and_from_a_file(urls, smol_tokenizer):
    default, inline, from_file = urls
    assert _rendered(default) == _ids(smol_tokenizer, smol_tokenizer.apply_chat_template(MSGS))
    assert _rendered(inline) == _ids(smol_tokenizer, "user: What is the capital of France?\nassistant:")
    assert _rendered(from_file, chat_template_kwargs={"greeting": "hi"}) == _ids(
        smol_tokenizer, "hi|user: What is the capital of France?\nassistant:")
    with openai.OpenAI(base_url=f"{inline}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, temperature=0)
        assert r.usage.prompt_tokens == len(_ids(smol_tokenizer, "user: What is the capital of France?\nassistant:"))
        resp = c.responses.create(model=MODEL, input=MSGS[0]["content"], max_output_tokens=2, temperature=0)
        assert resp.usage.input_tokens == r.usage.prompt_tokens  # /v1/responses renders with it too


def test_a_request_s_own_template_and_kwargs(urls, smol_tokenizer):
    default = urls[0]
    assert _rendered(default, chat_template=GREETING, chat_template_kwargs={"greeting": "yo"}) == _ids(
        smol_tokenizer, "yo|user: What is the capital of France?\nassistant:")
    with openai.OpenAI(base_url=f"{default}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        whole = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, temperature=0,
                                          extra_body={"chat_template": PLAIN})
        assert whole.usage.prompt_tokens == len(_ids(smol_tokenizer,
                                                     "user: What is the capital of France?\nassistant:"))
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2,
                                      extra_body={"chat_template": "{% for m in messages %}{{ m }"})
        err = e.value.body
        assert err["param"] == "chat_template" and "not valid Jinja" in err["message"], err
        assert "line 1" in err["message"]


@pytest.mark.parametrize("body, param", [
    ({"chat_template": "{% if %}"}, "chat_template"),
    ({"chat_template_kwargs": {"chat_template": PLAIN}}, "chat_template_kwargs.chat_template"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
])
def test_bad_templates_are_400s_naming_the_field(urls, body, param):
    for path, extra in (("/v1/chat/completions", {"max_tokens": 1}), ("/tokenize", {})):
        r = httpx.post(f"{urls[0]}{path}", json={"model": MODEL, "messages": MSGS, **extra, **body}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
        assert r.json()["error"]["message"].startswith(param)


def test_tokenize_refuses_a_template_for_a_prompt(urls):
    r = httpx.post(f"{urls[0]}/tokenize", json={"model": MODEL, "prompt": "x", "chat_template": PLAIN})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"


def test_the_option_is_checked_at_start(tmp_path):
    with pytest.raises(OptionError, match=r"chat_template.*not valid Jinja.*line 1") as e:
        RouterConfig(chat_template="{% for m in messages %}")
    assert e.value.field == "chat_template"
    with pytest.raises(OptionError, match="neither a readable file nor an inline"):
        RouterConfig(chat_template=str(tmp_path / "missing.jinja"))
    assert RouterConfig(chat_template=PLAIN).chat_template == PLAIN


def test_the_flag_and_the_spec():
    from shoal.cluster.cli import build_parser
    from shoal.cluster.etcd_router import EtcdRouter

    args = build_parser().parse_args(["serve", "--model", "smollm2-135m", "--chat-template", PLAIN])
    assert args.chat_template == PLAIN
    spec = DeploymentSpec.from_dict({"name": "t", "model": "m", "pools": {"unified": {}},
                                     "router": {"chat_template": PLAIN}})
    assert spec.router.chat_template == PLAIN and DeploymentSpec.from_dict(spec.to_dict()) == spec
    assert EtcdRouter(spec, client=None).router_config().chat_template == PLAIN
    assert "chat_template" not in RouterSpec().to_dict()
    with pytest.raises(SpecError, match="chat_template"):
        RouterSpec.from_dict({"chat_template": "{% if %}"})
    with pytest.raises(SystemExit):  # spec-owned: `shoal router` has no flag for it
        build_parser().parse_args(["router", "--etcd", "h:1", "--deployment", "t", "--chat-template", PLAIN])
