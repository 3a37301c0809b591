"""The WKV-4 reference: the step recurrence of the official inference code, one token at a time.

The ground truth the other forms of :mod:`rwkvkit.wkv.v4` are tested against: plain, autograd through
its steps. Call it through :func:`rwkvkit.wkv.wkv4` (``impl="reference"``), which validates arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwkvkit.wkv.common import compute_dtype
from rwkvkit.wkv.v4.state import WKV4State, as_state

__all__ = ["wkv4_reference"]


def wkv4_reference(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, WKV4State]:
    """Run the stable recurrence step by step. w, u (C,); k, v (B, T, C); state (aa, bb, pp) or None.

    Returns y (B, T, C) in k's dtype and the final (aa, bb, pp), each (B, C), in the compute dtype.
    """
    B, T, C = k.shape
    out_dtype = k.dtype
    aa, bb, pp = as_state(state, B, C, k)
    dt = compute_dtype(k.dtype)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))

    ys = []
    for k_t, v_t in zip(k.unbind(1), v.unbind(1), strict=True):  # each (B, C)
        ww = u + k_t
        p = torch.maximum(pp, ww)
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        ys.append((e1 * aa + e2 * v_t) / (e1 * bb + e2))
        ww = w + pp
        p = torch.maximum(ww, k_t)
        e1 = torch.exp(ww - p)
        e2 = torch.exp(k_t - p)
        aa = e1 * aa + e2 * v_t
        bb = e1 * bb + e2
        pp = p

    y = torch.stack(ys, dim=1) if T > 0 else k.new_zeros(B, 0, C)  # (B, T, C)
    return y.to(out_dtype), (aa, bb, pp)
