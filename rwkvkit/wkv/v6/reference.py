"""The WKV-5.2/6 reference: the recurrence one time step at a time, the ground truth.

The plain loop the other forms of :mod:`rwkvkit.wkv.v6` are tested against (autograd friendly, no
in-place writes). Call it through :func:`rwkvkit.wkv.wkv6` (``impl="reference"``), which validates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkvkit.wkv.common import compute_dtype, stack_steps, start_state

__all__ = ["wkv6_reference"]


def wkv6_reference(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run the recurrence one time step at a time (autograd friendly, no in-place writes).

    Args: r, w, k, v of shape (B, T, H, N); u (H, N); state (B, H, N, N) as [value, key] or None.
    Returns: y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in the compute dtype.
    """
    out_dtype = r.dtype
    dt = compute_dtype(r.dtype)
    r, w, k, v = (x.to(dt) for x in (r, w, k, v))  # (B, T, H, N)
    u = u.to(dt)  # (H, N)
    decay = torch.exp(w)  # (B, T, H, N)
    S = start_state(state, r, dt)  # (B, H, V, K)

    ys = []
    for r_t, d_t, k_t, v_t in zip(*(x.unbind(dim=1) for x in (r, decay, k, v)), strict=True):  # (B, H, N)
        bonus = (r_t * u * k_t).sum(-1, keepdim=True)  # (B, H, 1): r_t . (u * k_t)
        ys.append((S @ r_t.unsqueeze(-1)).squeeze(-1) + bonus * v_t)  # (B, H, V), OLD state
        S = S * d_t.unsqueeze(-2) + v_t.unsqueeze(-1) * k_t.unsqueeze(-2)  # (B, H, V, K)

    return stack_steps(ys, r, out_dtype), S  # (B, T, H, V)
