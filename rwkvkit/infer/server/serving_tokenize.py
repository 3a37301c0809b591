"""The tokenizer endpoints, on the pattern of vLLM's: ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info`` (what lm-evaluation-harness' remote tokenizer, ``tokenizer_backend=remote``, reads).

* ``/tokenize`` encodes exactly as the generation endpoints do: a ``prompt`` as ``/v1/completions`` reads a
  string prompt, ``messages`` as ``/v1/chat/completions`` builds its prompt (:func:`build_chat_prompt`;
  ``add_generation_prompt: false`` leaves out the closing ``\\n\\nAssistant:``). RWKV adds no special
  tokens, so ``add_special_tokens`` changes nothing; the literal text ``<|endoftext|>`` is ordinary text.
  ``token_strs`` (``return_token_strs``) holds each token's bytes as a latin-1 string (one character per
  byte, so a token holding part of a UTF-8 character is exact: ``s.encode("latin-1")`` gives its bytes)
  and ``<|endoftext|>`` for the end-of-text id: what vLLM returns when it serves rwkvkit's Hugging Face
  World tokenizer (its ``convert_ids_to_tokens``).
* ``/detokenize`` decodes as the generation endpoints' text: bytes that are not valid UTF-8 (a character
  cut off) become U+FFFD, the end-of-text id decodes to nothing; an id outside the model's vocabulary is
  a 400 naming ``tokens``.
* ``max_model_len``: RWKV has no context window, and the server takes prompts of any length (up to the
  8 MiB body); the one length limit it enforces is ``--max-tokens-limit`` on the tokens generated per
  request, reported as ``max_model_len`` so that a client sizing ``max_tokens`` as
  ``max_model_len - count`` never asks for more than the server allows.
* ``/tokenizer_info``: the tokenizer's class, vocabulary size, ``eos_token`` / ``bos_token`` /
  ``pad_token`` (the end-of-text token, as ``token_strs`` writes it) and their id (rwkvkit extras
  ``eos_token_id``, ``bos_token_id``, ``pad_token_id``), ``model_max_length`` and no ``chat_template``
  (the World chat format normalises messages in a way a Jinja template cannot).
"""

from __future__ import annotations

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_format import ASSISTANT_PROMPT, TURN_SEPARATOR
from rwkvkit.infer.server.protocol import ApiError, DetokenizeRequest, TokenizeRequest
from rwkvkit.infer.server.serving import Serving
from rwkvkit.infer.server.serving_chat import build_chat_prompt

EOT_TEXT = "<|endoftext|>"


class TokenizeServing(Serving):
    """``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` with the engine's tokenizer."""

    def check_optional_model(self, model: str | None) -> None:
        if model is not None:
            self.context.check_model(model)

    def token_str(self, token: int) -> str:
        """One token as a string: its bytes as latin-1, or ``<|endoftext|>`` for an empty end of text."""
        data = self.engine.tokenizer.decode_bytes([token])
        if token == self.engine.tokenizer.eot_id and not data:
            return EOT_TEXT
        return data.decode("latin-1")

    def prompt_text(self, body: TokenizeRequest) -> str:
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.prompt is not None:
            return body.prompt
        prompt = build_chat_prompt(body.messages)
        if not body.add_generation_prompt:
            prompt = prompt.removesuffix(TURN_SEPARATOR + ASSISTANT_PROMPT)
        return prompt

    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_optional_model(body.model)
        param = "prompt" if body.prompt is not None else "messages"
        tokens = self.encode(self.prompt_text(body), param)
        strs = [self.token_str(t) for t in tokens] if body.return_token_strs else None
        return {
            "count": len(tokens),
            "max_model_len": self.context.max_tokens_limit,
            "tokens": tokens,
            "token_strs": strs,
        }

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_optional_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(
                400,
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                param="tokens",
            )
        try:
            text = self.engine.tokenizer.decode(body.tokens)
        except RwkvkitError as e:  # an id the tokenizer has no bytes for
            raise ApiError(400, str(e), param="tokens") from None
        return {"prompt": text}

    def tokenizer_info(self) -> dict:
        tokenizer = self.engine.tokenizer
        eot = tokenizer.eot_id
        eot_text = self.token_str(eot)
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "name": getattr(tokenizer, "name", None),
            "vocab_size": tokenizer.vocab_size,
            "model_max_length": self.context.max_tokens_limit,
            "eos_token": eot_text,
            "bos_token": eot_text,
            "pad_token": eot_text,
            "eos_token_id": eot,
            "bos_token_id": eot,
            "pad_token_id": eot,
            "add_bos_token": False,
            "add_eos_token": False,
            "chat_template": None,
        }
