"""Chat templates: how a list of chat messages becomes the prompt text, for ``rwkvkit serve``.

Two kinds, with one interface (``render(messages, add_generation_prompt=True, tools=None) -> str``,
``stop_strings``, ``name``):

* :data:`WORLD` (the default): the World chat format of :mod:`rwkvkit.infer.chat_format`, exactly
  (``System: ...\\n\\nUser: ...\\n\\nAssistant:``); its replies end at ``\\n\\nUser:`` (STOP_STRING).
* :class:`ChatTemplate`: a Jinja template in the format Hugging Face tokenizers ship in
  ``tokenizer_config.json``'s ``chat_template``. It is rendered in jinja2's immutable sandbox, with
  ``trim_blocks`` and ``lstrip_blocks`` on and the loop controls extension, and sees the variables
  ``messages`` (a list of ``{"role", "content"}`` dicts, content as a string), ``add_generation_prompt``,
  ``bos_token``, ``eos_token`` and ``tools`` (when given), the functions ``raise_exception(message)`` and
  ``strftime_now(format)``, and the filter ``tojson`` (``json.dumps`` without ASCII escaping; ``indent``
  as an option). Message texts are passed as they are: the template owns their formatting.
  Its ``stop_strings`` are the texts that end the model's turn in that format (e.g. ``<|im_end|>``);
  they are the caller's to give, a template has none by itself.

Errors are one-line RwkvkitErrors: a template that does not parse when it is loaded, and a render that
fails (``raise_exception`` or any error inside the template) when it is rendered.

jinja2 is imported only when a Jinja template is loaded (it comes with torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_format import (
    ROLES,
    STOP_STRING,
    TURN_SEPARATOR,
    format_conversation,
    normalize_message,
)

TEMPLATE_FILE = "chat_template.jinja"  # where newer Hugging Face folders keep the template
TOKENIZER_CONFIG = "tokenizer_config.json"


class TemplateRaised(Exception):
    """What ``raise_exception(message)`` raises inside a template."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment():
    """The sandboxed jinja2 environment chat templates render in."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RwkvkitError("chat templates need jinja2: pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_stops(stop_strings: Sequence[str]) -> tuple[str, ...]:
    stops = tuple(stop_strings)
    if any(not isinstance(s, str) or not s for s in stops):
        raise RwkvkitError("chat stop strings must be non-empty strings")
    return stops


class ChatTemplate:
    """A Jinja chat template (see the module docstring).

    Args:
        source: the template text.
        stop_strings: the texts that end the model's turn in this format (the server stops generation at
            them; none by default).
        bos_token / eos_token: the values of the template's ``bos_token`` / ``eos_token`` variables.
        name: what errors call the template (e.g. its file).

    Raises RwkvkitError when the template does not parse.
    """

    def __init__(
        self,
        source: str,
        stop_strings: Sequence[str] = (),
        *,
        bos_token: str = "",
        eos_token: str = "",
        name: str = "chat template",
    ):
        from jinja2 import TemplateSyntaxError  # _environment() says when jinja2 is missing

        env = _environment()
        self.name = name
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.stop_strings = _check_stops(stop_strings)
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise RwkvkitError(f"{name} does not parse: line {e.lineno}: {_one_line(e.message)}") from None

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, stop_strings: Sequence[str] = (), **tokens: str
    ) -> ChatTemplate:
        """The template in the text file ``path`` (``tokens``: ``bos_token`` / ``eos_token``)."""
        path = Path(path)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RwkvkitError(f"cannot read the chat template {path}: {_one_line(e)}") from None
        return cls(source, stop_strings, name=f"chat template {path}", **tokens)

    def render(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, tools: list | None = None
    ) -> str:
        """The prompt text of ``messages`` (dicts with ``role`` and ``content``); RwkvkitError (param
        ``messages``) when the template fails on them."""
        variables: dict[str, Any] = {
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools is not None:
            variables["tools"] = tools
        try:
            return self._template.render(**variables)
        except TemplateRaised as e:
            raise RwkvkitError(
                f"the chat template refused the messages: {_one_line(e)}", param="messages"
            ) from None
        except Exception as e:  # any error inside the template (undefined attribute, wrong type, sandbox)
            detail = _one_line(e) or type(e).__name__
            raise RwkvkitError(
                f"the chat template failed on the messages: {type(e).__name__}: {detail}", param="messages"
            ) from None

    def check(self) -> None:
        """Render a one-message conversation: RwkvkitError now for a template that fails on any input."""
        try:
            self.render([{"role": "user", "content": "Hello"}])
        except RwkvkitError as e:
            raise RwkvkitError(f"{self.name} fails on a plain user message: {e}") from None


class WorldChatTemplate:
    """The World chat format (:func:`rwkvkit.infer.chat_format.format_conversation`) behind the
    ChatTemplate interface; ``tools`` are not part of the format and are ignored."""

    name = "World chat format"

    def __init__(self, stop_strings: Sequence[str] = (STOP_STRING,)):
        self.stop_strings = _check_stops(stop_strings)

    def render(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, tools: list | None = None
    ) -> str:
        turns = []
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in ROLES:
                raise RwkvkitError(
                    f"messages[{i}]: the World chat format has no role {role!r}", param="messages"
                )
            turns.append((role, message.get("content") or ""))
        if add_generation_prompt:
            return format_conversation(turns)
        # the same turns, without the closing "\n\nAssistant:"
        return TURN_SEPARATOR.join(
            f"{ROLES[role]}: {text}" if text else f"{ROLES[role]}:"
            for role, text in ((role, normalize_message(text)) for role, text in turns)
        )

    def check(self) -> None:
        """Nothing to check: the World format renders any conversation."""


WORLD = WorldChatTemplate()


# ---------------------------------------------------------------------------------------------- folders


def _special_token(value: Any) -> str:
    """A special token of tokenizer_config.json: a string, or a dict with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def folder_tokenizer_config(folder: str | os.PathLike) -> dict:
    """The folder's tokenizer_config.json as a dict ({} for a file, or a folder without one)."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not Path(folder).is_dir() or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RwkvkitError(f"{path} is not valid JSON ({_one_line(e)})") from None
    return config if isinstance(config, dict) else {}


def folder_special_tokens(folder: str | os.PathLike) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` of a Hugging Face folder's tokenizer_config.json ("" when absent)."""
    config = folder_tokenizer_config(folder)
    return {name: _special_token(config.get(name)) for name in ("bos_token", "eos_token")}


def folder_chat_template(folder: str | os.PathLike, stop_strings: Sequence[str] = ()) -> ChatTemplate:
    """The chat template a Hugging Face folder ships: its ``chat_template.jinja``, else the
    ``chat_template`` of its tokenizer_config.json (a string, or a list of named templates: the one named
    "default"); RwkvkitError when it ships none."""
    folder = Path(folder)
    tokens = folder_special_tokens(folder)
    if (folder / TEMPLATE_FILE).is_file():
        return ChatTemplate.from_file(folder / TEMPLATE_FILE, stop_strings, **tokens)
    template = folder_tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise RwkvkitError(
            f"{folder} ships no chat template (no {TEMPLATE_FILE}, no 'chat_template' string in "
            f"{TOKENIZER_CONFIG})"
        )
    return ChatTemplate(template, stop_strings, name=f"chat template of {folder}", **tokens)
