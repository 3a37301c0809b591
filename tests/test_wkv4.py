"""Tests for the WKV-4 operator (rwkvkit.wkv.wkv4, rwkvkit/wkv/v4/): chunked vs step-by-step reference,
a direct formula, extreme values, carried state, dispatch and validation."""

from __future__ import annotations

import math

import pytest
import torch
from asserts import assert_matches

from rwkvkit.wkv import wkv4
from rwkvkit.wkv.v4 import (
    PP_INIT,
    wkv4_chunked,
    wkv4_log_decay,
    wkv4_reference,
    wkv4_zero_state,
)

NAMES = ["w", "u", "k", "v", "aa", "bb", "pp"]


def make_inputs(B: int, T: int, C: int, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """w, u (C,), k, v (B, T, C), with time_decay spread over RWKV-4's init range [-5, 3]."""
    gen = torch.Generator().manual_seed(seed)
    time_decay = torch.linspace(-5.0, 3.0, C, dtype=torch.float64)
    w = wkv4_log_decay(time_decay)  # decays from ~0.993 down to ~2e-9
    u = torch.randn(C, generator=gen, dtype=torch.float64) * 0.5 + math.log(0.3)
    k = torch.randn(B, T, C, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (w, u, k, v)]


def make_state(B: int, C: int, seed: int = 1, dtype=torch.float32) -> list[torch.Tensor]:
    """A plausible carried state: aa any sign, bb > 0, pp around the scale of k."""
    gen = torch.Generator().manual_seed(seed)
    aa = torch.randn(B, C, generator=gen, dtype=torch.float64)
    bb = torch.rand(B, C, generator=gen, dtype=torch.float64) + 0.5
    pp = torch.randn(B, C, generator=gen, dtype=torch.float64) * 2
    return [x.to(dtype) for x in (aa, bb, pp)]


def continuation(w, u, state, seed: int = 3) -> torch.Tensor:
    """Outputs of 4 more tokens from `state` (reference form): sees the state only as aa e^pp, bb e^pp."""
    B, C = state[0].shape
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, 4, C, generator=gen, dtype=torch.float64).to(state[0].dtype) * 2
    v = torch.randn(B, 4, C, generator=gen, dtype=torch.float64).to(state[0].dtype)
    return wkv4_reference(w, u, k, v, state)[0]


def forward_backward(fn, inputs: list[torch.Tensor], state: list[torch.Tensor] | None, seed: int = 2):
    """y, final state and the gradients of a random loss on y and on the continuation from the state."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    s = None if state is None else [x.detach().clone().requires_grad_() for x in state]
    y, s_out = fn(*leaves, s)
    y_next = continuation(leaves[0], leaves[1], s_out)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    gn = torch.randn(y_next.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    loss = (y * gy).sum() + (y_next * gn).sum()
    grads = torch.autograd.grad(loss, leaves + ([] if s is None else s), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves + (s or []), grads, strict=True)]
    return y.detach(), [x.detach() for x in s_out], y_next.detach(), grads


def normalized(state, pp_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(aa, bb) rescaled to the exponent pp_ref: comparable across implementations."""
    aa, bb, pp = state
    scale = torch.exp(pp - pp_ref)
    return aa * scale, bb * scale


def assert_states_match(s, s_ref, rel: float = 1e-4) -> None:
    aa, bb = normalized(s, s_ref[2])
    assert_matches(aa, s_ref[0], "state aa (normalized)", rel)
    assert_matches(bb, s_ref[1], "state bb (normalized)", rel)
    live = s_ref[2] > -1e30  # pp of channels that saw a token; the rest stay at about -1e38
    torch.testing.assert_close(s[2][live], s_ref[2][live], rtol=rel, atol=rel)


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh-state", "init-state"])
@pytest.mark.parametrize("chunk_size", [8, 16, 64])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
def test_chunked_matches_reference_fp32(T: int, chunk_size: int, with_state: bool) -> None:
    B, C = 2, 24
    inputs = make_inputs(B, T, C, seed=T)
    state = make_state(B, C) if with_state else None
    y_ref, s_ref, n_ref, g_ref = forward_backward(wkv4_reference, inputs, state)
    chunked = lambda *x: wkv4(*x, impl="chunked", chunk_size=chunk_size)  # noqa: E731
    y, s, n, g = forward_backward(chunked, inputs, state)
    assert y.dtype == torch.float32 and all(x.dtype == torch.float32 for x in s)
    assert_matches(y, y_ref, "y")
    assert_states_match(s, s_ref)
    assert_matches(n, n_ref, "continuation from the final state")
    assert len(g) == len(g_ref) == (7 if with_state else 4)
    for name, gx, gx_ref in zip(NAMES, g, g_ref, strict=False):
        assert_matches(gx, gx_ref, f"grad {name}")


