"""Tests for the RWKV-5.2/6 WKV operator (rwkvkit.wkv.wkv6, rwkvkit/wkv/v6/): chunked vs step-by-step
reference."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.wkv import wkv6
from rwkvkit.wkv.v6 import wkv6_reference

RTOL = 1e-4  # norm-based relative tolerance, fp32


def make_inputs(
    B: int, T: int, H: int, N: int, seed: int = 0, dtype=torch.float32
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[r, w, k, v] (B, T, H, N) with a v6-like per-token log-decay, and u (H, N)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    w = -torch.exp(randn(B, T, H, N) - 1.0)  # log-decay <= 0, spread over several decades
    xs = [randn(B, T, H, N), w, randn(B, T, H, N) * 0.5, randn(B, T, H, N)]
    return [x.to(dtype) for x in xs], randn(H, N).to(dtype)


def make_state(B: int, H: int, N: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, N, generator=gen, dtype=torch.float64) * 0.5).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def forward_backward(inputs, u, state, **kw):
    """y, final state and gradients of a fixed random loss w.r.t. r, w, k, v, u (and the state)."""
    leaves = [x.detach().clone().requires_grad_() for x in [*inputs, u]]
    s = None if state is None else state.detach().clone().requires_grad_()
    y, s_out = wkv6(*leaves, s, **kw)
    gen = torch.Generator().manual_seed(3)
    gy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    gs = torch.randn(s_out.shape, generator=gen, dtype=s_out.dtype)
    ((y * gy).sum() + (s_out * gs).sum()).backward()
    grads = [x.grad for x in leaves] + ([] if s is None else [s.grad])
    return y.detach(), s_out.detach(), grads


def assert_match(inputs, u, state, chunk_size: int | None = None) -> None:
    y_ref, s_ref, g_ref = forward_backward(inputs, u, state, impl="reference")
    y, s, g = forward_backward(inputs, u, state, impl="chunked", chunk_size=chunk_size)
    assert rel(y, y_ref) < RTOL
    assert rel(s, s_ref) < RTOL
    for name, a, b in zip(["r", "w", "k", "v", "u", "state"], g, g_ref, strict=False):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < RTOL, name


@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
@pytest.mark.parametrize("chunk_size", [8, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(T: int, chunk_size: int, with_state: bool) -> None:
    B, H, N = 2, 2, 8
    inputs, u = make_inputs(B, T, H, N, seed=T)
    state = make_state(B, H, N) if with_state else None
    assert_match(inputs, u, state, chunk_size)


def test_constant_decay_v52() -> None:
    """v5.2: one log-decay per (head, channel), broadcast over B and T (an expanded view)."""
    B, T, H, N = 2, 50, 3, 8
    (r, _, k, v), u = make_inputs(B, T, H, N, seed=5)
    time_decay = torch.linspace(-6.0, -1.0, H * N).view(H, N)
    w = (-torch.exp(time_decay)).expand(B, T, H, N)
    assert_match([r, w, k, v], u, make_state(B, H, N), chunk_size=16)


def test_reference_matches_elementwise_loop_float64() -> None:
    """The reference against a plain-Python loop of the element-wise formula (S as [value, key])."""
    B, T, H, N = 2, 6, 2, 3
    (r, w, k, v), u = make_inputs(B, T, H, N, seed=7, dtype=torch.float64)
    state = make_state(B, H, N, dtype=torch.float64)
    y, s = wkv6_reference(r, w, k, v, u, state)
    assert y.dtype == torch.float64 and s.dtype == torch.float64

    R, W, K, V, U, S0 = (x.tolist() for x in (r, w, k, v, u, state))
    for b in range(B):
        for h in range(H):
            S = [row[:] for row in S0[b][h]]  # S[i = value][j = key]
            for t in range(T):
                rt, wt, kt, vt, uh = R[b][t][h], W[b][t][h], K[b][t][h], V[b][t][h], U[h]
                for i in range(N):
                    yi = sum(rt[j] * (uh[j] * kt[j] * vt[i] + S[i][j]) for j in range(N))
                    assert abs(yi - float(y[b, t, h, i])) < 1e-12
                S = [[torch.e ** wt[j] * S[i][j] + vt[i] * kt[j] for j in range(N)] for i in range(N)]
            assert torch.allclose(s[b, h], torch.tensor(S, dtype=torch.float64), rtol=0, atol=1e-12)
    # the chunked form agrees in float64 as well
    y_c, s_c = wkv6(r, w, k, v, u, state, impl="chunked", chunk_size=4)
    assert rel(y_c, y) < 1e-12 and rel(s_c, s) < 1e-12


@pytest.mark.parametrize("w_value", [-20.0, -3.0, -1e-6, "mixed"])  # -3: shorter chunks, one matmul
def test_extreme_decays(w_value) -> None:
    """Decays near 0 (w = -20) and near 1 (w = -1e-6): finite and matching, gradients included."""
    B, T, H, N = 1, 70, 2, 8
    (r, w, k, v), u = make_inputs(B, T, H, N, seed=11)
    if w_value == "mixed":  # per channel/time a mix of both extremes and ordinary values
        choice = torch.randint(0, 3, w.shape, generator=torch.Generator().manual_seed(0))
        w = torch.where(choice == 0, -20.0, torch.where(choice == 1, -1e-6, w))
    else:
        w = torch.full_like(w, w_value)
    assert_match([r, w, k, v], u, make_state(B, H, N), chunk_size=64)


def test_split_sequence_equals_one_call() -> None:
    B, T, H, N = 2, 90, 2, 8
    (r, w, k, v), u = make_inputs(B, T, H, N, seed=13)
    state = make_state(B, H, N)
    y_full, s_full = wkv6(r, w, k, v, u, state, impl="chunked")
    s = state
    parts = []
    for lo, hi in [(0, 37), (37, 38), (38, 90)]:  # the 1-token piece goes through auto -> reference
        y_part, s = wkv6(r[:, lo:hi], w[:, lo:hi], k[:, lo:hi], v[:, lo:hi], u, s)
        parts.append(y_part)
    assert rel(torch.cat(parts, dim=1), y_full) < RTOL
    assert rel(s, s_full) < RTOL


def test_dtypes_and_empty_sequence() -> None:
    (r, w, k, v), u = make_inputs(1, 20, 2, 4, dtype=torch.bfloat16)
    y, s = wkv6(r, w, k, v, u)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y0, s0 = wkv6(r[:, :0], w[:, :0], k[:, :0], v[:, :0], u, impl="chunked")
    assert y0.shape == (1, 0, 2, 4) and s0.shape == (1, 2, 4, 4) and not s0.any()


def test_validation_errors() -> None:
    (r, w, k, v), u = make_inputs(2, 5, 2, 4)
    with pytest.raises(ValueError, match="shape"):
        wkv6(r, w[:, :3], k, v, u)
    with pytest.raises(ValueError, match=r"\(B, T, H, N\)"):
        wkv6(r[0], w[0], k[0], v[0], u)
    with pytest.raises(ValueError, match="u has shape"):
        wkv6(r, w, k, v, u[:, :2])
    with pytest.raises(ValueError, match="state has shape"):
        wkv6(r, w, k, v, u, torch.zeros(2, 2, 4, 3))
    with pytest.raises(ValueError, match="unknown impl"):
        wkv6(r, w, k, v, u, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        wkv6(r, w, k, v, u, chunk_size=0)
    with pytest.raises(ValueError, match="floating"):
        wkv6(r, w, k.long(), v, u)
