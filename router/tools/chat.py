"""A chat request's tools, from the checked body to what the endpoint needs: the plan (or None),
the forced-call constraint it adds to the sampling params, and the template's input."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.workers.engine.structured_outputs import StructuredOutputs

from .base import tool_parser_class
from .grammar import forced_constraint
from .request import DEFAULT_FORMAT, ChatTool, ToolPlan, plan_tools
from .template import template_input


@dataclass(frozen=True)
class ChatTools:
    plan: ToolPlan | None
    constraint: StructuredOutputs | None  # tool_choice required / named: the grammar of the call
    messages: list[dict]
    template_kwargs: dict


def prepare_chat_tools(messages: list[dict], tools: list[ChatTool] | None, tool_choice, parallel_tool_calls,
                       configured_parser: str | None, chat_template: str | None) -> ChatTools:
    """Raises ``InvalidParam`` naming the field at fault."""
    plan = plan_tools(tools, tool_choice, parallel_tool_calls, configured_parser)
    fmt = plan.parser if plan is not None else tool_parser_class(configured_parser or DEFAULT_FORMAT)
    constraint = forced_constraint(plan) if plan is not None and plan.forced else None
    rendered, extra = template_input(messages, plan.template_tools() if plan else None, fmt, chat_template)
    return ChatTools(plan, constraint, rendered, extra)
