"""The table of WKV operators and their public entry points: one :class:`~rwkvkit.wkv.dispatch.WKVOp`
record per op, and ``wkv4`` / ``wkv6`` / ``wkv7``, each one call of :func:`rwkvkit.wkv.dispatch.run`.

A record names the op's argument layout (checked by the shared validation), its reference, recurrent,
chunked and step forms (from ``rwkvkit/wkv/v4``, ``v6``, ``v7``), its fused GPU kernels (fla's, from
:mod:`rwkvkit.wkv.fla_backend`), its default chunk size and its rule for "auto". The exact contract of
each op is the docstring of its package (:mod:`rwkvkit.wkv.v4`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from rwkvkit.wkv.common import check_matrix_state
from rwkvkit.wkv.dispatch import WKVOp, run
from rwkvkit.wkv.fla_backend import FLA_WKV6, FLA_WKV7
from rwkvkit.wkv.kernels import TRITON_WKV7
from rwkvkit.wkv.v4 import (
    DEFAULT_CHUNK_SIZE as WKV4_CHUNK_SIZE,
)
from rwkvkit.wkv.v4 import (
    WKV4State,
    check_state,
    wkv4_chunked,
    wkv4_recurrent,
    wkv4_reference,
    wkv4_step,
)
from rwkvkit.wkv.v4.chunked import chunk_length as wkv4_chunk_length
from rwkvkit.wkv.v6 import DEFAULT_CHUNK_SIZE as WKV6_CHUNK_SIZE
from rwkvkit.wkv.v6 import wkv6_chunked, wkv6_recurrent, wkv6_reference, wkv6_step
from rwkvkit.wkv.v6.chunked import chunk_length as wkv6_chunk_length
from rwkvkit.wkv.v7 import DEFAULT_CHUNK_SIZE as WKV7_CHUNK_SIZE
from rwkvkit.wkv.v7 import check_w_range, wkv7_chunked, wkv7_recurrent, wkv7_reference, wkv7_step
from rwkvkit.wkv.v7.chunked import chunk_length as wkv7_chunk_length

__all__ = ["OPS", "WKV4", "WKV6", "WKV7", "wkv4", "wkv6", "wkv7"]

WKV4 = WKVOp(
    name="wkv4",
    args=("w", "u", "k", "v"),
    lead="k",
    dims=("B", "T", "C"),
    per_step=("v",),
    per_channel=("w", "u"),
    check_state=check_state,
    reference=wkv4_reference,
    recurrent=wkv4_recurrent,
    chunked=wkv4_chunked,
    step=wkv4_step,
    default_chunk_size=WKV4_CHUNK_SIZE,
    chunk_length=wkv4_chunk_length,
    varlen_chunk_size=WKV4_CHUNK_SIZE,
    # Without gradients the recurrent form is the faster one at every T (benchmarks/RESULTS.md); with
    # them the chunked form is (its backward does not replay T small steps).
    recurrent_max_t_no_grad=math.inf,
)

WKV6 = WKVOp(
    name="wkv6",
    args=("r", "w", "k", "v", "u"),
    lead="r",
    dims=("B", "T", "H", "N"),
    per_step=("w", "k", "v"),
    per_channel=("u",),
    check_state=check_matrix_state,
    reference=wkv6_reference,
    recurrent=wkv6_recurrent,
    chunked=wkv6_chunked,
    step=wkv6_step,
    default_chunk_size=WKV6_CHUNK_SIZE,
    chunk_length=wkv6_chunk_length,
    varlen_chunk_size=32,  # per step as fast as 64, half the filler
    fused=(FLA_WKV6,),  # fla's chunk_rwkv6 (rwkvkit.wkv.fla_backend), CUDA only
)

WKV7 = WKVOp(
    name="wkv7",
    args=("r", "w", "k", "v", "a", "b"),
    lead="r",
    dims=("B", "T", "H", "N"),
    per_step=("w", "k", "v", "a", "b"),
    per_channel=(),
    check_state=check_matrix_state,
    reference=wkv7_reference,
    recurrent=wkv7_recurrent,
    chunked=wkv7_chunked,
    step=wkv7_step,
    default_chunk_size=WKV7_CHUNK_SIZE,
    chunk_length=wkv7_chunk_length,
    varlen_chunk_size=16,  # per step as fast as 32 (RESULTS.md), half the filler
    check_chunked=check_w_range,
    # fused GPU kernels, in the order auto tries them on CUDA: fla's chunk_rwkv7
    # (rwkvkit.wkv.fla_backend), rwkvkit's own Triton kernel (rwkvkit.wkv.kernels)
    fused=(FLA_WKV7, TRITON_WKV7),
)

OPS: tuple[WKVOp, ...] = (WKV4, WKV6, WKV7)


def wkv4(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    state: Sequence[Tensor] | Tensor | None = None,
    *,
    impl: str | None = None,
    chunk_size: int | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, WKV4State]:
    """Run the RWKV-4 WKV (see :mod:`rwkvkit.wkv.v4` for the exact contract).

    Args:
        w: (C,) log-decay, -exp(time_decay) (<= 0); NOT the raw checkpoint time_decay.
        u: (C,) time_first.
        k, v: (B, T, C).
        state: (aa, bb, pp) each (B, C), a tensor (3, B, C), or None for a fresh sequence.
        impl: None (the context's choice, auto unless rwkvkit.wkv.use_impl set it), "auto",
            "reference", "recurrent" or "chunked".
        chunk_size: chunk length for the chunked form (default rwkvkit.wkv.v4.DEFAULT_CHUNK_SIZE).
        resets: (B, T) bool or None: packed rows, each True position starts a new sequence from `state`
            (rwkvkit.wkv.varlen; the final state is that of each row's last sequence).
    Returns:
        y (B, T, C) in k's dtype, final (aa, bb, pp) each (B, C) float32 (float64 for float64 k).
    """
    return run(WKV4, (w, u, k, v), state, impl=impl, chunk_size=chunk_size, resets=resets)


def wkv6(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    *,
    impl: str | None = None,
    chunk_size: int | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the RWKV-5.2/6 WKV recurrence (see :mod:`rwkvkit.wkv.v6` for the exact contract).

    Args:
        r, w, k, v: (B, T, H, N); w is the log of the per-step decay (w <= 0).
        u: (H, N) the bonus of the current token (time_faaaa).
        state: initial state (B, H, N, N) as [value, key], or None for zeros.
        impl: None (the context's choice, auto unless rwkvkit.wkv.use_impl set it), "auto",
            "reference", "recurrent", "chunked" or "fla" (CUDA, rwkvkit.wkv.fla_backend; auto picks it
            there when it can run the inputs).
        chunk_size: chunk length for the chunked form (default rwkvkit.wkv.v6.DEFAULT_CHUNK_SIZE).
        resets: (B, T) bool or None: packed rows, each True position starts a new sequence from `state`
            (rwkvkit.wkv.varlen; the final state is that of each row's last sequence).
    Returns:
        y (B, T, H, N) in r's dtype, final state (B, H, N, N) float32 (float64 for float64 r).
    """
    return run(WKV6, (r, w, k, v, u), state, impl=impl, chunk_size=chunk_size, resets=resets)


def wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    *,
    impl: str | None = None,
    chunk_size: int | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the RWKV-7 WKV recurrence (see :mod:`rwkvkit.wkv.v7` for the exact contract).

    Args:
        r, w, k, v, a, b: (B, T, H, N); w is the log of the per-step decay (w <= 0).
        state: initial state (B, H, N, N) as [value, key], or None for zeros.
        impl: None (the context's choice, auto unless rwkvkit.wkv.use_impl set it), "auto",
            "reference", "recurrent", "chunked" or "fla" (CUDA, rwkvkit.wkv.fla_backend; auto picks it
            there when it can run the inputs).
        chunk_size: chunk length for the chunked form (default DEFAULT_CHUNK_SIZE).
        resets: (B, T) bool or None: packed rows, each True position starts a new sequence from `state`
            (rwkvkit.wkv.varlen; the final state is that of each row's last sequence).
    Returns:
        y (B, T, H, N) in r's dtype, final state (B, H, N, N) float32 (float64 for float64 r).
    """
    return run(WKV7, (r, w, k, v, a, b), state, impl=impl, chunk_size=chunk_size, resets=resets)
