"""The Triton WKV-7 decode step: one token for B sequences, the new state written in place.

Same contract as :func:`rwkvkit.wkv.v7.step.wkv7_step`: r, w, k, v, a, b (B, H, N) fp32, state
(B, H, N, N) fp32 [value, key]; returns y (B, H, N) fp32 and the new state, written into ``out`` when
given (``out`` may be ``state`` itself: each program reads its rows of the state before writing them).
One program per (batch, head, block of value rows): every value row evolves on its own,
S[i, :] <- S[i, :] * exp(w) + (S[i, :] . a) b + v[i] k. No host sync and no data-dependent allocation,
so the step can be captured in a CUDA graph. Registered as the custom op ``rwkvkit::wkv7_step_triton``
(mutating ``out``), so torch.compile traces through it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["wkv7_step_triton"]


@triton.jit
def _step_kernel(r, w, k, v, a, b, s_in, s_out, y, H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0)  # b * H + h
    rows = tl.program_id(1) * BV + tl.arange(0, BV)  # (BV,) value rows
    cols = tl.arange(0, N)  # (N,) key columns
    vec = bh * N  # offset of (b, h, :) in the (B, H, N) inputs
    r_t = tl.load(r + vec + cols).to(tl.float32)
    d_t = tl.exp(tl.load(w + vec + cols).to(tl.float32))
    k_t = tl.load(k + vec + cols).to(tl.float32)
    a_t = tl.load(a + vec + cols).to(tl.float32)
    b_t = tl.load(b + vec + cols).to(tl.float32)
    v_t = tl.load(v + vec + rows).to(tl.float32)  # (BV,)
    tile = bh * N * N + rows[:, None] * N + cols[None, :]  # (BV, N)
    S = tl.load(s_in + tile)
    sa = tl.sum(S * a_t[None, :], axis=1)  # (BV,)
    S = S * d_t[None, :] + sa[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]
    tl.store(s_out + tile, S)
    tl.store(y + vec + rows, tl.sum(S * r_t[None, :], axis=1))


@torch.library.custom_op("rwkvkit::wkv7_step_triton", mutates_args=("out",))
def _step_op(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor, out: Tensor
) -> Tensor:
    B, H, N = r.shape
    y = torch.empty(B, H, N, dtype=torch.float32, device=r.device)
    BV = min(N, 16)
    grid = (B * H, N // BV)
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    _step_kernel[grid](r, w, k, v, a, b, state, out, y, H=H, N=N, BV=BV)
    return y


@_step_op.register_fake
def _(r, w, k, v, a, b, state, out):  # noqa: ANN001, ANN202
    return r.new_empty(r.shape, dtype=torch.float32)


def wkv7_step_triton(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One WKV-7 step (see the module docstring): y (B, H, N) fp32 and the new state (``out`` when
    given, else a new tensor). ``state`` and ``out`` must be contiguous fp32 (B, H, N, N)."""
    if out is None:
        out = torch.empty_like(state)
    return _step_op(r, w, k, v, a, b, state, out), out
