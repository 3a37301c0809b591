"""Tests for the WKV-7 operator (rwkvkit.wkv): chunked vs step-by-step reference, dispatch, validation."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from asserts import assert_matches

import rwkvkit.wkv as wkv
from rwkvkit.wkv import IMPLEMENTATIONS, wkv7
from rwkvkit.wkv.v7 import wkv7_chunked, wkv7_reference

W_MIN = -math.exp(-0.5)  # the strongest log-decay RWKV-7 produces, -0.6065...


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """r, w, k, v, a, b (B, T, H, N) distributed as the RWKV-7 model produces them."""
    gen = torch.Generator().manual_seed(seed)

    def randn() -> torch.Tensor:
        return torch.randn(B, T, H, N, generator=gen, dtype=torch.float64)

    w = W_MIN * torch.sigmoid(randn())  # log-decay in [-0.6066, 0]
    kk = F.normalize(randn(), dim=-1)  # per-head L2 normalized
    xs = [randn(), w, randn() * 0.5, randn(), -kk, kk * torch.sigmoid(randn())]
    return [x.to(dtype) for x in xs]


def make_state(B: int, H: int, N: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, N, generator=gen, dtype=torch.float64) * 0.5).to(dtype)


def forward_backward(fn, inputs: list[torch.Tensor], state: torch.Tensor | None, seed: int = 2):
    """y, final state and the gradients of a fixed random loss w.r.t. every input (and the state)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    s = None if state is None else state.detach().clone().requires_grad_()
    y, s_out = fn(*leaves, s)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s_out.shape, generator=gen, dtype=torch.float64).to(s_out.dtype)
    loss = (y * gy).sum() + (s_out * gs).sum()
    grads = torch.autograd.grad(loss, leaves + ([] if s is None else [s]))
    return y.detach(), s_out.detach(), list(grads)


NAMES = ["r", "w", "k", "v", "a", "b", "state"]


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("chunk_size", [8, 16, 64])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
def test_chunked_matches_reference_fp32(T: int, chunk_size: int, with_state: bool) -> None:
    torch.manual_seed(0)
    B, H, N = 2, 3, 16
    inputs = make_inputs(B, T, H, N, seed=T)
    state = make_state(B, H, N) if with_state else None
    y_ref, s_ref, g_ref = forward_backward(wkv7_reference, inputs, state)
    y, s, g = forward_backward(lambda *x: wkv7(*x, impl="chunked", chunk_size=chunk_size), inputs, state)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert_matches(y, y_ref, "y")
    assert_matches(s, s_ref, "final state")
    assert len(g) == len(g_ref) == (7 if with_state else 6)
    for name, gx, gx_ref in zip(NAMES[: len(g)], g, g_ref, strict=True):
        assert_matches(gx, gx_ref, f"grad {name}")


@pytest.mark.parametrize("chunk_size", [32, 64])
def test_chunked_matches_reference_full_head_size(chunk_size: int) -> None:
    """N = 64 as in real models, with the strongest v7 decay on part of the channels."""
    B, T, H, N = 1, 130, 2, 64
    inputs = make_inputs(B, T, H, N, seed=3)
    inputs[1][..., : N // 4] = W_MIN  # worst case for the chunked exponents
    state = make_state(B, H, N)
    y_ref, s_ref, g_ref = forward_backward(wkv7_reference, inputs, state)
    y, s, g = forward_backward(lambda *x: wkv7(*x, impl="chunked", chunk_size=chunk_size), inputs, state)
    assert_matches(y, y_ref, "y")
    assert_matches(s, s_ref, "final state")
    for name, gx, gx_ref in zip(NAMES[: len(g)], g, g_ref, strict=True):
        assert_matches(gx, gx_ref, f"grad {name}")


def elementwise_recurrence(r, w, k, v, a, b, state):
    """The contract's element-wise formula with Python loops, float64: independent of both impls."""
    B, T, H, N = r.shape
    S = state.clone()  # (B, H, V, K)
    y = torch.zeros(B, T, H, N, dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            for t in range(T):
                old = S[bi, h].clone()
                for i in range(N):
                    sa = sum(old[i, l] * a[bi, t, h, l] for l in range(N))
                    for j in range(N):
                        S[bi, h, i, j] = (
                            old[i, j] * math.exp(w[bi, t, h, j])
                            + sa * b[bi, t, h, j]
                            + v[bi, t, h, i] * k[bi, t, h, j]
                        )
                for i in range(N):
                    y[bi, t, h, i] = sum(S[bi, h, i, j] * r[bi, t, h, j] for j in range(N))
    return y, S


def test_float64_tiny_case_matches_elementwise_formula() -> None:
    """Both implementations in float64 against a hand-rolled loop of the element-wise formula."""
    B, T, H, N = 1, 7, 2, 3
    inputs = make_inputs(B, T, H, N, seed=5, dtype=torch.float64)
    state = make_state(B, H, N, dtype=torch.float64)
    y_hand, s_hand = elementwise_recurrence(*inputs, state)
    for fn in (wkv7_reference, lambda *x: wkv7_chunked(*x, chunk_size=3)):
        y, s = fn(*inputs, state)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, y_hand, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s, s_hand, rtol=1e-12, atol=1e-12)


def test_float64_chunked_equals_reference_with_gradients() -> None:
    """In float64 the chunked algebra must agree with the reference to rounding (~1e-13)."""
    B, T, H, N = 2, 45, 2, 8
    inputs = make_inputs(B, T, H, N, seed=6, dtype=torch.float64)
    state = make_state(B, H, N, dtype=torch.float64)
    y_ref, s_ref, g_ref = forward_backward(wkv7_reference, inputs, state)
    y, s, g = forward_backward(lambda *x: wkv7_chunked(*x, chunk_size=16), inputs, state)
    assert_matches(y, y_ref, "y", rel=1e-12)
    assert_matches(s, s_ref, "final state", rel=1e-12)
    for name, gx, gx_ref in zip(NAMES[: len(g)], g, g_ref, strict=True):
        assert_matches(gx, gx_ref, f"grad {name}", rel=1e-12)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_split_sequence_equals_one_call(impl: str) -> None:
    B, T, H, N = 2, 41, 2, 16
    inputs = make_inputs(B, T, H, N, seed=7)
    state = make_state(B, H, N)
    y_full, s_full = wkv7(*inputs, state, impl=impl, chunk_size=8)
    y1, s1 = wkv7(*(x[:, :19] for x in inputs), state, impl=impl, chunk_size=8)
    y2, s2 = wkv7(*(x[:, 19:] for x in inputs), s1, impl=impl, chunk_size=8)
    assert_matches(torch.cat([y1, y2], dim=1), y_full, "y", rel=1e-5)
    assert_matches(s2, s_full, "final state", rel=1e-5)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 50])
