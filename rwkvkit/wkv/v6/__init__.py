"""The RWKV-5.2 / RWKV-6 WKV operator: multi-head matrix state with diagonal decay and a ``u`` bonus.

This package owns the v5.2/v6 time-mix recurrence, one module per form: the step-by-step reference
(:mod:`.reference`, the ground truth), the chunk-parallel form (:mod:`.chunked`; pure PyTorch, any
device, backward by autograd) and the single-token step (:mod:`.step`: the decode kernel and the
recurrent form built on it). The entry point is :func:`rwkvkit.wkv.wkv6` (:mod:`rwkvkit.wkv.ops`),
which validates and dispatches:

    y, final_state = wkv6(r, w, k, v, u, state=None, *, impl=None, chunk_size=None)

Inputs r, w, k, v are tensors (B, T, H, N) of any float dtype, u is (H, N) (``time_faaaa``), all on
one device. Per batch element and head, with the state S laid out as S[value_i, key_j] ("[value, key]",
the layout of WKV-7 in this package; the architecture notes write v5/v6 as [key, value], the transpose):

    y_t[i]    = sum_j r_t[j] (u[j] k_t[j] v_t[i] + S[i, j])           (the output reads the OLD state)
    S[i, j] <- exp(w_t[j]) S[i, j] + v_t[i] k_t[j]

i.e. y_t = S_{t-1} r_t + (r_t . (u * k_t)) v_t and S_t = S_{t-1} diag(exp(w_t)) + v_t k_t^T.

``w`` is the LOG of the per-step decay (w <= 0, w = 0 means no decay), per key channel. RWKV-6 passes
w = -exp(time_decay + lora(x)) (time-varying); RWKV-5.2 passes its constant w = -exp(time_decay) (H, N)
broadcast over B and T (``w.expand(B, T, H, N)`` is fine, no copy needed). The chunked form is exact for
any w <= 0, from decays near 0 (w = -20 and below) to decays near 1 (w = -1e-6): see
:func:`~rwkvkit.wkv.v6.chunked.wkv6_chunked`. w > 0 (growth) is outside the contract; the reference still
computes it.

``state`` is the initial state (B, H, N, N) as [value, key], or None for zeros. The state is computed in
float32 (in float64 when r is float64, to verify implementations). Returns y (B, T, H, N) in r's dtype
and the final state (B, H, N, N) in float32 (float64 for float64 r).

``impl``: None (the context's choice, see :mod:`rwkvkit.wkv.dispatch`), "auto" ("recurrent" for
T <= AUTO_STEP_MAX_T, "chunked" above), "reference" (step by step, the ground truth), "recurrent" (the
decode kernel :func:`wkv6_step` once per token) or "chunked" (chunk-parallel). ``chunk_size`` (chunked
only; ignored by the other forms) defaults to DEFAULT_CHUNK_SIZE.
"""

from __future__ import annotations

from rwkvkit.wkv.v6.chunked import DEFAULT_CHUNK_SIZE, SUB_CHUNK, wkv6_chunked
from rwkvkit.wkv.v6.reference import wkv6_reference
from rwkvkit.wkv.v6.step import wkv6_recurrent, wkv6_step

__all__ = ["DEFAULT_CHUNK_SIZE", "SUB_CHUNK", "wkv6_chunked", "wkv6_recurrent", "wkv6_reference", "wkv6_step"]
