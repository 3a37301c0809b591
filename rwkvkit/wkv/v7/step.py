"""The WKV-7 step: one token for B sequences, and the recurrent form that runs it once per token.

:func:`wkv7_step` is the decode kernel the RWKV-7 model's fast path calls (no checks, written into
``out``); :func:`wkv7_recurrent` runs it over T tokens, the production form for short sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkvkit.blas import state_matvec
from rwkvkit.wkv.common import run_steps

__all__ = ["wkv7_recurrent", "wkv7_step"]


def wkv7_step(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence for B sequences (the decode fast path): inputs (B, H, N), state
    (B, H, N, N) fp32 [value, key]; returns y (B, H, N) fp32 and the new state, written into ``out``
    (B, H, N, N) when given (a slice of the whole model's next state: no copy afterwards).

    The same computation as ``wkv7(..., impl="reference")`` with T = 1, without the argument checks and
    the time loop (callers pass well-formed fp32 tensors; tests compare the two).
    """
    sa = state_matvec(state, a)  # (B, H, V): S a
    new = torch.mul(state, torch.exp(w).unsqueeze(-2), out=out)
    new.addcmul_(sa.unsqueeze(-1), b.unsqueeze(-2)).addcmul_(v.unsqueeze(-1), k.unsqueeze(-2))
    return state_matvec(new, r), new  # new = S diag(exp(w)) + (S a) b^T + v k^T


def wkv7_recurrent(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`wkv7_step` once per token; the contract of :func:`rwkvkit.wkv.v7.reference.wkv7_reference`.

    Args: r, w, k, v, a, b of shape (B, T, H, N); state (B, H, N, N) as [value, key] or None (zeros).
    Returns: y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in the compute dtype.
    """
    return run_steps(wkv7_step, (r, w, k, v, a, b), (), state)
