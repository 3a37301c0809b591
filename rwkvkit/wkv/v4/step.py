"""The WKV-4 step: one token for B sequences, and the recurrent form that runs it once per token.

:func:`wkv4_step` is the decode kernel the RWKV-4 model's fast path calls (stacked state, no checks,
written into ``out``). :func:`wkv4_recurrent` runs the same arithmetic over T tokens: the production
form for short sequences, and for any T without gradients (per channel it beats the chunked form
there). Both are the stable recurrence of the official inference code, as the reference is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rwkvkit.wkv.common import stack_steps
from rwkvkit.wkv.v4.state import WKV4State, in_compute_dtype

__all__ = ["wkv4_recurrent", "wkv4_step"]


def _advance(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, aa: Tensor, bb: Tensor, pp: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One token: w, u (C,); k, v, aa, bb, pp (B, C). Returns y and the new aa, bb, pp, each (B, C)."""
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = w + pp
    p = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return y, e1 * aa + e2 * v, e1 * bb + e2, p


def wkv4_step(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One step for B sequences (the decode fast path): w, u (C,); k, v (B, C) fp32; state (B, 3, C)
    stacked (aa, bb, pp). Returns y (B, C) fp32 and the new state (B, 3, C), written into ``out`` when
    given (a slice of the whole model's next state: no copy afterwards).

    The same stable recurrence as :func:`rwkvkit.wkv.v4.reference.wkv4_reference` for T = 1, without the
    argument checks.
    """
    y, aa, bb, pp = _advance(w, u, k, v, *state.unbind(1))
    return y, torch.stack((aa, bb, pp), dim=1, out=out)


def wkv4_recurrent(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Sequence[Tensor] | Tensor | None = None
) -> tuple[Tensor, WKV4State]:
    """The step kernel's arithmetic once per token; the contract of
    :func:`rwkvkit.wkv.v4.reference.wkv4_reference`."""
    out_dtype = k.dtype
    (w, u, k, v), (aa, bb, pp) = in_compute_dtype(w, u, k, v, state)
    ys = []
    for k_t, v_t in zip(k.unbind(1), v.unbind(1), strict=True):  # each (B, C)
        y_t, aa, bb, pp = _advance(w, u, k_t, v_t, aa, bb, pp)
        ys.append(y_t)
    return stack_steps(ys, k, out_dtype), (aa, bb, pp)  # (B, T, C)