def direct_formula(w, u, k, v, state):
    """The doc's un-stabilised formula in float64, the initial state entering as A0 = aa e^pp."""
    aa, bb, pp = state
    B, T, C = k.shape
    y = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):
        num = torch.exp(t * w + pp) * aa + torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(t * w + pp) * bb + torch.exp(u + k[:, t])
        for i in range(t):
            weight = torch.exp((t - 1 - i) * w + k[:, i])
            num = num + weight * v[:, i]
            den = den + weight
        y[:, t] = num / den
    A = torch.exp(T * w + pp) * aa + sum(torch.exp((T - 1 - i) * w + k[:, i]) * v[:, i] for i in range(T))
    Bs = torch.exp(T * w + pp) * bb + sum(torch.exp((T - 1 - i) * w + k[:, i]) for i in range(T))
    return y, A, Bs


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh-state", "init-state"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_direct_formula_fp64(impl: str, with_state: bool) -> None:
    B, T, C = 2, 9, 6
    w, u, k, v = make_inputs(B, T, C, seed=5, dtype=torch.float64)
    w = w.clamp(min=-3.0)  # keep the un-stabilised exponentials in range
    state = (
        make_state(B, C, dtype=torch.float64)
        if with_state
        else list(wkv4_zero_state(B, C, None, torch.float64))
    )
    y, (aa, bb, pp) = wkv4(w, u, k, v, state if with_state else None, impl=impl, chunk_size=4)
    assert y.dtype == torch.float64 and aa.dtype == torch.float64
    y_ref, A, Bs = direct_formula(w, u, k, v, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aa * torch.exp(pp), A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bb * torch.exp(pp), Bs, rtol=1e-12, atol=1e-12)


