"""Tests for rwkvkit.infer.sampling: greedy, top-p, top-k, temperature, seeding and validation."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.sampling import sample_logits, sampling_distribution

# A hand-made distribution, already sorted: p = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04].
PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
LOGITS = torch.tensor([math.log(p) for p in PROBS]) + 3.0  # the offset must not matter

# Chi-square critical values at significance 0.001, by degrees of freedom.
CHI2_CRIT_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def _hand(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights] + [0.0] * (len(PROBS) - len(weights))


# (temperature, top_p, top_k) -> the renormalised distribution, computed by hand from PROBS.
# Candidates are picked on the untempered p (top-p, then top-k); then p ** (1 / T) is renormalised.
HAND_CASES = [
    ((1.0, 1.0, 0), PROBS),
    ((1.0, 0.7, 0), _hand([0.4, 0.25, 0.15])),  # 0.4 + 0.25 < 0.7, + 0.15 reaches it: 3 tokens
    ((0.5, 0.7, 0), _hand([0.4**2, 0.25**2, 0.15**2])),  # temperature applied after top-p
    ((2.0, 1.0, 2), _hand([0.4**0.5, 0.25**0.5])),
    ((1.0, 0.7, 2), _hand([0.4, 0.25])),  # top-k after top-p
    ((1.0, 0.5, 4), _hand([0.4, 0.25])),  # top-p is the tighter one
    ((1.5, 0.95, 0), _hand([p ** (1 / 1.5) for p in PROBS[:5]])),
]


def _chi_square(counts: torch.Tensor, expected_probs: list[float], n: int) -> tuple[float, int]:
    stat, cells = 0.0, 0
    for c, p in zip(counts.tolist(), expected_probs, strict=True):
        if p > 0:
            stat += (c - n * p) ** 2 / (n * p)
            cells += 1
    return stat, cells - 1


@pytest.mark.parametrize("params,expected", HAND_CASES)
def test_distribution_matches_hand_computation(params, expected):
    temperature, top_p, top_k = params
    dist = sampling_distribution(LOGITS, temperature, top_p, top_k)
    torch.testing.assert_close(dist, torch.tensor(expected), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("params,expected", HAND_CASES)
def test_empirical_distribution_matches(params, expected):
    temperature, top_p, top_k = params
    n = 10000
    gen = torch.Generator().manual_seed(1234)
    draws = sample_logits(LOGITS.expand(n, -1), temperature, top_p, top_k, generator=gen)  # (n,)
    assert draws.shape == (n,) and draws.dtype == torch.long
    counts = torch.bincount(draws, minlength=len(PROBS))
    # Tokens outside the candidate set never appear.
    for token, p in enumerate(expected):
        if p == 0:
            assert counts[token] == 0, f"token {token} is outside top-p/top-k but was drawn"
    stat, dof = _chi_square(counts, expected, n)
    if dof > 0:
        assert stat < CHI2_CRIT_001[dof], f"chi-square {stat:.1f} with {dof} dof; counts {counts.tolist()}"


def test_empirical_distribution_single_vector_path():
    gen = torch.Generator().manual_seed(7)
    expected = _hand([0.4, 0.25, 0.15])
    n = 3000
    counts = torch.zeros(len(PROBS))
    for _ in range(n):
        counts[sample_logits(LOGITS, 1.0, 0.7, 0, generator=gen)] += 1
    assert counts[3:].sum() == 0
    stat, dof = _chi_square(counts, expected, n)
    assert stat < CHI2_CRIT_001[dof]


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 1000)
    for row in logits:
        assert sample_logits(row, temperature=0) == int(row.argmax())
        # greedy ignores top_p / top_k
        assert sample_logits(row, temperature=0, top_p=0.3, top_k=7) == int(row.argmax())
    assert torch.equal(sample_logits(logits, temperature=0), logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 3.0, 100.0])
def test_top_k_1_is_greedy(temperature):
    torch.manual_seed(1)
    logits = torch.randn(64, 500)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_logits(logits, temperature, top_k=1, generator=gen), logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_tiny_top_p_is_greedy(temperature):
    torch.manual_seed(2)
    logits = torch.randn(64, 500)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_logits(logits, temperature, top_p=1e-6, generator=gen), logits.argmax(dim=-1))


def test_top_p_keeps_ties_at_the_cutoff():
    dist = sampling_distribution(torch.tensor([1.0, 1.0, 0.0]), 1.0, top_p=1e-3)
    torch.testing.assert_close(dist, torch.tensor([0.5, 0.5, 0.0]))


def test_top_p_one_keeps_every_token():
    # With a large vocabulary the float32 cumulative sum may stop short of 1.0; top_p=1 must not turn greedy.
    torch.manual_seed(3)
    logits = torch.randn(65536)
    dist = sampling_distribution(logits, 1.0, top_p=1.0)
    torch.testing.assert_close(dist, torch.softmax(logits, dim=-1))
    assert (dist > 0).all()


def test_top_k_larger_than_vocab_is_no_limit():
    dist = sampling_distribution(LOGITS, 1.0, top_k=100)
    torch.testing.assert_close(dist, torch.tensor(PROBS))


def test_low_temperature_does_not_underflow():
    torch.manual_seed(4)
    logits = torch.randn(65536) * 0.1
    gen = torch.Generator().manual_seed(0)
    assert sample_logits(logits, temperature=1e-3, generator=gen) == int(logits.argmax())


def test_seed_reproducibility():
    torch.manual_seed(5)
    logits = torch.randn(200)

    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [sample_logits(logits, 1.0, 0.9, 0, generator=gen) for _ in range(50)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)


def test_output_types_and_low_precision_input():
    logits = LOGITS.to(torch.bfloat16)
    assert isinstance(sample_logits(logits, temperature=0), int)
    gen = torch.Generator().manual_seed(0)
    out = sample_logits(logits.expand(3, -1), 0.8, 0.9, 3, generator=gen)
    assert out.shape == (3,) and out.dtype == torch.long


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.5},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": -0.1},
        {"top_k": -1},
        {"top_k": 2.5},
    ],
)
def test_bad_parameters_raise(kwargs):
    with pytest.raises(RwkvkitError):
        sample_logits(LOGITS, **kwargs)


def test_bad_logits_raise():
    with pytest.raises(RwkvkitError, match="shape"):
        sample_logits(torch.zeros(2, 3, 4))
    with pytest.raises(RwkvkitError, match="NaN"):
        sample_logits(torch.tensor([0.0, float("nan")]))
    with pytest.raises(RwkvkitError, match="NaN"):
        sample_logits(torch.full((4,), float("-inf")))


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30])
def test_a_tiny_temperature_is_greedy_not_an_error(temperature):
    """Dividing log-probabilities by a tiny temperature must not turn them all into -inf (NaN softmax)."""
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(1))
    ids = sample_logits(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_unfiltered_sampling_draws_from_the_tempered_softmax(temperature):
    """top_p=1, top_k=0 (or >= V), min_p=0 skip the candidate mask: the distribution is then
    softmax(logits / temperature), and a seeded draw is torch.multinomial's on it."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 3
    expected = torch.softmax(logits / temperature, dim=-1)
    for top_k in (0, 50, 80):
        got = sampling_distribution(logits, temperature, 1.0, top_k)
        assert torch.allclose(got, expected, atol=1e-6)
    ids = sample_logits(logits, temperature, generator=torch.Generator().manual_seed(9))
    ref = torch.multinomial(expected, 1, generator=torch.Generator().manual_seed(9)).view(-1)
    assert ids.tolist() == ref.tolist()
