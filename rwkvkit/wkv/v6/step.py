"""The WKV-5.2/6 step: one token for B sequences, and the recurrent form that runs it once per token.

:func:`wkv6_step` is the decode kernel the RWKV-5.2/6 models' fast path calls (no checks, written into
``out``); :func:`wkv6_recurrent` runs it over T tokens, the production form for short sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkvkit.blas import state_matvec
from rwkvkit.wkv.common import run_steps

__all__ = ["wkv6_recurrent", "wkv6_step"]


def wkv6_step(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence for B sequences (the decode fast path): r, w, k, v (B, H, N), u (H, N),
    state (B, H, N, N) fp32 [value, key]; returns y (B, H, N) fp32 and the new state, written into ``out``
    (B, H, N, N) when given (a slice of the whole model's next state: no copy afterwards).

    The same computation as ``wkv6(..., impl="reference")`` with T = 1, without the argument checks and
    the time loop (callers pass well-formed fp32 tensors; tests compare the two).
    """
    bonus = (r * u * k).sum(-1, keepdim=True)  # (B, H, 1)
    y = state_matvec(state, r) + bonus * v  # (B, H, V): reads the OLD state
    new = torch.mul(state, torch.exp(w).unsqueeze(-2), out=out).addcmul_(v.unsqueeze(-1), k.unsqueeze(-2))
    return y, new


def wkv6_recurrent(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`wkv6_step` once per token; the contract of :func:`rwkvkit.wkv.v6.reference.wkv6_reference`.

    Args: r, w, k, v of shape (B, T, H, N); u (H, N); state (B, H, N, N) as [value, key] or None.
    Returns: y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in the compute dtype.
    """
    return run_steps(wkv6_step, (r, w, k, v), (u,), state)
