"""Tool calling: the request's tools, the parsers that find calls in generated text, the grammar that
forces a call, the chat-template input, and the calls as OpenAI response pieces. Torch-free."""

from .base import (CallDelta, ParsedText, ToolParser, available_tool_parsers, register_tool_parser,
                   tool_parser_class)
from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser

__all__ = ["CallDelta", "HermesToolParser", "Llama3JsonToolParser", "ParsedText", "ToolParser",
           "available_tool_parsers", "register_tool_parser", "tool_parser_class"]
