"""The flags of ``shoal serve`` / ``shoal generate`` / the benches, generated from the config classes.

Each option is declared once, on its config's field (``EngineConfig``, ``DisaggConfig``,
``RouterConfig``; see ``workers/options.py``); this module only puts those declarations on a parser
and reads them back. Torch-free: the CLI and the router import it.
"""

from __future__ import annotations

import argparse

from shoal.router.config import RouterConfig
from shoal.workers.config import EngineConfig
from shoal.workers.disagg_config import DisaggConfig
from shoal.workers.options import add_arguments, from_namespace, to_argv


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """A flag per ``EngineConfig`` field (``--model`` defaults to smollm2-135m here)."""
    add_arguments(p.add_argument_group("engine"), EngineConfig)


def add_kv_transfer_args(p: argparse.ArgumentParser) -> None:
    """A ``--kv-*`` flag per ``DisaggConfig`` field."""
    add_arguments(p.add_argument_group("KV transfer (disaggregated prefill/decode)"), DisaggConfig)


def add_router_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """A flag per ``RouterConfig`` field but ``skip`` (``--policy`` sets ``placement``)."""
    add_arguments(p.add_argument_group("router"), RouterConfig, skip=skip)


ETCD_HELP = ("etcd endpoints, host:port[,host:port]; all https://host:port: TLS, the CA and a client "
             "certificate from $SHOAL_ETCD_CACERT, $SHOAL_ETCD_CERT, $SHOAL_ETCD_KEY")


def add_etcd_arg(p: argparse.ArgumentParser, *, default: str | None = None, required: bool = False,
                 default_help: str | None = None) -> None:
    """``--etcd``: the one declaration of the control plane's address (every command that reads etcd)."""
    shown = f" (default: {default_help or '%(default)s'})" if not required else ""
    p.add_argument("--etcd", default=default, required=required, metavar="ENDPOINTS", help=ETCD_HELP + shown)


def api_key(args: argparse.Namespace, environ) -> str | None:
    """``--api-key``, else ``$SHOAL_API_KEY`` from ``environ`` (so the key need not show in the
    process list; in Kubernetes, a Secret), else None (the API is open)."""
    return args.api_key or environ.get("SHOAL_API_KEY") or None


def edge_config(args: argparse.Namespace, **overrides) -> RouterConfig:
    """The ``RouterConfig`` of ``shoal router``'s flags (its placement fields are the spec's)."""
    return from_namespace(RouterConfig, args, **overrides)


def router_config(args: argparse.Namespace, **overrides) -> RouterConfig:
    """The ``RouterConfig`` the flags set, in front of the engine the flags set: the served model name
    defaults to ``--model``; prefix-aware placement hashes prompts with the engine's ``--block-size``."""
    extra = {"served_model_name": args.served_model_name or args.model}
    if args.placement == "prefix_aware":
        extra["placement_options"] = {"block_size": args.block_size}
    return from_namespace(RouterConfig, args, **{**extra, **overrides})


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The ``EngineConfig`` the flags set; a bad value is a ValueError naming its flag."""
    return from_namespace(EngineConfig, args, **overrides)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The flags' ``EngineConfig`` fields but ``model``, checked: ``LLM(args.model, **engine_kwargs(args))``."""
    config = engine_config(args)
    return {name: getattr(config, name) for name in EngineConfig.__dataclass_fields__ if name != "model"}


def worker_flags(args: argparse.Namespace) -> list[str]:
    """The engine and ``--kv-*`` options of ``args`` as a worker process's flags (non-default ones;
    ``--model`` always). Checks them, so a bad value is refused before any worker starts."""
    return to_argv(engine_config(args)) + to_argv(from_namespace(DisaggConfig, args))
