"""``rwkvkit chat``: the terminal chat over :class:`rwkvkit.infer.chat.ChatSession`.

This module owns the command's flags, the read-eval loop (``chat_loop``), the /commands and the streaming
of replies with Ctrl-C handling; the conversation itself (format, state, files) is ``ChatSession``'s.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TextIO

from rwkvkit.cli.common import (
    add_bf16_prefill_arg,
    add_model_args,
    add_sampling_args,
    load_model_and_tokenizer,
    one_line,
    sampling_params,
    streaming_stdout,
    unescape,
)
from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_CHAT_TEMPERATURE,
    DEFAULT_CHAT_TOP_K,
    DEFAULT_CHAT_TOP_P,
    ChatSession,
)
from rwkvkit.infer.chat_format import ASSISTANT_PROMPT, SYSTEM_PREFIX, USER_PREFIX, normalize_message

COMMANDS_HELP = """\
commands:
  /help          show this list
  /reset         forget the conversation and start again (with the --system prompt, if any)
  /save FILE     save the conversation: its state to FILE (.safetensors), its text to FILE.json
  /load FILE     continue a conversation saved with /save (with the same model and --dtype)
  /quit, /exit   leave (Ctrl-D does too; Ctrl-C stops a reply, or leaves at the prompt)
A message is one line; \\n in it is a line break (\\\\ a backslash). Start a message with // to send
text that begins with /."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rwkvkit chat``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Chat with an RWKV World model in the terminal. Each message is read as the turn\n"
        "'User: {message}\\n\\nAssistant:' and the reply streams until the model starts the next\n"
        "'\\n\\nUser:' turn (never shown), emits end-of-text, or reaches --max-tokens."
    )
    parser.epilog = COMMANDS_HELP
    add_model_args(parser)
    add_sampling_args(
        parser,
        temperature=DEFAULT_CHAT_TEMPERATURE,
        top_p=DEFAULT_CHAT_TOP_P,  # ChatRWKV's: a low top-p keeps a chat model on topic
        top_k=DEFAULT_CHAT_TOP_K,
        seed_help="random seed: the same seed and messages give the same replies (/reset re-seeds)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_CHAT_MAX_TOKENS,
        metavar="N",
        help="the most tokens of one reply (default: %(default)s)",
    )
    parser.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="a system prompt, read first as the turn 'System: TEXT' before the conversation; \\n in it is "
        "a line break",
    )
    add_bf16_prefill_arg(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit chat``."""
    # Cheap checks first, before reading a large checkpoint.
    sampling = sampling_params(args)
    if args.max_tokens < 1:
        raise RwkvkitError(f"--max-tokens must be an integer >= 1, got {args.max_tokens}")
    system = None if args.system is None else unescape(args.system)
    if system is not None and not normalize_message(system):
        raise RwkvkitError("--system needs a non-empty text")
    model, tokenizer = load_model_and_tokenizer(args)
    session = ChatSession(
        model,
        tokenizer,
        sampling=sampling,
        max_tokens=args.max_tokens,
        system=system,
        bf16_prefill=args.bf16_prefill,
    )
    out = streaming_stdout()
    out.write(
        f"Chatting with {model.config.describe()} ({args.model}).\n"
        "/help lists the commands; /quit or Ctrl-D leaves.\n"
    )
    if system is not None:
        out.write(f"{SYSTEM_PREFIX}{session.system}\n")
    out.write("\n")
    return chat_loop(session, out)


def chat_loop(session: ChatSession, out: TextIO) -> int:
    """Read messages and commands with ``input()`` until /quit, EOF or Ctrl-C at the prompt. Returns 0."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = input(USER_PREFIX)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            out.flush()
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/") and not line.startswith("//"):
                if not _run_command(session, line, out):
                    return 0
                continue
            _stream_reply(session, unescape(line[1:] if line.startswith("//") else line), out)
        except RwkvkitError as e:
            out.flush()
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)


def _run_command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run one /command; False means leave."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        out.write(COMMANDS_HELP + "\n")
    elif name == "/reset":
        session.reset()
        out.write("(conversation reset)\n")
    elif name in ("/save", "/load"):
        if not argument:
            raise RwkvkitError(f"usage: {name} FILE")
        if name == "/save":
            session.save(argument)
            out.write(
                f"(saved the conversation, {_turns(session.turns)}, to {argument} and {argument}.json)\n"
            )
        else:
            session.load(argument)
            out.write(f"(loaded a conversation of {_turns(session.turns)} from {argument})\n")
    else:
        out.write(f"unknown command {name}: /help lists the commands (// sends a message starting with /)\n")
    out.flush()
    return True


def _turns(n: int) -> str:
    return f"{n} turn" if n == 1 else f"{n} turns"


def _stream_reply(session: ChatSession, message: str, out: TextIO) -> None:
    """Print ``Assistant:`` and the reply as it is generated; Ctrl-C ends the reply early."""
    stream = session.send(message)  # checks the message before anything is printed

    def on_ctrl_c(signum, frame) -> None:
        if session.interrupt_requested:  # a second Ctrl-C: stop now, not after the current token
            raise KeyboardInterrupt
        session.interrupt()

    try:
        previous = signal.signal(signal.SIGINT, on_ctrl_c)
    except ValueError:  # not the main thread: Ctrl-C keeps its usual meaning
        previous = None
    out.write(ASSISTANT_PROMPT)
    out.flush()
    try:
        for piece in stream:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()  # commits the turn as far as it was shown
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if session.finish_reason in ("interrupted", "closed"):
            out.write(" [stopped]")
        out.write("\n\n")
        out.flush()