def test_auto_choice_matches_reference(T: int) -> None:
    B, H, N = 2, 2, 16
    inputs = make_inputs(B, T, H, N, seed=8)
    state = make_state(B, H, N)
    y_ref, s_ref = wkv7(*inputs, state, impl="reference")
    y, s = wkv7(*inputs, state)
    assert_matches(y, y_ref, "y", rel=1e-5)
    assert_matches(s, s_ref, "final state", rel=1e-5)


def test_default_impl_override(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    table = importlib.import_module("rwkvkit.wkv.ops")  # the op records the entry points run
    spied = dataclasses.replace(
        table.WKV7,
        chunked=lambda *x, **kw: calls.append("chunked") or wkv7_chunked(*x, **kw),
        reference=lambda *x: calls.append("reference") or wkv7_reference(*x),
    )
    monkeypatch.setattr(table, "WKV7", spied)
    inputs = make_inputs(1, 20, 2, 8)
    wkv7(*inputs)
    assert calls == ["chunked"]  # auto: chunked for T > AUTO_STEP_MAX_T
    with wkv.use_impl("reference"):
        assert wkv.get_default_impl() == "reference"
        wkv7(*inputs)
        wkv7(*inputs, impl="chunked")  # an explicit impl still wins
    assert wkv.get_default_impl() is None
    assert calls == ["chunked", "reference", "chunked"]
    with pytest.warns(DeprecationWarning):  # the old spelling, kept for a release (per context now)
        previous = wkv.set_default_impl("chunked")
    try:
        wkv7(*(x[:, :1] for x in inputs))
    finally:
        with pytest.warns(DeprecationWarning):
            wkv.set_default_impl(previous)
    assert calls[-1] == "chunked"
    with pytest.raises(ValueError, match="unknown impl"):
        wkv.set_default_impl("cuda")


def test_bf16_inputs() -> None:
    B, T, H, N = 2, 33, 2, 32
    inputs32 = make_inputs(B, T, H, N, seed=9)
    inputs16 = [x.to(torch.bfloat16) for x in inputs32]
    state = make_state(B, H, N)
    y_ref, s_ref = wkv7(*[x.float() for x in inputs16], state, impl="reference")
    for impl in IMPLEMENTATIONS:
        y, s = wkv7(*inputs16, state.to(torch.bfloat16), impl=impl)
        assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert torch.isfinite(y.float()).all() and torch.isfinite(s).all()
        assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 1e-2
        assert ((s - s_ref).norm() / s_ref.norm()).item() < 1e-2
    # bf16 training: gradients flow back in bf16
    leaves = [x.clone().requires_grad_() for x in inputs16]
    y, s = wkv7(*leaves)
    (y.float().square().sum() + s.square().sum()).backward()
    for x in leaves:
        assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_extreme_decays_stay_finite_and_exact() -> None:
    """w = 0 (no decay) and w = W_MIN (strongest v7 decay) everywhere, chunk 64, N = 64."""
    B, T, H, N = 1, 150, 1, 64
    for w_value in (0.0, W_MIN):
        inputs = make_inputs(B, T, H, N, seed=10)
        inputs[1] = torch.full_like(inputs[1], w_value)
        y_ref, s_ref = wkv7_reference(*inputs)
        y, s = wkv7(*inputs, impl="chunked", chunk_size=64)
        assert_matches(y, y_ref, f"y (w={w_value})")
        assert_matches(s, s_ref, f"final state (w={w_value})")


def test_empty_sequence() -> None:
    inputs = make_inputs(2, 0, 2, 4)
    state = make_state(2, 2, 4)
    for impl in IMPLEMENTATIONS:
        y, s = wkv7(*inputs, state, impl=impl)
        assert y.shape == (2, 0, 2, 4)
        torch.testing.assert_close(s, state)


def test_validation_errors() -> None:
    r, w, k, v, a, b = make_inputs(2, 5, 2, 4)
    with pytest.raises(ValueError, match="k has shape"):
        wkv7(r, w, k[:, :4], v, a, b)
    with pytest.raises(ValueError, match=r"\(B, T, H, N\)"):
        wkv7(r[0], w[0], k[0], v[0], a[0], b[0])
    with pytest.raises(ValueError, match="state has shape"):
        wkv7(r, w, k, v, a, b, torch.zeros(2, 2, 4, 5))
    with pytest.raises(ValueError, match="state has shape"):
        wkv7(r, w, k, v, a, b, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="floating dtype"):
        wkv7(r, w, k.long(), v, a, b)
    with pytest.raises(ValueError, match="unknown impl"):
        wkv7(r, w, k, v, a, b, impl="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        wkv7(r, w, k, v, a, b, impl="chunked", chunk_size=0)


def test_w_range_check_for_chunked() -> None:
    r, w, k, v, a, b = make_inputs(1, 64, 1, 8)
    w_strong = torch.full_like(w, -2.0)  # -2 * 64 > W_CHUNK_LIMIT
    with pytest.raises(ValueError, match="chunk_size <= 40"):
        wkv7(r, w_strong, k, v, a, b, impl="chunked", chunk_size=64)
    y_ref, s_ref = wkv7(r, w_strong, k, v, a, b, impl="reference")  # no limit for the step form
    y, s = wkv7(r, w_strong, k, v, a, b, impl="chunked", chunk_size=32)
    assert_matches(y, y_ref, "y")
    assert_matches(s, s_ref, "final state")


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node that `t` depends on."""
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def test_chunked_uses_the_hand_written_backward() -> None:
    """The gradient tests above go through the chunked form's own backward, not autograd of its ops."""
    leaves = [x.requires_grad_() for x in make_inputs(1, 20, 2, 8)]
    y, s = wkv7(*leaves, impl="chunked", chunk_size=8)
    for out in (y, s):
        names = _grad_fn_names(out)
        assert any(name.startswith("_ChunkedWKV7") for name in names), names
        assert not {"BmmBackward0", "BaddbmmBackward0", "LinalgSolveTriangularBackward0"} & names, names


@pytest.mark.parametrize("use", ["y-only", "state-only"])
def test_chunked_gradients_of_one_output(use: str) -> None:
    """A loss on y alone or on the final state alone (the other output's gradient is None)."""
    B, T, H, N = 2, 37, 2, 16
    inputs = make_inputs(B, T, H, N, seed=11)
    state = make_state(B, H, N)

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in [*inputs, state]]
        y, s = fn(*leaves)
        gen = torch.Generator().manual_seed(3)
        out = y if use == "y-only" else s
        loss = (out * torch.randn(out.shape, generator=gen)).sum()
        return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)  # r: unused by s

    g_ref = grads(wkv7_reference)
    g = grads(lambda *x: wkv7(*x, impl="chunked", chunk_size=16))
    for name, gx, gx_ref in zip(NAMES, g, g_ref, strict=True):
        assert_matches(gx, gx_ref, f"grad {name} ({use})")


