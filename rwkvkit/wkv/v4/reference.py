"""The WKV-4 reference: the step recurrence of the official inference code, one token at a time.

The ground truth the other forms of :mod:`rwkvkit.wkv.v4` are tested against: plain, autograd through
its steps. Call it through :func:`rwkvkit.wkv.wkv4` (``impl="reference"``), which validates arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rwkvkit.wkv.common import stack_steps
from rwkvkit.wkv.v4.state import WKV4State, in_compute_dtype

__all__ = ["wkv4_reference"]


def wkv4_reference(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Sequence[Tensor] | Tensor | None = None
) -> tuple[Tensor, WKV4State]:
    """Run the stable recurrence step by step. w, u (C,); k, v (B, T, C); state (aa, bb, pp) or None.

    Returns y (B, T, C) in k's dtype and the final (aa, bb, pp), each (B, C), in the compute dtype.
    """
    out_dtype = k.dtype
    (w, u, k, v), (aa, bb, pp) = in_compute_dtype(w, u, k, v, state)

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

    return stack_steps(ys, k, out_dtype), (aa, bb, pp)  # (B, T, C)
