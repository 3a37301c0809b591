"""Reasoning split: a reply that opens with a ``<think>`` ... ``</think>`` block is split into its
reasoning (the block's inside) and its content (the rest), also when the text arrives in pieces.

The rules (``ThinkSplitter``, ``split_reasoning``):

* A reply whose text, after leading whitespace, starts with ``<think>`` is reasoning up to ``</think>``;
  what follows is content. A reply that does not start with ``<think>`` is all content, untouched.
* ``inside=True`` (the prompt itself ended with ``<think>``, as templates that open the block for the
  model do): the reply is reasoning from its first character, up to ``</think>``.
* The reasoning loses the whitespace at both of its ends, the content the whitespace at its start
  (the newlines models write around the tags).
* A reply that never writes ``</think>`` is all reasoning (content None), as vLLM answers it.
* ``split_reasoning`` answers None for an empty reasoning (no block) or an empty content.

``push(text)`` returns the (reasoning, content) text that is certain now; text that may be the
beginning of a tag, or whitespace that may turn out to end the reasoning, is held back until the next
piece (or ``flush()`` at the end) decides it.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_START, _REASONING, _AFTER, _CONTENT = "start", "reasoning", "after", "content"


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ThinkSplitter:
    """Splits a reply streamed in pieces into reasoning and content (see the module docstring)."""

    def __init__(self, inside: bool = False):
        self.inside = inside
        self.state = _REASONING if inside else _START
        self.pending = ""
        self.reasoning_started = False  # whether reasoning text has been emitted (leading strip done)

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that ``text`` makes certain ("" for none)."""
        self.pending += text
        reasoning, content = "", ""
        if self.state == _START:
            head = self.pending.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.pending = _REASONING, head[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(head):  # still a possible "<think>" (or only whitespace so far)
                return "", ""
            else:
                self.state = _CONTENT
        if self.state == _REASONING:
            reasoning = self._reasoning_text()
        if self.state == _AFTER:
            self.pending = self.pending.lstrip()
            if self.pending:
                self.state = _CONTENT
        if self.state == _CONTENT:
            content, self.pending = self.pending, ""
        return reasoning, content

    def _reasoning_text(self) -> str:
        """The reasoning certain in ``pending`` (moving to the content at ``</think>``)."""
        if not self.reasoning_started:
            self.pending = self.pending.lstrip()
        at = self.pending.find(THINK_CLOSE)
        if at >= 0:
            reasoning, self.pending = self.pending[:at].rstrip(), self.pending[at + len(THINK_CLOSE) :]
            self.state = _AFTER
        else:
            safe = self.pending[: len(self.pending) - _partial_tag(self.pending, THINK_CLOSE)].rstrip()
            reasoning, self.pending = safe, self.pending[len(safe) :]
        if reasoning:
            self.reasoning_started = True
        return reasoning

    def flush(self) -> tuple[str, str]:
        """(reasoning, content) still held back, at the end of the reply."""
        held, self.pending = self.pending, ""
        if self.state == _START:  # whitespace and a beginning of "<think>" only: plain content
            self.state = _CONTENT
            return "", held
        if self.state == _REASONING:  # never closed: all of it is reasoning
            return held.strip() if not self.reasoning_started else held.rstrip(), ""
        return "", ""


def split_reasoning(text: str, inside: bool = False) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole reply, None for an empty part (see the module docstring)."""
    splitter = ThinkSplitter(inside)
    reasoning, content = splitter.push(text)
    r, c = splitter.flush()
    reasoning, content = reasoning + r, content + c
    if not (inside or text.lstrip().startswith(THINK_OPEN)):
        return None, text  # no block: all content, untouched
    return reasoning or None, content or None


def prompt_opens_think(prompt: str) -> bool:
    """Whether a prompt ends inside an open ``<think>`` block (the template opened it for the model)."""
    return prompt.rstrip().endswith(THINK_OPEN)
