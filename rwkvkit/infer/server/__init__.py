"""``rwkvkit serve``: an OpenAI-compatible HTTP API over the continuous-batching :class:`Engine`.

:func:`create_app` builds the FastAPI application around an engine that the caller has started
(``engine.start()``); it can be driven without uvicorn (``rwkvkit serve``, in the command-line package,
runs it under uvicorn). The package, one job per module (on the pattern of vLLM's OpenAI entrypoints):

* :mod:`.protocol`: the request / response schemas and :class:`ApiError`;
* :mod:`.errors`: errors in OpenAI's shape and the mapping of validation errors to them;
* :mod:`.bridge`: the thread-to-asyncio event bridge, the client-gone check, Server-Sent Events;
* :mod:`.serving`: the shared serving path (request checks, sampling, engine, streaming);
  :mod:`.serving_completion`, :mod:`.serving_chat`, :mod:`.serving_embedding`: the three endpoints on it;
* :mod:`.serving_tokenize`: ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``;
* :mod:`.state_files`: state files inside ``--state-dir``;
* :mod:`.app`: :func:`create_app`, the API-key check, the middleware and the routes.

Endpoints (``/v1/*``, ``/metrics`` and the tokenizer routes need ``Authorization: Bearer KEY`` when an
API key is set):

* ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served (OpenAI list / model objects).
* ``POST /v1/completions``: ``prompt`` is one string or one list of token ids (arrays of prompts are
  refused); ``max_tokens`` defaults to 16 as in OpenAI's API. Sampling fields: ``temperature`` [0, 2],
  ``top_p`` (0, 1], ``top_k``, ``min_p``, ``presence_penalty`` / ``frequency_penalty`` [-2, 2],
  ``penalty_decay``, ``logit_bias`` {"token id": bias in [-100, 100]}, ``stop`` (up to 4 strings),
  ``seed``, ``stream`` (+ ``stream_options.include_usage``), ``n`` (1 only). rwkvkit extras: ``state``
  (start from a state file) and ``save_state`` (write the final state to a state file).
* ``POST /v1/chat/completions``: ``messages`` (system / developer / user / assistant; content a string
  or a list of text parts) become the World chat prompt ``System: ...\\n\\nUser: ...\\n\\nAssistant:``
  (:mod:`rwkvkit.infer.chat_format`; each message normalised: blank lines collapse to one newline, so a
  message cannot start a new turn); generation always stops at ``\\n\\nUser:`` (plus the client's stops)
  and the reply loses the one space the model writes after ``Assistant:``. With ``chat_template`` (``rwkvkit
  serve --chat-template``) the messages go through that Jinja template instead (``tools`` reach it as its
  ``tools``; a render error caused by the request is a 400) and generation stops at its stop strings
  (``--chat-stop``). With ``reasoning_parser="think"`` a reply that opens with ``<think>...</think>`` answers
  that block as ``message.reasoning_content`` (``delta.reasoning_content`` chunks before the ``content``
  ones when streamed); one that never closes it is all ``reasoning_content``, ``content`` null.
  ``max_completion_tokens`` (or ``max_tokens``) defaults to ``--max-tokens-limit``.
* ``POST /v1/embeddings``: one vector per input (a string, a list of strings, a list of token ids or a
  list of such lists). The vector is the last layer's ``ffn_shift`` row of the state after reading the
  input: the layer-normalised input of the last channel mix at the last token (dimension ``n_embd``),
  L2-normalised. Inputs run through the engine with ``max_tokens=0`` (so they share its batching, its
  bounded queue and its prefix cache), at most ``max_batch`` of one request at a time.
* ``POST /tokenize`` (``prompt``, or chat ``messages`` + ``add_generation_prompt``; ``return_token_strs``)
  -> ``{"count", "max_model_len", "tokens", "token_strs"}``; ``POST /detokenize`` (``tokens``) ->
  ``{"prompt"}``; ``GET /tokenizer_info``: as vLLM's, what lm-eval's remote tokenizer reads
  (:mod:`.serving_tokenize`; ``max_model_len`` is ``--max-tokens-limit``: RWKV has no context window).
* ``GET /health`` (never needs the key), ``GET /metrics``: ``engine.stats()`` (waiting, running,
  tokens/s, counters, prefix-cache hits / misses / hit_rate) plus this server's own counters.

Streaming answers are Server-Sent Events, ``data: {json}\\n\\n`` per chunk, flushed as the tokens arrive,
ending with ``data: [DONE]\\n\\n`` (text that has already arrived when a chunk is written goes out in that
chunk). A client that goes away mid-stream (or before a non-streamed answer is ready) has its engine
request cancelled at once, so its slot is freed at the next engine step. A failure after the stream
started is sent as one ``data: {"error": ...}`` event, then ``[DONE]``. On Ctrl-C / SIGTERM ``rwkvkit
serve`` cancels the running requests first, so open streams end with a "shutting down" error instead of
holding up the exit.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON,
wrong types, missing fields and invalid values (FastAPI's 422 is turned into 400; ``param`` is the field
the failed check names, from pydantic's location or from ``RwkvkitError.param``), 401 for a missing or
wrong API key, 404 for an unknown model or state file, 413 for a body over 8 MiB, 429 with
``Retry-After`` when the engine's queue is full, 500 with a generic message for anything unexpected
(logged with its traceback, never sent).
"""

from rwkvkit.errors import RwkvkitError

try:
    import fastapi  # noqa: F401
    import pydantic  # noqa: F401
    import starlette  # noqa: F401
except ImportError as e:  # the optional "serve" extra
    raise RwkvkitError(
        f"rwkvkit serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'rwkvkit[serve]'"
    ) from None

from rwkvkit.infer.server.app import create_app  # noqa: E402
from rwkvkit.infer.server.protocol import (  # noqa: E402
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
)
from rwkvkit.infer.server.serving_chat import build_chat_prompt  # noqa: E402
from rwkvkit.infer.server.serving_embedding import embedding_vector  # noqa: E402

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "build_chat_prompt",
    "create_app",
    "embedding_vector",
]
