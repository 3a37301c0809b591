"""Training data: a text file tokenized once into a flat token array, and reproducible batches from it.

Batches are a pure function of (seed, step): a resumed or repeated run sees exactly the same data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rwkvkit.errors import RwkvkitError


def load_text_tokens(path: str | Path, tokenizer) -> np.ndarray:
    """Tokenize a UTF-8 text file into a 1-D int64 array."""
    path = Path(path)
    if not path.is_file():
        raise RwkvkitError(f"no such data file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RwkvkitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if tokens.size < 2:
        raise RwkvkitError(f"{path} holds too little text to train on ({tokens.size} tokens)")
    return tokens


def sample_batch(
    tokens: np.ndarray, step: int, batch_size: int, ctx_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``ctx_len + 1`` tokens, chosen by (seed, step). Returns inputs and targets (B, T)."""
    if tokens.size <= ctx_len + 1:
        raise RwkvkitError(f"data has {tokens.size} tokens, fewer than ctx_len + 2 = {ctx_len + 2}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - ctx_len - 1, size=batch_size)
    windows = np.stack([tokens[s : s + ctx_len + 1] for s in starts])  # (B, T + 1)
    batch = torch.from_numpy(windows)
    return batch[:, :-1], batch[:, 1:]


def eval_windows(tokens: np.ndarray, ctx_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping windows of ``ctx_len`` (inputs, targets), covering the array once. (W, T)"""
    n = (tokens.size - 1) // ctx_len
    if n == 0:
        raise RwkvkitError(
            f"validation data has {tokens.size} tokens, fewer than ctx_len + 1 = {ctx_len + 1}"
        )
    x = torch.from_numpy(tokens[: n * ctx_len].reshape(n, ctx_len))
    y = torch.from_numpy(tokens[1 : n * ctx_len + 1].reshape(n, ctx_len))
    return x, y
