"""The WKV-7 operator: the entry point the rest of rwkvkit calls to run the RWKV-7 time-mix recurrence.

This module owns the public contract and argument validation; the choice of implementation is made in
:mod:`rwkvkit.wkv.dispatch`, shared with the other WKV operators. It is device agnostic (pure
PyTorch, no CUDA-only imports); every implementation is differentiable (the reference through autograd
of its steps, the chunked form through its own hand-written backward).

    y, final_state = wkv7(r, w, k, v, a, b, state=None, *, impl=None, chunk_size=None)

Inputs r, w, k, v, a, b are tensors (B, T, H, N) of any float dtype, on one device. Per batch element
and head, with the state S laid out as S[value_i, key_j] ("[value, key]", as the reference kernels
and v7 inference keep it):

    S_t = S_{t-1} (diag(exp(w_t)) + a_t b_t^T) + v_t k_t^T
    y_t = S_t r_t                                   (the output reads the NEW state)

element-wise: S_t[i, j] = S_{t-1}[i, j] exp(w_t[j]) + (sum_l S_{t-1}[i, l] a_t[l]) b_t[j] + v_t[i] k_t[j].
The RWKV-7 model passes a = -kk and b = kk * iclr, with kk L2-normalized per head.

``w`` is the LOG of the per-step decay: decay d = exp(w) per key channel, so w <= 0 (w = 0 means no
decay). RWKV-7 passes w = -exp(-0.5) * sigmoid(z), i.e. w in [-0.6066, 0] (decay in (0.545, 1]).

Valid range of w for the chunked form: max(-w) * chunk_size <= W_CHUNK_LIMIT (= 80), which keeps every
float32 intermediate finite (the in-chunk factors reach exp(max|w| * chunk_size / 2)). For RWKV-7's w
this holds for any chunk size up to 131. The check runs here for CPU tensors (no sync cost there); on
accelerators it is a precondition, so the hot path never waits on the device. Use
``impl="reference"`` (no limit) for stronger decays.

``state`` is the initial state (B, H, N, N) as [value, key], or None for zeros. The state is computed in
float32 (in float64 when r is float64, to verify implementations). Returns y (B, T, H, N) in r's dtype
and the final state (B, H, N, N) in float32 (float64 for float64 r).

``impl``: None (auto), "reference" (step by step, the ground truth) or "chunked" (chunk-parallel). Auto
picks the step form for T <= AUTO_STEP_MAX_T (faster for one-token inference on CPU) and chunked
otherwise. ``rwkvkit.wkv.use_impl`` overrides what None means in the current context (e.g. in tests).
``chunk_size`` (chunked only; ignored by the reference) defaults to DEFAULT_CHUNK_SIZE.
"""

from __future__ import annotations

import torch

from rwkvkit.blas import state_matvec
from rwkvkit.wkv.dispatch import (
    check_chunk_size,
    check_matrix_state,
    check_tensors,
    full_precision,
    resolve_impl,
)
from rwkvkit.wkv.wkv7_chunked import DEFAULT_CHUNK_SIZE, W_CHUNK_LIMIT, wkv7_chunked
from rwkvkit.wkv.wkv7_reference import wkv7_reference

__all__ = ["DEFAULT_CHUNK_SIZE", "W_CHUNK_LIMIT", "wkv7", "wkv7_step"]


def _validate(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None,
) -> None:
    named = {"r": r, "w": w, "k": k, "v": v, "a": a, "b": b}
    check_tensors("wkv7", named)
    if r.dim() != 4:
        raise ValueError(f"wkv7: r must have shape (B, T, H, N), got {tuple(r.shape)}")
    for name, x in named.items():
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, expected r's shape {tuple(r.shape)}")
    check_matrix_state("wkv7", state, r)


def _check_w_range(w: torch.Tensor, chunk_size: int) -> None:
    """Raise if the chunked form could overflow in float32. Only on CPU, where it costs no device sync."""
    if w.device.type != "cpu" or w.numel() == 0:
        return
    max_neg = -float(w.detach().amin())
    if max_neg * chunk_size > W_CHUNK_LIMIT:
        safe = int(W_CHUNK_LIMIT // max_neg) if max_neg > 0 else chunk_size
        raise ValueError(
            f"wkv7: w reaches {-max_neg:.4g}; the chunked form needs max(-w) * chunk_size <= "
            f"{W_CHUNK_LIMIT:g} (chunk_size={chunk_size}). Use chunk_size <= {safe} or impl='reference'."
        )


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the RWKV-7 WKV recurrence (see the module docstring for the exact contract).

    Args:
        r, w, k, v, a, b: (B, T, H, N); w is the log of the per-step decay (w <= 0).
        state: initial state (B, H, N, N) as [value, key], or None for zeros.
        impl: None (the context's choice, auto unless rwkvkit.wkv.use_impl set it), "auto",
            "reference" or "chunked".
        chunk_size: chunk length for the chunked form (default DEFAULT_CHUNK_SIZE).
    Returns:
        y (B, T, H, N) in r's dtype, final state (B, H, N, N) float32 (float64 for float64 r).
    """
    _validate(r, w, k, v, a, b, state)
    T = r.shape[1]
    impl = resolve_impl("wkv7", impl, T)
    chunk_size = check_chunk_size("wkv7", chunk_size, DEFAULT_CHUNK_SIZE)
    if impl == "chunked":
        _check_w_range(w, min(chunk_size, max(T, 1)))
    with full_precision(r.device):
        if impl == "reference":
            return wkv7_reference(r, w, k, v, a, b, state)
        return wkv7_chunked(r, w, k, v, a, b, state, chunk_size=chunk_size)


def wkv7_step(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
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
