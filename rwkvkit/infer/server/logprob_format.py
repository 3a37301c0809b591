"""Log-probabilities in the API's shapes: the completions form (``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset``) and the chat form (``content``: one object per token with its bytes).

Token strings: a token whose bytes are valid UTF-8 is shown as that text; one that holds part of a
character (World tokens are byte strings) as ``bytes:\\xe4\\xbd`` (OpenAI's form); the end-of-text token
as ``<|endoftext|>``. ``text_offset`` counts characters from the start of the choice's text (the echoed
prompt included), a character belonging to the token where its first byte is.
"""

from __future__ import annotations

from rwkvkit.infer.logprobs import TokenLogprob

END_OF_TEXT = "<|endoftext|>"


def token_bytes(tokenizer, token: int) -> bytes:
    return tokenizer.decode_bytes([token])


def token_text(tokenizer, token: int) -> str:
    """The string a token is shown as (see the module docstring)."""
    raw = token_bytes(tokenizer, token)
    if token == getattr(tokenizer, "eot_id", None) and raw in (b"", b"\x00"):
        return END_OF_TEXT
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _characters_started(raw: bytes) -> int:
    """How many UTF-8 characters start in ``raw`` (bytes that are not continuation bytes)."""
    return sum(1 for b in raw if b & 0xC0 != 0x80)


class CompletionLogprobs:
    """The completions form for one choice, chunk by chunk (``text_offset`` runs on across calls)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.offset = 0

    def format(self, tokens: list[int], entries: list[TokenLogprob | None]) -> dict:
        """``tokens`` with their entries (None: no log-probability, the first prompt token)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(tokens, entries, strict=True):
            text = token_text(self.tokenizer, token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += _characters_started(token_bytes(self.tokenizer, token))
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {token_text(self.tokenizer, t): lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)  # the chosen token is always listed (as OpenAI does)
            out["token_logprobs"].append(entry.logprob)
            out["top_logprobs"].append(top)
        return out

    @staticmethod
    def merge(parts: list[dict]) -> dict:
        """One object from several ``format`` results, in order."""
        keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        return {key: [x for part in parts for x in part[key]] for key in keys}


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """The chat form of generated tokens' entries."""

    def item(token: int, logprob: float) -> dict:
        return {
            "token": token_text(tokenizer, token),
            "logprob": logprob,
            "bytes": list(token_bytes(tokenizer, token)),
        }

    content = [
        {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
    ]
    return {"content": content, "refusal": None}
