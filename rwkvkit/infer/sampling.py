"""Next-token sampling: turn a logits vector (or a batch of them) into token ids.

Two layers: ``sample_logits`` (temperature, top-p, top-k, min-p on one logits vector or a batch), and
``SamplingParams`` (the one sampling type that ``generate``, ``ChatSession`` and the engine take) +
``TokenPenalty`` + ``adjust_logits`` for what a sequence carries on top:
logit bias, banned tokens, and presence / frequency penalties that decay every step as the reference
package's ``alpha_decay`` does (a token's count is multiplied by ``penalty_decay`` each step, then the
new token's count grows by 1; the penalty is ``presence * seen + frequency * count``).

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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from rwkvkit.errors import RwkvkitError, check_int

# Temperatures below this (the smallest normal float32) sample greedily: float32 rounds them to 0.
GREEDY_BELOW = torch.finfo(torch.float32).tiny


def check_sampling_args(temperature: float, top_p: float, top_k: int, min_p: float = 0.0) -> None:
    """Raise RwkvkitError unless temperature >= 0, 0 < top_p <= 1, top_k is an int >= 0, 0 <= min_p <= 1."""
    if not (isinstance(temperature, (int, float)) and temperature >= 0):  # also rejects NaN
        raise RwkvkitError(f"temperature must be >= 0 (0 = greedy), got {temperature}", param="temperature")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise RwkvkitError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    check_int("top_k", top_k, 0, " (0 = no limit)")
    if not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
        raise RwkvkitError(f"min_p must be in [0, 1], got {min_p}", param="min_p")


def candidate_mask(
    logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> torch.Tensor:
    """Which tokens survive top-p, top-k and min-p filtering. logits (B, V) -> bool mask (B, V).

    top-p keeps the smallest set of most likely tokens whose probability sums to at least ``top_p``, plus
    any token tied with the least likely of them (as the reference does: ``probs >= cutoff``). top-k then
    keeps at most the ``top_k`` most likely of those (0 = no limit). min-p keeps only tokens at least
    ``min_p`` times as likely as the most likely one. All three look at the untempered distribution.
    At least one token always survives.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    if not filters(top_p, top_k, min_p, probs.shape[-1]):
        return torch.ones_like(probs, dtype=torch.bool)
    if min_p > 0:
        keep_min_p = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    else:
        keep_min_p = None
    keep = torch.ones_like(probs, dtype=torch.bool)  # (B, V)
    if top_p < 1.0 or 0 < top_k < probs.shape[-1]:
        sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)  # (B, V) each
    if top_p < 1.0:
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # (B, V) exclusive cumsum
        n_nucleus = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
        cutoff = sorted_probs.gather(-1, n_nucleus - 1)  # (B, 1) probability of the last nucleus token
        keep &= probs >= cutoff
    if 0 < top_k < probs.shape[-1]:
        rank_ok = torch.zeros_like(keep)  # (B, V)
        rank_ok.scatter_(-1, sorted_ids[:, :top_k], True)
        keep &= rank_ok
    if keep_min_p is not None:
        keep &= keep_min_p
    return keep


def filters(top_p: float, top_k: int, min_p: float, vocab_size: int) -> bool:
    """Whether top-p / top-k / min-p rule out any token at all (else every token is a candidate)."""
    return top_p < 1.0 or 0 < top_k < vocab_size or min_p > 0


def _tempered(
    batch: torch.Tensor, temperature: float, top_p: float, top_k: int, min_p: float
) -> torch.Tensor:
    """Probabilities (B, V) over the top-p/top-k/min-p candidates of ``batch`` at ``temperature`` > 0."""
    logp = torch.log_softmax(batch, dim=-1)  # (B, V)
    # log of p ** (1 / temperature), shifted so the most likely token is at exactly 0: a tiny temperature
    # then sends the others to -inf instead of everything to -inf (which would make the softmax NaN)
    scores = (logp - logp.amax(dim=-1, keepdim=True)) / temperature
    if filters(top_p, top_k, min_p, batch.shape[-1]):  # (masking nothing would give the same values)
        keep = candidate_mask(batch, top_p, top_k, min_p)  # (B, V)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1)


def unusable_logits(batch: torch.Tensor) -> bool:
    """Whether some row of ``batch`` (B, V) holds NaN or +inf, or is -inf everywhere (nothing to sample)."""
    if bool(torch.isfinite(batch).all()):  # the usual case, in one pass
        return False
    bad = torch.isnan(batch).any() | torch.isposinf(batch).any()
    return bool(bad | torch.isneginf(batch).all(dim=-1).any())


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    min_p: float = 0.0,
) -> int | torch.Tensor:
    """Sample the next token from ``logits`` (V,) -> int, or from a batch (B, V) -> LongTensor (B,).

    Args:
        logits: unnormalised scores, any float dtype, on any device.
        temperature: 0 = greedy argmax; otherwise the kept probabilities are raised to 1 / temperature.
        top_p: nucleus mass in (0, 1]; 1 keeps everything.
        top_k: keep at most this many most likely tokens; 0 = no limit.
        min_p: keep only tokens at least this fraction as likely as the most likely; 0 = off.
        generator: a seeded ``torch.Generator`` for reproducible draws (its device is where the draw
            happens; the probabilities are moved there if needed). None uses torch's global RNG.
    Raises RwkvkitError for out-of-range parameters or logits that are not (V,) / (B, V).
    """
    check_sampling_args(temperature, top_p, top_k, min_p)
    if logits.dim() not in (1, 2) or logits.shape[-1] == 0:
        raise RwkvkitError(f"logits must have shape (V,) or (B, V), got {tuple(logits.shape)}")
    single = logits.dim() == 1
    batch = logits.float().view(1, -1) if single else logits.float()  # (B, V)
    if unusable_logits(batch):
        raise RwkvkitError(
            "logits contain NaN or +inf, or rule out every token (a numerical overflow? try fp32 or bf16)"
        )

    if temperature < GREEDY_BELOW:  # 0, or so small that float32 cannot divide by it
        ids = batch.argmax(dim=-1)  # (B,)
    else:
        probs = _tempered(batch, temperature, top_p, top_k, min_p)  # (B, V)
        if generator is not None and generator.device != probs.device:
            probs = probs.to(generator.device)
        ids = torch.multinomial(probs, num_samples=1, generator=generator).view(-1)  # (B,)
    return int(ids[0]) if single else ids.to(device=logits.device, dtype=torch.long)