def extreme_inputs(B: int, T: int, C: int, dtype=torch.float32) -> list[torch.Tensor]:
    """k up to +-30; decays of ~1e-6 and ~1 - 1e-6 (and e^{-1e-12}-close to 1) on alternating channels."""
    gen = torch.Generator().manual_seed(7)
    time_decay = torch.tensor([math.log(-math.log(1e-6)), math.log(1e-6), -28.0, 0.0], dtype=torch.float64)
    w = wkv4_log_decay(time_decay.repeat(C // 4))
    u = torch.randn(C, generator=gen, dtype=torch.float64) * 3
    k = (torch.rand(B, T, C, generator=gen, dtype=torch.float64) * 2 - 1) * 30
    k[:, ::7] = 30.0
    k[:, 3::11] = -30.0
    v = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (w, u, k, v)]


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh-state", "init-state"])
def test_extreme_values(with_state: bool) -> None:
    B, T, C = 2, 70, 16
    inputs = extreme_inputs(B, T, C)
    state = make_state(B, C) if with_state else None
    if state is not None:
        state[2] = state[2] * 15  # pp far from k as well
    # float64 ground truth: both float64 forms agree to rounding
    inputs64 = [x.double() for x in inputs]
    state64 = None if state is None else [x.double() for x in state]
    y64, s64, n64, g64 = forward_backward(wkv4_reference, inputs64, state64)
    y64c, s64c, n64c, g64c = forward_backward(lambda *x: wkv4_chunked(*x, chunk_size=16), inputs64, state64)
    assert_matches(y64c, y64, "y fp64", 1e-10)
    assert_states_match(s64c, s64, 1e-10)
    for name, gx, gx_ref in zip(NAMES, g64c, g64, strict=False):
        assert_matches(gx, gx_ref, f"grad {name} fp64", 1e-9)
    # float32: finite, and close to the float64 truth. The chunked form is the more accurate one here
    # (~3e-7); the reference loses ~5e-6 to pp + w rounding when w ~ -1e-6 and pp ~ 30.
    y_r, s_r, n_r, g_r = forward_backward(wkv4_reference, inputs, state)
    assert_matches(y_r.double(), y64, "reference y fp32", 1e-4)
    for chunk_size in (8, 64):
        chunked = lambda *x: wkv4_chunked(*x, chunk_size=chunk_size)  # noqa: B023, E731
        y, s, n, g = forward_backward(chunked, inputs, state)
        for x in [y, *s, n, *g]:
            assert torch.isfinite(x).all()
        assert_matches(y.double(), y64, "y fp32", 1e-5)
        assert_states_match([x.double() for x in s], s64, 1e-5)
        assert_matches(n.double(), n64, "continuation fp32", 1e-5)
        for name, gx, gx_ref in zip(NAMES, g, g64, strict=False):
            assert_matches(gx.double(), gx_ref, f"grad {name} fp32", 1e-5)
        # and the two fp32 forms agree with each other
        assert_matches(y, y_r, "y chunked vs reference fp32")
        assert_states_match(s, s_r)
        for name, gx, gx_ref in zip(NAMES, g, g_r, strict=False):
            assert_matches(gx, gx_ref, f"grad {name} chunked vs reference fp32")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_split_sequence_equals_one_call(impl: str) -> None:
    B, T, C = 2, 53, 12
    w, u, k, v = make_inputs(B, T, C, seed=11)
    y_all, s_all = wkv4(w, u, k, v, impl=impl, chunk_size=8)
    state = None
    ys = []
    for lo, hi in ((0, 1), (1, 10), (10, 33), (33, 53)):
        y, state = wkv4(w, u, k[:, lo:hi], v[:, lo:hi], state, impl=impl, chunk_size=8)
        ys.append(y)
    assert_matches(torch.cat(ys, dim=1), y_all, "y")
    assert_states_match(state, s_all)
    # the state may also be passed as one (3, B, C) tensor
    y2, _ = wkv4(w, u, k[:, 10:], v[:, 10:], torch.stack(wkv4(w, u, k[:, :10], v[:, :10])[1]), impl=impl)
    assert_matches(y2, y_all[:, 10:], "y from a stacked state")


def test_zero_state_and_dispatch() -> None:
    aa, bb, pp = wkv4_zero_state(2, 5, "cpu")
    assert aa.shape == bb.shape == pp.shape == (2, 5) and aa.dtype == torch.float32
    assert (aa == 0).all() and (bb == 0).all() and (pp == PP_INIT).all()
    w, u, k, v = make_inputs(1, 3, 5)
    y_none, s_none = wkv4(w, u, k, v)
    y_zero, s_zero = wkv4(w, u, k, v, wkv4_zero_state(1, 5))
    assert torch.equal(y_none, y_zero) and all(torch.equal(a, b) for a, b in zip(s_none, s_zero, strict=True))
    # auto: the reference for T <= 3 (bit-identical)
    assert torch.equal(y_none, wkv4(w, u, k, v, impl="reference")[0])
    w, u, k, v = make_inputs(1, 40, 5)
    # without gradients the step form is the faster one at any T; with them, chunked for T > 3
    assert torch.equal(wkv4(w, u, k, v)[0], wkv4(w, u, k, v, impl="reference")[0])
    k.requires_grad_()
    assert torch.equal(wkv4(w, u, k, v)[0], wkv4(w, u, k, v, impl="chunked")[0])
    with torch.no_grad():
        assert torch.equal(wkv4(w, u, k, v)[0], wkv4(w, u, k, v, impl="reference")[0])
    # bf16 inputs: y in k's dtype, the state in float32
    y, s = wkv4(w, u, k.bfloat16(), v.bfloat16())
    assert y.dtype == torch.bfloat16 and all(x.dtype == torch.float32 for x in s)
    # T = 0 returns the state unchanged
    y, s = wkv4(w, u, k[:, :0], v[:, :0], impl="chunked")
    assert y.shape == (1, 0, 5) and (s[2] == PP_INIT).all()


def test_validation_errors() -> None:
    w, u, k, v = make_inputs(2, 4, 5)
    with pytest.raises(ValueError, match="k must have shape"):
        wkv4(w, u, k[0], v[0])
    with pytest.raises(ValueError, match="v has shape"):
        wkv4(w, u, k, v[:, :3])
    with pytest.raises(ValueError, match=r"w has shape .* expected \(C,\)"):
        wkv4(w[None, None], u, k, v)
    with pytest.raises(ValueError, match="u has shape"):
        wkv4(w, u[:4], k, v)
    with pytest.raises(ValueError, match="floating dtype"):
        wkv4(w, u, k.long(), v)
    with pytest.raises(ValueError, match="state aa has shape"):
        wkv4(w, u, k, v, wkv4_zero_state(1, 5))
    with pytest.raises(ValueError, match="state tensor has shape"):
        wkv4(w, u, k, v, torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="state must be"):
        wkv4(w, u, k, v, wkv4_zero_state(2, 5)[:2])
    with pytest.raises(ValueError, match="unknown impl"):
        wkv4(w, u, k, v, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        wkv4(w, u, k, v, chunk_size=0)
