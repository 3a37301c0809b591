"""Next-token sampling: turn a logits vector (or a batch of them) into token ids.

Follows the conventions of the reference ``rwkv`` package (``PIPELINE.sample_logits``): the candidate set
is chosen on the untempered distribution, first by top-p (nucleus), then by top-k, and only then is the
temperature applied to the surviving candidates. Temperature 0 means greedy (argmax).

Differences from the reference, on purpose:
- the work is done in log space (``log_softmax(logits) / temperature``), so a low temperature cannot
  underflow every probability to zero;
- ``top_p == 1`` keeps every token (the reference's float cumsum may never reach 1.0 exactly, which
  silently turns top_p=1 into greedy);
- randomness comes from an optional ``torch.Generator``, so a seed reproduces the same draws.
"""

from __future__ import annotations

import torch

from rwkvkit.errors import RwkvkitError


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
    """Raise RwkvkitError unless temperature >= 0, 0 < top_p <= 1 and top_k is an int >= 0."""
    if not (isinstance(temperature, (int, float)) and temperature >= 0):  # also rejects NaN
        raise RwkvkitError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise RwkvkitError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise RwkvkitError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k}")


def candidate_mask(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Which tokens survive top-p then top-k filtering. logits (B, V) -> bool mask (B, V).

    top-p keeps the smallest set of most likely tokens whose probability sums to at least ``top_p``, plus
    any token tied with the least likely of them (as the reference does: ``probs >= cutoff``). top-k then
    keeps at most the ``top_k`` most likely of those (0 = no limit). At least one token always survives.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)  # (B, V) each
    keep = torch.ones_like(probs, dtype=torch.bool)  # (B, V)
    if top_p < 1.0:
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # (B, V) exclusive cumsum
        n_nucleus = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
        cutoff = sorted_probs.gather(-1, n_nucleus - 1)  # (B, 1) probability of the last nucleus token
        keep &= probs >= cutoff
    if 0 < top_k < probs.shape[-1]:
        rank_ok = torch.zeros_like(keep)  # (B, V)
        rank_ok.scatter_(-1, sorted_ids[:, :top_k], True)
        keep &= rank_ok
    return keep


def _tempered(batch: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Probabilities (B, V) over the top-p/top-k candidates of ``batch`` (B, V) at ``temperature`` > 0."""
    keep = candidate_mask(batch, top_p, top_k)  # (B, V)
    scores = torch.log_softmax(batch, dim=-1) / temperature  # (B, V): log of p ** (1 / temperature)
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> int | torch.Tensor:
    """Sample the next token from ``logits`` (V,) -> int, or from a batch (B, V) -> LongTensor (B,).

    Args:
        logits: unnormalised scores, any float dtype, on any device.
        temperature: 0 = greedy argmax; otherwise the kept probabilities are raised to 1 / temperature.
        top_p: nucleus mass in (0, 1]; 1 keeps everything.
        top_k: keep at most this many most likely tokens; 0 = no limit.
        generator: a seeded ``torch.Generator`` for reproducible draws (its device is where the draw
            happens; the probabilities are moved there if needed). None uses torch's global RNG.
    Raises RwkvkitError for out-of-range parameters or logits that are not (V,) / (B, V).
    """
    check_sampling_args(temperature, top_p, top_k)
    if logits.dim() not in (1, 2) or logits.shape[-1] == 0:
        raise RwkvkitError(f"logits must have shape (V,) or (B, V), got {tuple(logits.shape)}")
    single = logits.dim() == 1
    batch = logits.float().view(1, -1) if single else logits.float()  # (B, V)
    if bool(torch.isnan(batch).any() | torch.isposinf(batch).any() | torch.isneginf(batch).all(dim=-1).any()):
        raise RwkvkitError(
            "logits contain NaN or +inf, or rule out every token (a numerical overflow? try fp32 or bf16)"
        )

    if temperature == 0:
        ids = batch.argmax(dim=-1)  # (B,)
    else:
        probs = _tempered(batch, temperature, top_p, top_k)  # (B, V)
        if generator is not None and generator.device != probs.device:
            probs = probs.to(generator.device)
        ids = torch.multinomial(probs, num_samples=1, generator=generator).view(-1)  # (B,)
    return int(ids[0]) if single else ids.to(device=logits.device, dtype=torch.long)


def sampling_distribution(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
) -> torch.Tensor:
    """The exact distribution ``sample_logits`` draws from: (V,) -> (V,) or (B, V) -> (B, V) probabilities.

    Greedy (temperature 0) gives a one-hot vector at the argmax.
    """
    check_sampling_args(temperature, top_p, top_k)
    batch = logits.float().view(-1, logits.shape[-1])  # (B, V)
    if temperature == 0:
        out = torch.zeros_like(batch)
        out.scatter_(-1, batch.argmax(dim=-1, keepdim=True), 1.0)
    else:
        out = _tempered(batch, temperature, top_p, top_k)
    return out.view(logits.shape)