def sampling_distribution(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> torch.Tensor:
    """The exact distribution ``sample_logits`` draws from: (V,) -> (V,) or (B, V) -> (B, V) probabilities.

    Greedy (temperature 0) gives a one-hot vector at the argmax.
    """
    check_sampling_args(temperature, top_p, top_k, min_p)
    batch = logits.float().view(-1, logits.shape[-1])  # (B, V)
    if temperature < GREEDY_BELOW:  # 0, or so small that float32 cannot divide by it
        out = torch.zeros_like(batch)
        out.scatter_(-1, batch.argmax(dim=-1, keepdim=True), 1.0)
    else:
        out = _tempered(batch, temperature, top_p, top_k, min_p)
    return out.view(logits.shape)


# ---------------------------------------------------------------------------------------------- requests

MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| <= 2, as the OpenAI API allows
MAX_LOGIT_BIAS = 100.0  # |bias| <= 100, as the OpenAI API allows
DEFAULT_PENALTY_DECAY = 0.996  # the reference package's alpha_decay


@dataclass
class SamplingParams:
    """How one request samples its tokens (see the module docstring). ``check`` validates them."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = DEFAULT_PENALTY_DECAY
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    banned_tokens: Sequence[int] = ()
    seed: int | None = None

    def check(self, vocab_size: int) -> None:
        """Raise RwkvkitError naming the first bad value."""
        check_sampling_args(self.temperature, self.top_p, self.top_k, self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise RwkvkitError(
                    f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}", param=name
                )
        if not (isinstance(self.penalty_decay, (int, float)) and 0 <= self.penalty_decay <= 1):
            raise RwkvkitError(
                f"penalty_decay must be in [0, 1], got {self.penalty_decay}", param="penalty_decay"
            )
        for token, bias in self.logit_bias.items():
            _check_token(token, vocab_size, "logit_bias")
            if not (isinstance(bias, (int, float)) and math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise RwkvkitError(
                    f"logit_bias values must be in [-100, 100], got {bias} for token {token}",
                    param="logit_bias",
                )
        for token in self.banned_tokens:
            _check_token(token, vocab_size, "banned_tokens")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RwkvkitError(f"seed must be an integer, got {self.seed!r}", param="seed")

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def resolve_sampling(
    sampling: SamplingParams | None, defaults: Mapping[str, object], **loose: object
) -> SamplingParams:
    """The SamplingParams of a call that takes either ``sampling=`` or the older loose keyword arguments.

    ``loose`` holds those arguments (temperature=..., top_p=..., ...), None where not given; the given
    ones replace the caller's ``defaults`` (SamplingParams fields). Passing both is an error.
    """
    given = {name: value for name, value in loose.items() if value is not None}
    if sampling is None:
        return SamplingParams(**{**defaults, **given})
    if given:
        raise RwkvkitError(f"pass sampling=SamplingParams(...) or {', '.join(given)}, not both")
    if not isinstance(sampling, SamplingParams):
        raise RwkvkitError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    return sampling


def seeded_generator(seed: int | None) -> torch.Generator | None:
    """A private CPU generator seeded with ``seed`` (the same seed, the same draws), or None (torch's global
    random state) for no seed."""
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _check_token(token: object, vocab_size: int, what: str) -> None:
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
        raise RwkvkitError(
            f"{what}: token id {token!r} is not in the vocabulary [0, {vocab_size})", param=what
        )


class TokenPenalty:
    """A sequence's decaying token counts for presence / frequency penalties (the reference's occurrence)."""

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(vocab_size, device=device)  # (V,) decayed occurrence counts
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # (V,) ever generated

    def update(self, token: int, decay: float) -> None:
        """After sampling ``token``: every count decays, then the token's count grows by one."""
        self.counts.mul_(decay)
        self.counts[token] += 1.0
        self.seen[token] = True


def adjust_logits(logits: torch.Tensor, params: SamplingParams, penalty: TokenPenalty | None) -> torch.Tensor:
    """logits (V,) with the request's bias, bans and penalties applied (a new tensor, float32)."""
    out = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=out.device)
        out[ids] += torch.tensor(list(params.logit_bias.values()), device=out.device, dtype=out.dtype)
    if penalty is not None and params.penalised:
        out -= params.presence_penalty * penalty.seen + params.frequency_penalty * penalty.counts
    if params.banned_tokens:
        out[torch.tensor(list(params.banned_tokens), device=out.device)] = float("-inf")
    return out
