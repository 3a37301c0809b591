"""The WKV operators: the ONE place the models call to run the time-mix recurrence of every version.

    wkv4(w, u, k, v, state)            RWKV-4: per channel, state (aa, bb, pp)        (wkv4.py)
    wkv6(r, w, k, v, u, state)         RWKV-5.2 and RWKV-6: matrix state, u bonus     (wkv6.py)
    wkv7(r, w, k, v, a, b, state)      RWKV-7: diagonal plus rank-1 (delta rule)      (wkv7.py)

Each module documents its exact contract: shapes, what ``w`` means (always the LOG of the per-step
decay, w <= 0) and the state layout ([value, key] for the matrix states). Each has a step-by-step
reference and a chunk-parallel pure-PyTorch form; which one runs is decided in one place,
:mod:`rwkvkit.wkv.dispatch`: the ``impl=`` argument, or for ``impl=None`` the current context's choice
(auto by T unless :func:`use_impl` switched it for this thread / task; :func:`set_default_impl` is its
deprecated spelling).

``wkv4_step`` / ``wkv6_step`` / ``wkv7_step`` are the single-token forms the models' decode fast path
calls (one token for B sequences, no checks); tests compare them with the references.
"""

from __future__ import annotations

from rwkvkit.wkv.dispatch import (
    AUTO,
    AUTO_STEP_MAX_T,
    IMPLEMENTATIONS,
    WKV_IMPL,
    get_default_impl,
    set_default_impl,
    use_impl,
)
from rwkvkit.wkv.wkv4 import wkv4, wkv4_step
from rwkvkit.wkv.wkv6 import wkv6, wkv6_step
from rwkvkit.wkv.wkv7 import DEFAULT_CHUNK_SIZE, W_CHUNK_LIMIT, wkv7, wkv7_step

__all__ = [
    "AUTO",
    "AUTO_STEP_MAX_T",
    "DEFAULT_CHUNK_SIZE",
    "IMPLEMENTATIONS",
    "WKV_IMPL",
    "W_CHUNK_LIMIT",
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
