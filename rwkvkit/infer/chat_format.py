"""The World chat format: the one definition of the text a World model reads in a conversation, used by
``ChatSession`` (:mod:`rwkvkit.infer.chat`) and by the server's ``/v1/chat/completions``.

The text (the convention of the reference chat for World models)::

    System: {system}\\n\\nUser: {message 1}\\n\\nAssistant:{reply 1}\\n\\nUser: {message 2}\\n\\nAssistant:...

* The system turn is optional; without it the conversation starts at ``User: ``.
* Turns are separated by ``\\n\\n`` (TURN_SEPARATOR); the first has none before it. There is no space after
  ``Assistant:``: the model writes its own.
* A message is normalised first: ``\\r\\n`` and ``\\r`` become ``\\n``, the ends are stripped, and blank
  lines inside it collapse to one ``\\n`` (a ``\\n\\n`` inside a message would read as a new turn).
* A reply ends at ``\\n\\nUser:`` (STOP_STRING: the model starting the next user turn).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from rwkvkit.errors import RwkvkitError

USER_PREFIX = "User: "
ASSISTANT_PROMPT = "Assistant:"
SYSTEM_PREFIX = "System: "
TURN_SEPARATOR = "\n\n"
STOP_STRING = "\n\nUser:"
# OpenAI's message roles -> the speaker names of the World format
ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def normalize_message(text: str) -> str:
    """A message as the model should read it: newlines normalised, ends stripped, blank lines collapsed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    return re.sub(r"\n(?:[ \t]*\n)+", "\n", text)


def format_user_turn(text: str, first: bool = True) -> str:
    """The text of one user turn up to the point where the assistant answers.

    ``first``: nothing has been said yet (no system turn either), so no ``\\n\\n`` goes before it.
    ``format_user_turn("Hi")`` is ``"User: Hi\\n\\nAssistant:"``; with ``first=False`` it starts with
    ``"\\n\\n"``. Raises RwkvkitError for a message that is empty after normalising.
    """
    message = normalize_message(text)
    if not message:
        raise RwkvkitError("empty message: there is nothing to send")
    return ("" if first else TURN_SEPARATOR) + USER_PREFIX + message + TURN_SEPARATOR + ASSISTANT_PROMPT


def format_system_turn(text: str) -> str:
    """The system turn that opens a conversation: ``"System: {text}"`` (normalised like a message)."""
    message = normalize_message(text)
    if not message:
        raise RwkvkitError("empty system prompt")
    return SYSTEM_PREFIX + message


def format_conversation(messages: Iterable[tuple[str, str]]) -> str:
    """The prompt for a whole list of (role, text) messages (roles as in ROLES): ``Speaker: text`` turns
    (``Speaker:`` alone for an empty text) joined by ``\\n\\n``, then ``\\n\\nAssistant:``."""
    turns = []
    for role, text in messages:
        speaker, message = ROLES[role], normalize_message(text)
        turns.append(f"{speaker}: {message}" if message else f"{speaker}:")
    return TURN_SEPARATOR.join(turns) + TURN_SEPARATOR + ASSISTANT_PROMPT
