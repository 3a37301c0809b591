"""The WKV operators: the ONE place the models call to run the time-mix recurrence of every version.

    wkv4(w, u, k, v, state)            RWKV-4: per channel, state (aa, bb, pp)        (v4/)
    wkv6(r, w, k, v, u, state)         RWKV-5.2 and RWKV-6: matrix state, u bonus     (v6/)
    wkv7(r, w, k, v, a, b, state)      RWKV-7: diagonal plus rank-1 (delta rule)      (v7/)

Every op is laid out the same way: a package ``v4`` / ``v6`` / ``v7`` whose docstring is the exact
contract (shapes, what ``w`` means, always the LOG of the per-step decay, w <= 0, and the state
layout, [value, key] for the matrix states), with one module per form side by side: ``reference.py``
(step by step, the ground truth), ``chunked.py`` (chunk-parallel, pure PyTorch) and ``step.py`` (the
single-token decode kernel ``wkv*_step`` and the recurrent form that runs it once per token, the
production path for short sequences). :mod:`rwkvkit.wkv.ops` holds the table of ops (one
:class:`~rwkvkit.wkv.dispatch.WKVOp` record each) and the entry points; :mod:`rwkvkit.wkv.dispatch`
the one entry path they share and which form runs: the ``impl=`` argument, or for ``impl=None`` the
current context's choice (auto by T unless :func:`use_impl` switched it for this thread / task;
:func:`set_default_impl` is its deprecated spelling).

``wkv4_step`` / ``wkv6_step`` / ``wkv7_step`` are the single-token forms the models' decode fast path
calls (one token for B sequences, no checks); tests compare them with the references.
"""

from __future__ import annotations

from rwkvkit.wkv.common import compute_dtype, full_precision
from rwkvkit.wkv.dispatch import (
    AUTO,
    AUTO_STEP_MAX_T,
    FUSED_IMPLEMENTATIONS,
    IMPLEMENTATIONS,
    WKV_IMPL,
    FusedForm,
    WKVOp,
    get_default_impl,
    set_default_impl,
    use_impl,
)
from rwkvkit.wkv.ops import OPS, wkv4, wkv6, wkv7
from rwkvkit.wkv.v4 import wkv4_step
from rwkvkit.wkv.v6 import wkv6_step
from rwkvkit.wkv.v7 import DEFAULT_CHUNK_SIZE, W_CHUNK_LIMIT, wkv7_step

__all__ = [
    "AUTO",
    "AUTO_STEP_MAX_T",
    "DEFAULT_CHUNK_SIZE",
    "FUSED_IMPLEMENTATIONS",
    "FusedForm",
    "IMPLEMENTATIONS",
    "OPS",
    "WKVOp",
    "WKV_IMPL",
    "W_CHUNK_LIMIT",
    "compute_dtype",
    "full_precision",
    "get_default_impl",
    "set_default_impl",
    "use_impl",
    "wkv4",
    "wkv4_step",
    "wkv6",
    "wkv6_step",
    "wkv7",
    "wkv7_step",
]
