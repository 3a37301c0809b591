"""Tool calling for ``/v1/chat/completions``: the tools' prompt text, the model's calls read back, and the
JSON schema that constrains a call when one is required.

The template (World chat format). With ``tools`` (and ``tool_choice`` not ``none``) the conversation opens
with a system turn listing them, after the client's own system text::

    System: {client's system text}
    You can call these functions. To call one, answer with
    <tool_call>{"name": "NAME", "arguments": {...}}</tool_call>
    (one block per call, nothing else in the block). The functions, as JSON:
    {"name": "get_weather", "description": "...", "parameters": {...}}

An assistant message that made calls is rendered as its text followed by one ``<tool_call>...</tool_call>``
block per call; a ``tool`` message (a call's result) as a ``Tool:`` turn ``Tool: (NAME, CALL_ID) RESULT``.

Reading calls back: in ``auto`` mode every well-formed block naming a given tool becomes a ``tool_calls``
entry and the text outside the blocks stays the content (a block that does not parse, or names an unknown
function, stays text: nothing is dropped). With ``parallel_tool_calls: false`` generation stops after the
first block. With ``required`` or a named function the reply is decoded under :func:`call_schema` (one
call, its arguments matching the function's parameters) and returned as that call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from rwkvkit.infer.server.protocol import ApiError

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
INTRO = (
    "You can call these functions. To call one, answer with\n"
    + OPEN_TAG
    + '{"name": "NAME", "arguments": {...}}'
    + CLOSE_TAG
    + "\n(one block per call, nothing else in the block). The functions, as JSON:"
)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    raw: dict  # the definition as the client sent it (what a chat template's ``tools`` gets)


def parse_tools(tools: list | None) -> list[Tool]:
    """The request's ``tools``: function tools with unique names and object-schema parameters."""
    out: list[Tool] = []
    for i, tool in enumerate(tools or []):
        function = tool.function
        if tool.type != "function" or function is None:
            raise ApiError(400, f"tools[{i}]: only type 'function' tools are supported", param="tools")
        parameters = function.parameters if function.parameters is not None else {"type": "object"}
        if not isinstance(parameters, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        if any(t.name == function.name for t in out):
            raise ApiError(
                400, f"tools[{i}]: the function name '{function.name}' is used twice", param="tools"
            )
        raw = tool.model_dump(exclude_none=True, by_alias=True)
        out.append(Tool(function.name, function.description or "", parameters, raw))
    return out


def chosen_tools(tools: list[Tool], tool_choice) -> tuple[str, list[Tool]]:
    """(mode, the tools that may be called): mode is "none", "auto" or "required" (a named function is
    "required" with that one tool)."""
    if tool_choice is None:
        return ("auto" if tools else "none"), tools
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ApiError(
                400, f"tool_choice '{tool_choice}' is not none, auto, required", param="tool_choice"
            )
        if tool_choice != "none" and not tools:
            raise ApiError(400, f"tool_choice '{tool_choice}' needs tools", param="tool_choice")
        return tool_choice, tools
    name = tool_choice.function.name
    named = [t for t in tools if t.name == name]
    if not named:
        raise ApiError(
            400, f"tool_choice names the function '{name}', which is not in tools", param="tool_choice"
        )
    return "required", named


def tools_system_text(tools: list[Tool]) -> str:
    """The instructions and the list of functions that go into the system turn."""
    lines = [INTRO]
    for tool in tools:
        spec = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        lines.append(json.dumps(spec, ensure_ascii=False))
    return "\n".join(lines)


def call_block(name: str, arguments: str) -> str:
    """An earlier call as the model would have written it (``arguments`` is a JSON string)."""
    try:
        args = json.loads(arguments)
    except (TypeError, ValueError):
        args = arguments
    return OPEN_TAG + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + CLOSE_TAG


def call_schema(tools: list[Tool]) -> dict:
    """The JSON schema of one call of one of ``tools``: {"name": const, "arguments": its parameters}."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_call(name: str, arguments) -> dict:
    """A ``tool_calls`` entry (``arguments`` as a JSON string, as OpenAI gives it)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": text},
    }


def read_call(block: str, names: set[str] | None = None) -> dict | None:
    """The ``tool_calls`` entry of a call's JSON text, or None if it is not one (of ``names``, if given)."""
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("arguments"), dict):
        return None
    if not isinstance(value.get("name"), str) or (names is not None and value["name"] not in names):
        return None
    return tool_call(value["name"], value["arguments"])


class ToolCallReader:
    """Splits streamed reply text into content and calls (``auto`` mode).

    ``push(text)`` returns (content safe to show now, the calls completed by this text); text that may
    begin ``<tool_call>`` is held back until it is sure; ``flush()`` returns what is left at the end (an
    unfinished block is content).
    """

    def __init__(self, tools: list[Tool]):
        self.names = {t.name for t in tools}
        self.pending = ""
        self.inside = False
        self.calls: list[dict] = []

    def push(self, text: str) -> tuple[str, list[dict]]:
        self.pending += text
        shown: list[str] = []
        calls: list[dict] = []
        while True:
            if not self.inside:
                at = self.pending.find(OPEN_TAG)
                if at < 0:
                    keep = _partial_suffix(self.pending, OPEN_TAG)
                    shown.append(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep :]
                    break
                shown.append(self.pending[:at])
                self.pending = self.pending[at:]
                self.inside = True
            end = self.pending.find(CLOSE_TAG)
            if end < 0:
                break
            block = self.pending[len(OPEN_TAG) : end]
            call = read_call(block.strip(), self.names)
            if call is None:  # not a call after all: it stays text
                shown.append(self.pending[: end + len(CLOSE_TAG)])
            else:
                calls.append(call)
            self.pending = self.pending[end + len(CLOSE_TAG) :]
            self.inside = False
        self.calls += calls
        return "".join(shown), calls

    def flush(self) -> str:
        out, self.pending, self.inside = self.pending, "", False
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
