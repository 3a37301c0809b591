"""The WKV-4 step: one token for B sequences, and the recurrent form that runs it once per token.

:func:`wkv4_step` is the decode kernel the RWKV-4 model's fast path calls (stacked state, no checks,
written into ``out``). :func:`wkv4_recurrent` runs the same arithmetic over T tokens: the production
form for short sequences, and for any T without gradients (per channel it beats the chunked form
there). Both are the stable recurrence of the official inference code, as the reference is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwkvkit.wkv.common import compute_dtype
from rwkvkit.wkv.v4.state import WKV4State, as_state

__all__ = ["wkv4_recurrent", "wkv4_step"]


def _advance(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    aa: torch.Tensor,
    bb: torch.Tensor,
    pp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for B sequences (the decode fast path): w, u (C,); k, v (B, C) fp32; state (B, 3, C)
    stacked (aa, bb, pp). Returns y (B, C) fp32 and the new state (B, 3, C), written into ``out`` when
    given (a slice of the whole model's next state: no copy afterwards).

    The same stable recurrence as :func:`rwkvkit.wkv.v4.reference.wkv4_reference` for T = 1, without the
    argument checks.
    """
    y, aa, bb, pp = _advance(w, u, k, v, *state.unbind(1))
    return y, torch.stack((aa, bb, pp), dim=1, out=out)


def wkv4_recurrent(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, WKV4State]:
    """The step kernel's arithmetic once per token. w, u (C,); k, v (B, T, C); state (aa, bb, pp) or None.

    Returns y (B, T, C) in k's dtype and the final (aa, bb, pp), each (B, C), in the compute dtype.
    """
    B, T, C = k.shape
    out_dtype = k.dtype
    aa, bb, pp = as_state(state, B, C, k)
    dt = compute_dtype(k.dtype)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    ys = []
    for k_t, v_t in zip(k.unbind(1), v.unbind(1), strict=True):  # each (B, C)
        y_t, aa, bb, pp = _advance(w, u, k_t, v_t, aa, bb, pp)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if T > 0 else k.new_zeros(B, 0, C)  # (B, T, C)
    return y.to(out_dtype), (aa, bb, pp)