def test_chunked_backward_gradcheck() -> None:
    """Finite differences in float64 on a tiny case: T not a multiple of the chunk, initial state."""
    B, T, H, N = 1, 7, 2, 3
    leaves = [x.requires_grad_() for x in make_inputs(B, T, H, N, seed=12, dtype=torch.float64)]
    state = make_state(B, H, N, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *x: wkv7_chunked(*x, chunk_size=3), (*leaves, state), eps=1e-6, atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize(("B", "T"), [(1, 64), (2, 37)])
def test_chunked_output_and_gradients_in_input_layout(B: int, T: int) -> None:
    """y and the input gradients come back contiguous (B, T, H, N), and match the reference."""
    H, N = 2, 16
    inputs = make_inputs(B, T, H, N, seed=12)
    state = make_state(B, H, N)
    y, s, g = forward_backward(lambda *x: wkv7(*x, impl="chunked", chunk_size=16), inputs, state)
    y_ref, s_ref, g_ref = forward_backward(wkv7_reference, inputs, state)
    assert y.shape == (B, T, H, N) and y.is_contiguous()
    assert_matches(y, y_ref, "y")
    assert_matches(s, s_ref, "state")
    for name, x, x_ref in zip(["r", "w", "k", "v", "a", "b", "state"], g, g_ref, strict=True):
        assert x.is_contiguous(), name
        assert_matches(x, x_ref, f"d{name}")
