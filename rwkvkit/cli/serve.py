"""``rwkvkit serve``: load a model, start the continuous-batching engine and serve the HTTP API.

The API itself (schemas, errors, streaming, endpoints) is :mod:`rwkvkit.infer.server`; this module owns the
command's flags and the process around it: uvicorn, and stopping the engine on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from rwkvkit.cli.common import (
    add_bf16_prefill_arg,
    add_model_args,
    load_model_and_tokenizer,
    non_negative_int,
    positive_int,
    unescape,
)
from rwkvkit.errors import RwkvkitError


def port(text: str) -> int:
    """An argparse type: a TCP port number, 0 for a free one."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rwkvkit serve``."""
    add_model_args(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)"
    )
    parser.add_argument(
        "--port", type=port, default=8000, help="TCP port (default: %(default)s; 0 picks a free one)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("RWKVKIT_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $RWKVKIT_API_KEY; "
        "none: no key needed)",
    )
    parser.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="the model id clients ask for (default: the file stem)",
    )
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=16,
        metavar="N",
        help="sequences decoded together (default: 16)",
    )
    parser.add_argument(
        "--max-waiting",
        type=non_negative_int,
        default=64,
        metavar="N",
        help="requests that may wait for a slot; more are answered 429 (default: 64)",
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        default=4096,
        metavar="N",
        help="the most tokens one request may generate (default: 4096)",
    )
    parser.add_argument(
        "--cache-mb",
        type=non_negative_int,
        default=256,
        metavar="MB",
        help="prefix-state cache size in MiB; 0 disables it (default: 256)",
    )
    add_bf16_prefill_arg(parser)
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="on a CUDA device: replay each decode step from a CUDA graph (one recorded per power-of-two "
        "batch size on first use), which removes the per-kernel launch time of small batches",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="directory for state files (the 'state' / 'save_state' request fields); created if missing. "
        "Without it, state files are disabled",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|model",
        help="a Jinja chat template (the Hugging Face format) for /v1/chat/completions, or 'model' for the "
        "one the model's Hugging Face folder ships (chat_template.jinja or tokenizer_config.json); "
        "default: the World chat format 'User: ...\\n\\nAssistant:'",
    )
    parser.add_argument(
        "--chat-stop",
        action="append",
        default=None,
        metavar="STRING",
        help="a text that ends the model's turn in the chat template (repeat for several; \\n, \\t, \\r, "
        "\\\\ are escapes): chat generation stops there. Default: '\\n\\nUser:' for the World format, "
        "none for --chat-template (then replies end at the end-of-text token or the length limit)",
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=["think"],
        default=None,
        help="'think': a chat reply that opens with <think>...</think> returns that block as "
        "message.reasoning_content (delta.reasoning_content when streamed) and the rest as content",
    )


def load_chat_template(args: argparse.Namespace):
    """The chat template of --chat-template / --chat-stop (World by default), checked by rendering a user
    message (RwkvkitError for a template that does not parse or fails)."""
    # imported here: jinja2 (the "serve" extra) is only needed once a template is asked for
    from rwkvkit.infer.chat_template import (
        ChatTemplate,
        WorldChatTemplate,
        folder_chat_template,
        folder_special_tokens,
    )

    stops = [unescape(s) for s in args.chat_stop] if args.chat_stop is not None else None
    if any(not s for s in stops or ()):
        raise RwkvkitError("--chat-stop needs a non-empty string")
    if args.chat_template is None:
        return WorldChatTemplate() if stops is None else WorldChatTemplate(stops)
    if args.chat_template == "model":
        if not Path(args.model).is_dir():
            raise RwkvkitError("--chat-template model needs a Hugging Face model folder as --model")
        template = folder_chat_template(args.model, stops or ())
    else:
        template = ChatTemplate.from_file(
            args.chat_template, stops or (), **folder_special_tokens(args.model)
        )
    template.check()
    if not template.stop_strings:
        print(
            "warning: --chat-template without --chat-stop: chat replies end only at the end-of-text token, "
            "the client's stop strings or the length limit",
            file=sys.stderr,
        )
    return template


def run(args: argparse.Namespace) -> int:
    """``rwkvkit serve``: load the model, start the engine, serve HTTP until interrupted."""
    # imported here, not at the top: FastAPI and uvicorn are the optional "serve" extra, and torch is
    # not needed for --help
    from rwkvkit.infer.cache import PrefixCache
    from rwkvkit.infer.engine import Engine
    from rwkvkit.infer.server import create_app

    if args.api_key is not None and not args.api_key:
        raise RwkvkitError("--api-key needs a non-empty key")
    chat_template = load_chat_template(args)  # before the model: a bad template fails at once
    model, tokenizer = load_model_and_tokenizer(args)
    cache = PrefixCache(args.cache_mb * 2**20) if args.cache_mb > 0 else None
    engine = Engine(
        model,
        tokenizer,
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
        cache=cache,
        bf16_prefill=args.bf16_prefill,
        cuda_graphs=args.cuda_graphs,
    )
    app = create_app(
        engine,
        args.model_name or Path(args.model).stem,
        api_key=args.api_key,
        max_tokens_limit=args.max_tokens_limit,
        state_dir=args.state_dir,
        chat_template=chat_template,
        reasoning_parser=args.reasoning_parser,
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(
            f"warning: listening on {args.host} without an API key: anyone who can reach it can use "
            "the model",
            file=sys.stderr,
        )
    _serve(app, engine, args.host, args.port)
    return 0


def _serve(app, engine, host: str, port: int) -> None:
    """Run uvicorn until Ctrl-C / SIGTERM; the engine runs alongside and is shut down at the end."""
    import uvicorn  # the optional "serve" extra

    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    )
    uvicorn_exit = server.handle_exit
    stopper = threading.Thread(target=engine.shutdown, name="rwkvkit-engine-shutdown", daemon=True)

    def handle_exit(sig, frame) -> None:
        # Ctrl-C / SIGTERM: cancel the running requests at once (their clients get a "shutting down"
        # error and [DONE]) so that open streams end and uvicorn need not wait for them.
        uvicorn_exit(sig, frame)
        if not stopper.is_alive() and stopper.ident is None:
            stopper.start()

    server.handle_exit = handle_exit
    engine.start()
    try:
        server.run()
    finally:
        engine.shutdown()
