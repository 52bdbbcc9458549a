"""``RouterConfig``: the limits and knobs of one router replica, validated on construction.

Each option is declared once with ``workers/options.py`` (torch-free): the router flags of
``shoal serve`` are generated from these fields. Only the entrypoint reads flags or the environment;
everything else receives this.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from shoal.workers.options import OptionError, option, validate

from .tools import available_tool_parsers


@dataclass(frozen=True, eq=False)
class RouterConfig:
    served_model_name: str | None = option(
        None, "the model name /v1/models lists and requests must name (shoal serve: default --model; "
              "unset: the names the workers report)")
    # Placement: make_pool() passes placement_options to make_policy (block_size must equal the workers').
    placement: str = option("prefix_aware", "placement policy: prefix_aware, least_load, round_robin, session",
                            flag="--policy")
    placement_options: Mapping[str, object] = option(default_factory=dict, help="the placement policy's options",
                                                     cli=False)

    # Tool calling (router/tools): the format of the served model's calls. Unset, tool_choice 'auto' (the
    # default with tools) is refused; 'required' and named calls are forced in the hermes format.
    tool_call_parser: str | None = option(
        None, "read tool calls from the model's text in this format, which enables tool_choice 'auto' "
              "(vLLM's --enable-auto-tool-choice --tool-call-parser): hermes (Qwen2.5, Hermes, SmolLM2), "
              "llama3_json (Llama 3.x)", choices=available_tool_parsers())

    # Chat templates (router/chat_template.py): the served model's, unless a request brings its own.
    chat_template: str | None = option(
        None, "the chat template to render chat and /v1/responses requests with instead of the tokenizer's: a "
              "file path or the Jinja template inline (vLLM's --chat-template)")

    max_prompt_tokens: int | None = option(
        None, "prompt length limit; None: the smallest max_model_len of the workers, less one generated token",
        minimum=1)
    # Beyond max_concurrent_requests up to max_waiting_requests wait (FIFO) for at most queue_timeout_s
    # (then 503); beyond that the router answers 429 at once. n > 1 counts as one.
    max_concurrent_requests: int = option(256, "requests generating at once (n > 1 counts as one)", minimum=1)
    max_waiting_requests: int = option(1024, "requests waiting (FIFO) beyond those; more are answered 429",
                                       minimum=0)
    queue_timeout_s: float = option(30.0, "seconds a request may wait for its turn (then 503)",
                                    exclusive_minimum=0)
    max_body_bytes: int = option(8 << 20, "largest request body (larger: 413)", minimum=1024)
    request_timeout_s: float = option(
        600.0, "seconds from arrival to the last token; past it the request is aborted on its worker "
               "(504 / error event)", exclusive_minimum=0)
    max_open_per_worker: int = option(
        0, "requests a worker may have open before the router holds new ones (up to queue_timeout_s, then "
           "503) for the first worker with room: a burst waits for the replicas it scales up instead of "
           "stretching the running requests' ITL; 0: no limit", minimum=0)
    cold_start_wait_s: float = option(0.0, "seconds a request that finds no healthy worker is held for one "
                                      "to start (a pool scaled to zero); 0: answer 503 at once", minimum=0)
    retry_after_s: int = option(1, "the Retry-After header of 429 and 503 answers", minimum=0)

    max_n: int = option(16, "completions per request (n; for /v1/completions times the number of prompts)",
                        minimum=1)
    max_logprobs: int = option(20, "top logprobs a request may ask for (the engine's limit is 20)",
                               minimum=0, maximum=20)
    max_stop_sequences: int = option(16, "stop strings per request", minimum=0)
    default_completion_max_tokens: int = option(16, "/v1/completions without max_tokens (OpenAI's default)",
                                                minimum=1)

    health_interval_s: float = option(1.0, "seconds between health and load polls of each worker",
                                      exclusive_minimum=0)
    health_timeout_s: float = option(5.0, "seconds one health poll may take", exclusive_minimum=0)

    disagg_min_prefill_tokens: int = option(
        512, "with prefill workers: a prompt whose part uncached on its decode worker is shorter goes "
             "straight to decode; 0: always through a prefill worker, when one is healthy", minimum=0)

    # The HTTP edge (router/app.py).
    api_key: str | None = option(None, "when set, /v1/* need `Authorization: Bearer <key>` (unset: open; "
                                       "shoal serve also reads $SHOAL_API_KEY)",
                                 secret=True)
    # CORS (Starlette's CORSMiddleware), with vLLM's defaults: any origin, method and header, no credentials.
    allowed_origins: tuple[str, ...] = option(("*",), "CORS: origins allowed")
    allowed_methods: tuple[str, ...] = option(("*",), "CORS: methods allowed")
    allowed_headers: tuple[str, ...] = option(("*",), "CORS: headers allowed")
    allow_credentials: bool = option(False, "CORS: allow credentials")
    body_timeout_s: float = option(30.0, "seconds a request body may take to arrive in full (then 408 and "
                                         "the connection is closed)", exclusive_minimum=0)
    max_json_depth: int = option(64, "deepest nesting of arrays/objects a JSON body may have (deeper: 400 "
                                     "before it is parsed)", minimum=1, maximum=256)
    access_log: str = option("text", "one line per request on the logger 'shoal.router.access'",
                             choices=("off", "text", "json"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "placement_options", MappingProxyType(dict(self.placement_options)))
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        validate(self)
        if self.chat_template is not None:
            from .chat_template import check_chat_template, load_chat_template

            try:
                check_chat_template(load_chat_template(self.chat_template))
            except ValueError as e:
                raise OptionError("RouterConfig.chat_template", str(e), "chat_template") from None
