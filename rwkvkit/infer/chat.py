"""Chat with an RWKV World model: a session that carries its state.

This module owns ``ChatSession``: one conversation held as the recurrent state after everything said so
far, usable from Python without a terminal (``send`` streams a reply; ``reset``, ``save`` / ``load``,
``interrupt``). The text the model reads is the World chat format of :mod:`rwkvkit.infer.chat_format`
(its names are re-exported here): an optional system turn, then ``User: ...\\n\\nAssistant:`` turns; a
reply ends at ``\\n\\nUser:`` (the model starting the next user turn; never shown), at the end-of-text
token, after ``max_tokens`` tokens, or when interrupted. The terminal command ``rwkvkit chat`` is a thin
loop over ``ChatSession`` (in the command-line package).

After a reply the state has read exactly the conversation text above up to the end of the shown reply
(``ChatSession.text``), so the next turn continues as if the whole conversation were read afresh. The
state after the generated tokens is kept when they spell the shown text (the usual case, so nothing is
recomputed); where they do not (the tokens of a stop string, held-back text, bytes shown as U+FFFD) the
session returns to the last state that matched and reads the rest of the shown text from there.

A saved conversation is two files: ``FILE``, the state, written by ``rwkvkit.state_io.save_state`` (a
``.safetensors`` state file that records the model's config, dtype and weight fingerprint, so a file for
another model is refused), and ``FILE.json``, the conversation record: the number of turns, the system
prompt, the text, and the sha256 of ``FILE`` so that a record is never paired with another save's state.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Generator, Sequence
from pathlib import Path

import torch

from rwkvkit.checkpoint import atomic_write
from rwkvkit.errors import RwkvkitError, check_int
from rwkvkit.infer.chat_format import (
    ASSISTANT_PROMPT,
    STOP_STRING,
    SYSTEM_PREFIX,
    TURN_SEPARATOR,
    USER_PREFIX,
    format_system_turn,
    format_user_turn,
    normalize_message,
)
from rwkvkit.infer.decoding import SequenceDecoder, check_decoding, default_stop_tokens
from rwkvkit.infer.generate import DEFAULT_PREFILL_CHUNK, prefill
from rwkvkit.infer.sampling import SamplingParams, resolve_sampling, seeded_generator
from rwkvkit.state import RWKVState
from rwkvkit.state_io import load_state, save_state

__all__ = [
    "ASSISTANT_PROMPT",
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_CHAT_TEMPERATURE",
    "DEFAULT_CHAT_TOP_K",
    "DEFAULT_CHAT_TOP_P",
    "STOP_STRING",
    "SYSTEM_PREFIX",
    "TURN_SEPARATOR",
    "USER_PREFIX",
    "ChatSession",
    "format_system_turn",
    "format_user_turn",
    "normalize_message",
]

# ChatRWKV's chat settings: a low top-p keeps a chat model on topic.
DEFAULT_CHAT_TEMPERATURE = 1.0
DEFAULT_CHAT_TOP_P = 0.3
DEFAULT_CHAT_TOP_K = 0
DEFAULT_CHAT_MAX_TOKENS = 500
CHAT_SAMPLING_DEFAULTS = {
    "temperature": DEFAULT_CHAT_TEMPERATURE,
    "top_p": DEFAULT_CHAT_TOP_P,
    "top_k": DEFAULT_CHAT_TOP_K,
}

FILE_FORMAT = "rwkvkit-chat"
FILE_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- session


class _Reply:
    """One reply in progress: what was shown, and the last state whose tokens spell exactly that text.

    ``clean`` is (state, reply chars, reply bytes) at the last point where the generated tokens the state
    has read spell the text shown so far; the turn is committed from there (``ChatSession._commit``).
    """

    def __init__(self) -> None:
        self.shown: list[str] = []  # the pieces handed to the caller
        self.n_chars = 0
        self.shown_bytes = bytearray()  # their UTF-8 bytes, as far as the state has read the tokens behind
        self.read_bytes = bytearray()  # the bytes of the generated tokens the state has read
        self.clean: tuple[RWKVState, int, int] | None = None
        self.finish = "closed"  # until the reply ends by itself

    def show(self, text: str) -> None:
        """``text`` is shown; the state has not read its token yet."""
        self.shown.append(text)
        self.n_chars += len(text)

    def read(self, token_bytes: bytes, text: str, state: RWKVState) -> None:
        """The state has now read the token behind the ``text`` shown last."""
        self.read_bytes += token_bytes
        self._agree(text, state)

    def shown_after(self, text: str, state: RWKVState) -> None:
        """``text`` is shown after the last token the state has read (the flush at the end)."""
        self.show(text)
        self._agree(text, state)

    def _agree(self, text: str, state: RWKVState) -> None:
        self.shown_bytes += text.encode("utf-8")
        since = self.clean[2]
        if (
            len(self.shown_bytes) == len(self.read_bytes)
            and self.shown_bytes[since:] == self.read_bytes[since:]
        ):
            self.clean = (state, self.n_chars, len(self.read_bytes))


class ChatSession:
    """One conversation with a model: the recurrent state after everything said so far.

    Args:
        model: an RWKV model (``logits, state = model(tokens (B, T), state, last_only=True)``, ``config``,
            ``device``, ``dtype`` and ``initial_state(batch_size)``).
        tokenizer: encodes the turns and decodes the replies (see ``rwkvkit.tokenizer``).
        sampling: how every reply is sampled (``SamplingParams``; temperature 0 = greedy). Its seed seeds
            a private ``torch.Generator`` (again at every ``reset``), so the same seed and messages give
            the same conversation; no seed uses torch's global random state.
        temperature, top_p, top_k, seed: the older spelling of ``sampling`` (kept for a release; not
            together with it), defaulting to DEFAULT_CHAT_TEMPERATURE, DEFAULT_CHAT_TOP_P,
            DEFAULT_CHAT_TOP_K and no seed.
        max_tokens: the most tokens of one reply.
        system: an optional system prompt, read as the first turn ``System: ...`` (and again after a reset).
        stop_strings: strings that end a reply and are never shown (default: ``"\\n\\nUser:"``).
        prefill_chunk: the most tokens of a turn run through the model at once.
        bf16_prefill: run each turn's matmuls in bf16 where the CPU does bf16 natively (see
            ``rwkvkit.infer.generate.prefill``).

    Attributes: ``state`` (RWKVState after ``text``), ``text`` (the conversation the state has read),
    ``turns`` (user turns answered so far), ``reply`` and ``finish_reason`` of the last reply ("stop",
    "length", "interrupted", or "closed" when the caller stopped reading it or it failed).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        sampling: SamplingParams | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
        seed: int | None = None,
        system: str | None = None,
        stop_strings: Sequence[str] = (STOP_STRING,),
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        bf16_prefill: bool = False,
    ):
        loose = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        self.sampling = resolve_sampling(sampling, CHAT_SAMPLING_DEFAULTS, **loose)
        vocab_size = model.config.vocab_size
        self.stop_strings = check_decoding(self.sampling, vocab_size, max_tokens, stop_strings)
        check_int("prefill_chunk", prefill_chunk, 1)
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.system = None if system is None else normalize_message(system)
        if self.system == "":
            raise RwkvkitError("empty system prompt")
        self.prefill_chunk = prefill_chunk
        self.bf16_prefill = bf16_prefill
        self.stop_tokens = default_stop_tokens(tokenizer, None)
        self.reply = ""
        self.finish_reason: str | None = None
        self._busy = False
        self._interrupt = False
        self.reset()

    # -- conversation -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation: back to the initial state (and the system turn, if any)."""
        self._check_idle()
        self.generator = seeded_generator(self.sampling.seed)
        with torch.inference_mode():
            state = self.model.initial_state(1)
        text = ""
        if self.system is not None:
            text = format_system_turn(self.system)
            state = self._read(state, text)
        self.state, self.text, self.turns = state, text, 0
        self.reply, self.finish_reason = "", None

    def format_user_turn(self, text: str) -> str:
        """The text ``send(text)`` feeds the model now (with ``\\n\\n`` before it unless nothing was said)."""
        return format_user_turn(text, first=self.text == "")

    def send(self, text: str) -> Generator[str, None, None]:
        """Say ``text`` and stream the assistant's reply as pieces of text.

        The message is checked now (RwkvkitError if it is empty or cannot be encoded); the model runs as
        the returned generator is iterated. When it ends, or when the caller closes it early (``close()``,
        or dropping it), the turn is committed: ``state`` has read the user turn and the reply as far as
        it was shown, and the session is ready for the next message. ``interrupt()`` ends the reply after
        the current token.
        """
        self._check_idle()
        self._encode(self.format_user_turn(text))  # fail now, not on the first next()
        return self._reply(text)

    def interrupt(self) -> None:
        """Ask the reply being generated to end after the current token (safe from a signal handler)."""
        self._interrupt = True

    @property
    def interrupt_requested(self) -> bool:
        return self._interrupt

    def _check_idle(self) -> None:
        if self._busy:
            raise RwkvkitError("a reply is still being generated: read it to the end or close it first")

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        vocab_size = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RwkvkitError(
                f"the tokenizer gives id {bad[0]}, outside the model's vocabulary [0, {vocab_size})"
            )
        return ids

    def _read(self, state: RWKVState, text: str) -> RWKVState:
        """The state after reading ``text`` from ``state``."""
        _, state = prefill(self.model, self._encode(text), state, self.prefill_chunk, bf16=self.bf16_prefill)
        return state

    def _reply(self, message: str) -> Generator[str, None, None]:
        self._check_idle()
        self._busy = True
        self._interrupt = False
        turn = self.format_user_turn(message)
        reply = _Reply()
        try:
            logits, state = prefill(
                self.model, self._encode(turn), self.state, self.prefill_chunk, bf16=self.bf16_prefill
            )
            reply.clean = (state, 0, 0)
            yield from self._decode(logits, state, reply)
        finally:
            try:
                if reply.clean is not None:  # the user turn was read: commit it with the reply as shown
                    self._commit(turn, reply)
            finally:
                self._busy = False

    def _decode(self, logits: torch.Tensor, state: RWKVState, reply: _Reply) -> Generator[str, None, None]:
        """Generate the reply after ``logits`` (V,) and ``state``, recording what is shown and read."""
        decoder = SequenceDecoder(
            self.tokenizer,
            self.sampling,
            vocab_size=self.model.config.vocab_size,
            max_tokens=self.max_tokens,
            stop_tokens=self.stop_tokens,
            stop_strings=self.stop_strings,
            generator=self.generator,
        )
        while True:
            interrupted = self._interrupt and not decoder.exhausted
            out = decoder.finish("interrupted") if interrupted else decoder.step(logits)
            if out.token is None:  # the end (length, stop token, interrupt): the text held back until now
                reply.finish = out.finish_reason
                reply.shown_after(out.text, state)
                if out.text:
                    yield out.text
                return
            reply.show(out.text)
            if out.text:
                yield out.text
            if out.finish_reason is not None:  # a stop string: its tokens are not needed in the state
                reply.finish = out.finish_reason
                return
            logits, state = prefill(self.model, [out.token], state)
            reply.read(self.tokenizer.decode_bytes([out.token]), out.text, state)

    def _commit(self, turn: str, reply: _Reply) -> None:
        state, n_chars, _ = reply.clean
        text = "".join(reply.shown)
        rest = text[n_chars:]  # shown, but not (or not as these bytes) read by ``state``
        if rest:
            state = self._read(state, rest)
        self.state = state
        self.text += turn + text
        self.turns += 1
        self.reply, self.finish_reason = text, reply.finish

    # -- files --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the conversation: its state to ``path`` (an ``rwkvkit.state_io`` state file, tied to this
        model's weights) and its text and number of turns to ``path`` + ``.json``."""
        self._check_idle()
        path = Path(path)
        if not path.parent.is_dir():
            raise RwkvkitError(f"cannot write {path}: there is no directory {path.parent}")
        save_state(self.state, path, self.model)
        record = {
            "format": FILE_FORMAT,
            "format_version": FILE_FORMAT_VERSION,
            "state_sha256": _file_sha256(path),  # ties this record to that state file
            "turns": self.turns,
            "system": self.system,
            "text": self.text,
        }
        data = json.dumps(record, ensure_ascii=False, indent=1) + "\n"
        atomic_write(_record_path(path), lambda tmp: Path(tmp).write_text(data, encoding="utf-8"))

    def load(self, path: str | os.PathLike) -> None:
        """Continue the conversation saved in ``path`` (and ``path`` + ``.json``) by ``save``.

        Raises RwkvkitError, leaving the session as it was, for a missing, damaged or foreign file, a
        state of another model (``rwkvkit.state_io.load_state`` checks the config, the dtype and the
        weights' fingerprint), or a ``.json`` record missing or written with another save of the state.
        """
        self._check_idle()
        path = Path(path)
        state = load_state(path, self.model)
        if state.batch_size != 1:
            raise RwkvkitError(
                f"{path} holds the states of {state.batch_size} sequences, not one conversation"
            )
        record_path = _record_path(path)
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RwkvkitError(
                f"{path} is a state file without its conversation record {record_path} (written by /save)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RwkvkitError(f"cannot read the conversation record {record_path}: {e}") from None
        if not isinstance(record, dict) or record.get("format") != FILE_FORMAT:
            raise RwkvkitError(f"{record_path} is not a conversation record written by rwkvkit chat")
        if record.get("format_version") != FILE_FORMAT_VERSION:
            raise RwkvkitError(
                f"{record_path} has conversation format version {record.get('format_version')!r}; "
                f"this rwkvkit reads version {FILE_FORMAT_VERSION}"
            )
        turns, text = record.get("turns"), record.get("text")
        if isinstance(turns, bool) or not isinstance(turns, int) or turns < 0 or not isinstance(text, str):
            raise RwkvkitError(f"{record_path} is damaged: 'turns' or 'text' is missing or of the wrong type")
        if record.get("state_sha256") != _file_sha256(path):
            raise RwkvkitError(
                f"{record_path} was written with another save of {path}; they do not belong together"
            )
        self.state, self.turns, self.text = state, turns, text
        self.reply, self.finish_reason = "", None


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
