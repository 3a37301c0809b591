"""The WKV-4 state (aa, bb, pp): its layout, a fresh sequence's value, the log-decay argument, checks.

Each of aa, bb, pp is (B, C); A = aa * e^{pp} and B = bb * e^{pp} are the running sums of the
recurrence (see :mod:`rwkvkit.wkv.v4`), pp a running maximum of the exponents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwkvkit.wkv.common import check_tensors, compute_dtype

__all__ = [
    "PP_INIT",
    "WKV4State",
    "as_state",
    "check_state",
    "in_compute_dtype",
    "wkv4_log_decay",
    "wkv4_zero_state",
]

WKV4State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (aa, bb, pp), each (B, C)

# pp of a fresh sequence, as in the official inference code.
PP_INIT = -1e38

_PARTS = ("aa", "bb", "pp")


def wkv4_log_decay(time_decay: torch.Tensor) -> torch.Tensor:
    """The `w` argument of :func:`rwkvkit.wkv.wkv4` from a checkpoint's raw ``att.time_decay``:
    -exp(time_decay)."""
    return -torch.exp(time_decay.to(compute_dtype(time_decay.dtype)))


def wkv4_zero_state(
    B: int, C: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> WKV4State:
    """The state of a fresh sequence: aa = bb = 0, pp = -1e38, each (B, C)."""
    aa = torch.zeros(B, C, dtype=dtype, device=device)
    bb = torch.zeros(B, C, dtype=dtype, device=device)
    pp = torch.full((B, C), PP_INIT, dtype=dtype, device=device)
    return aa, bb, pp


def as_state(
    state: Sequence[torch.Tensor] | torch.Tensor | None, B: int, C: int, like: torch.Tensor
) -> WKV4State:
    """(aa, bb, pp) in the compute dtype of `like` (the fresh state for None)."""
    dt = compute_dtype(like.dtype)
    if state is None:
        return wkv4_zero_state(B, C, like.device, dt)
    aa, bb, pp = state.unbind(0) if isinstance(state, torch.Tensor) else state
    return aa.to(dt), bb.to(dt), pp.to(dt)


def in_compute_dtype(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Sequence[torch.Tensor] | torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], WKV4State]:
    """The inputs of a WKV-4 form, (w, u, k, v) and the state (aa, bb, pp), in the compute dtype of k
    (the fresh state for None); every form starts so."""
    dt = compute_dtype(k.dtype)
    return tuple(x.to(dt) for x in (w, u, k, v)), as_state(state, k.shape[0], k.shape[2], k)


def check_state(op: str, state: Sequence[torch.Tensor] | torch.Tensor | None, k: torch.Tensor) -> None:
    """Raise ValueError unless `state` is None, (aa, bb, pp) each (B, C), or a tensor (3, B, C), on
    k's device (B, C from k (B, T, C))."""
    if state is None:
        return
    B, _, C = k.shape
    if isinstance(state, torch.Tensor):
        if state.shape != (3, B, C):
            raise ValueError(f"{op}: state tensor has shape {tuple(state.shape)}, expected (3, B, C)")
        parts: Sequence[object] = state.unbind(0)
    elif isinstance(state, (tuple, list)) and len(state) == 3:
        parts = state
    else:
        raise ValueError(f"{op}: state must be (aa, bb, pp), a tensor (3, B, C), or None")
    check_tensors(op, {"k": k, **{f"state {n}": x for n, x in zip(_PARTS, parts, strict=True)}})
    for name, x in zip(_PARTS, parts, strict=True):
        if x.shape != (B, C):
            raise ValueError(f"{op}: state {name} has shape {tuple(x.shape)}, expected (B, C) = {(B, C)}")
