"""The WKV-7 reference: the recurrence step by step, the ground truth every other form is checked against.

This module owns the plain, loop-over-time form of the v7 "generalized delta rule". It is short on
purpose, has no tricks, and is autograd friendly (no in-place writes on tensors that need grad).

Per batch element and head, with the state S laid out as S[value_i, key_j] ("[value, key]"):

    S_t = S_{t-1} (diag(exp(w_t)) + a_t b_t^T) + v_t k_t^T
    y_t = S_t r_t                                   (the output reads the NEW state)

``w`` is the LOG of the per-step decay (w <= 0). The computation runs in float32, or in float64 when
``r`` is float64 (useful to verify other implementations); ``y`` comes back in the dtype of ``r``.

Call it through :func:`rwkvkit.wkv.wkv7` (``impl="reference"``), which validates the arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkvkit.wkv.common import compute_dtype, stack_steps, start_state

__all__ = ["wkv7_reference"]


def wkv7_reference(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run the recurrence one time step at a time.

    Args: r, w, k, v, a, b of shape (B, T, H, N); state (B, H, N, N) as [value, key] or None (zeros).
    Returns: y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in the compute dtype.
    """
    out_dtype = r.dtype
    dt = compute_dtype(r.dtype)
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))  # (B, T, H, N)
    decay = torch.exp(w)  # (B, T, H, N)
    S = start_state(state, r, dt)  # (B, H, V, K)

    # unbind (not x[:, t]) so that the backward gathers the per-step gradients once, in O(T).
    ys = []
    steps = zip(*(x.unbind(dim=1) for x in (r, decay, k, v, a, b)), strict=True)
    for r_t, d_t, k_t, v_t, a_t, b_t in steps:  # each (B, H, N)
        sa = S @ a_t.unsqueeze(-1)  # (B, H, V, 1): S_{t-1} a_t
        S = (
            S * d_t.unsqueeze(-2)  # column j scaled by exp(w_t[j])
            + sa * b_t.unsqueeze(-2)  # (S_{t-1} a_t) b_t^T
            + v_t.unsqueeze(-1) * k_t.unsqueeze(-2)  # v_t k_t^T
        )  # (B, H, V, K)
        ys.append((S @ r_t.unsqueeze(-1)).squeeze(-1))  # (B, H, V)

    return stack_steps(ys, r, out_dtype), S  # (B, T, H, V)
