"""The WKV-4 operator: RWKV-4's per-channel (no heads) weighted key-value average.

This package owns RWKV-4's WKV, one module per form: the step-by-step reference (:mod:`.reference`, the
ground truth), the chunk-parallel form for long sequences (:mod:`.chunked`) and the single-token step
(:mod:`.step`: the decode kernel and the recurrent form built on it), plus the state layout
(:mod:`.state`). Pure PyTorch, device agnostic, every form differentiable through autograd. The entry
point is :func:`rwkvkit.wkv.wkv4` (:mod:`rwkvkit.wkv.ops`), which validates and dispatches:

    y, (aa, bb, pp) = wkv4(w, u, k, v, state=None, *, impl=None, chunk_size=None)

Arguments: k, v (B, T, C); w, u (C,). Per batch element and channel, for t = 0 .. T-1:

    wkv_t = (A_t + e^{u + k_t} v_t) / (B_t + e^{u + k_t})        (the output reads the OLD sums)
    A_{t+1} = e^{w} A_t + e^{k_t} v_t,   B_{t+1} = e^{w} B_t + e^{k_t}

so with no initial state  A_t = sum_{i<t} e^{(t-1-i) w + k_i} v_i  (B_t likewise without v).

``w`` is the per-channel LOG-DECAY, w = -exp(time_decay) <= 0, NOT the raw checkpoint ``time_decay``
(use :func:`wkv4_log_decay` to convert). ``u`` is ``time_first`` as stored (the log of the bonus for the
current token).

The state is (aa, bb, pp), each (B, C), holding A = aa * e^{pp} and B = bb * e^{pp}: pp is a running
maximum of the exponents, so aa and bb stay O(1). A fresh sequence starts at aa = bb = 0, pp = -1e38
(:func:`wkv4_zero_state`; ``state=None`` means the same). ``state`` may be a tuple/list of the three
tensors or one tensor (3, B, C). Two states are equal when their (aa, bb) agree after rescaling to a
common pp, not necessarily element by element.

The state is computed in float32 (float64 when k is float64, to verify implementations). Returns y
(B, T, C) in k's dtype and the final state as a tuple of three (B, C) tensors in the compute dtype.

``impl``: None (the context's choice, see :mod:`rwkvkit.wkv.dispatch`), "auto" ("chunked" when
gradients are needed and T > AUTO_STEP_MAX_T, else "recurrent", the faster form without gradients),
"reference" (the numerically stable step recurrence of the official inference code), "recurrent" (the
same recurrence through the decode kernel :func:`wkv4_step`'s arithmetic) or "chunked" (chunk-parallel;
every exponent is formed as a difference against a per-row maximum, so it is safe for any decay in
(0, 1], any k, and any initial state including pp = -1e38). ``chunk_size`` (chunked only) defaults to
DEFAULT_CHUNK_SIZE; the chunked form holds B * T * chunk_size * C intermediates.
"""

from __future__ import annotations

from rwkvkit.wkv.v4.chunked import DEFAULT_CHUNK_SIZE, wkv4_chunked
from rwkvkit.wkv.v4.reference import wkv4_reference
from rwkvkit.wkv.v4.state import PP_INIT, WKV4State, check_state, wkv4_log_decay, wkv4_zero_state
from rwkvkit.wkv.v4.step import wkv4_recurrent, wkv4_step

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "PP_INIT",
    "WKV4State",
    "check_state",
    "wkv4_chunked",
    "wkv4_log_decay",
    "wkv4_recurrent",
    "wkv4_reference",
    "wkv4_step",
    "wkv4_zero_state",
]
