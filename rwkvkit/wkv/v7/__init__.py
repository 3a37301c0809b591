"""The WKV-7 operator: RWKV-7's time-mix recurrence (diagonal decay plus a rank-1 update, delta rule).

This package owns its contract, one module per form: the step-by-step reference (:mod:`.reference`, the
ground truth), the chunk-parallel form with its hand-written backward (:mod:`.chunked`) and the
single-token step (:mod:`.step`: the decode kernel and the recurrent form built on it). The entry point
is :func:`rwkvkit.wkv.wkv7` (:mod:`rwkvkit.wkv.ops`), which validates and dispatches. Device agnostic
(pure PyTorch, no CUDA-only imports); every form is differentiable (the reference and the recurrent
form through autograd of their steps, the chunked form through its own backward).

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
this holds for any chunk size up to 131. The entry checks it for CPU tensors (no sync cost there,
:func:`~rwkvkit.wkv.v7.chunked.check_w_range`); on accelerators it is a precondition, so the hot path
never waits on the device. Use
``impl="reference"`` (no limit) for stronger decays.

``state`` is the initial state (B, H, N, N) as [value, key], or None for zeros. The state is computed in
float32 (in float64 when r is float64, to verify implementations). Returns y (B, T, H, N) in r's dtype
and the final state (B, H, N, N) in float32 (float64 for float64 r).

``impl``: None (the context's choice, see :mod:`rwkvkit.wkv.dispatch`; ``rwkvkit.wkv.use_impl``
switches it, e.g. in tests), "auto" ("recurrent" for T <= AUTO_STEP_MAX_T, faster for one-token
inference on CPU, "chunked" above), "reference" (step by step, the ground truth), "recurrent" (the
decode kernel :func:`wkv7_step` once per token) or "chunked" (chunk-parallel). ``chunk_size`` (chunked
only; ignored by the other forms) defaults to DEFAULT_CHUNK_SIZE.
"""

from __future__ import annotations

from rwkvkit.wkv.v7.chunked import DEFAULT_CHUNK_SIZE, W_CHUNK_LIMIT, check_w_range, wkv7_chunked
from rwkvkit.wkv.v7.reference import wkv7_reference
from rwkvkit.wkv.v7.step import wkv7_recurrent, wkv7_step

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "W_CHUNK_LIMIT",
    "check_w_range",
    "wkv7_chunked",
    "wkv7_recurrent",
    "wkv7_reference",
    "wkv7_step",
]
