"""Chat templates given to the router: ``--chat-template`` (a file path or the template inline, as
vLLM's) and a request's own ``chat_template`` field. Either is compiled here first, so a template that
is not valid Jinja is refused naming the option or the field, with Jinja's error (line and message).
"""

from __future__ import annotations

import os

import jinja2

from shoal.workers.tokenizer import _compile_template


def load_chat_template(value: str) -> str:
    """The template text of ``--chat-template``: a readable file's contents, else ``value`` itself when
    it looks like a template (holds ``{`` or a newline); ValueError otherwise (a mistyped path)."""
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the template file {value!r}: {e}") from None
    if "{" in value or "\n" in value:
        return value
    raise ValueError(f"{value!r} is neither a readable file nor an inline Jinja template")


def check_chat_template(source: str) -> None:
    """ValueError with Jinja's message when ``source`` does not compile."""
    try:
        _compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e.message} (line {e.lineno})") from None
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e}") from None
