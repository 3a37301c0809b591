"""The conventions every WKV operator shares: the compute dtype, autocast off, and argument checks.

Used by the implementations (reference, chunked, step forms of every op) and by the table-driven entry
(:mod:`rwkvkit.wkv.dispatch`); it imports nothing else from the package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

__all__ = [
    "check_chunk_size",
    "check_matrix_state",
    "check_tensors",
    "compute_dtype",
    "full_precision",
    "run_steps",
    "stack_steps",
    "start_state",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the state is computed in: float64 for float64 inputs (to verify), otherwise float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def start_state(state: torch.Tensor | None, r: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """The matrix state a recurrence starts from, in the compute dtype ``dt``: ``state`` (B, H, N, N) as
    [value, key], or zeros of that shape for None (B, H, N read off r (B, T, H, N))."""
    if state is not None:
        return state.to(dt)
    B, _, H, N = r.shape
    return torch.zeros(B, H, N, N, dtype=dt, device=r.device)  # (B, H, V, K)


def stack_steps(ys: list[torch.Tensor], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The per-token outputs ``ys`` (each (B, *rest)) stacked along time into (B, T, *rest) in ``dtype``;
    ``like`` (B, T, *rest), an input of the op, gives the shape and device of an empty (T = 0) result."""
    if not ys:
        return like.new_zeros(like.shape[0], 0, *like.shape[2:], dtype=dtype)
    return torch.stack(ys, dim=1).to(dtype)


def run_steps(
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    per_token: tuple[torch.Tensor, ...],
    constants: tuple[torch.Tensor, ...],
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-token ``step(*x_t, *constants, S) -> (y_t, S)`` run over T tokens (the recurrent form).

    per_token: tensors (B, T, H, N), the first one r; constants: per-head tensors such as u (H, N);
    state: (B, H, N, N) or None. Returns y (B, T, H, N) in r's dtype and the final state in the compute
    dtype.
    """
    r = per_token[0]
    dt = compute_dtype(r.dtype)
    S = start_state(state, r, dt)  # (B, H, V, K)
    constants = tuple(c.to(dt) for c in constants)
    ys = []
    for x_t in zip(*(x.to(dt).unbind(1) for x in per_token), strict=True):  # each (B, H, N)
        y_t, S = step(*x_t, *constants, S)
        ys.append(y_t)
    return stack_steps(ys, r, r.dtype), S  # (B, T, H, V)


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off: the operators run in fp32 inside even under ``torch.autocast`` (bf16
    training), which would otherwise lower their matmuls to bf16."""
    return torch.autocast(device_type=device.type, enabled=False)


def check_chunk_size(op: str, chunk_size: int | None, default: int) -> int:
    """``chunk_size`` validated (a positive int), or ``default`` for None."""
    if chunk_size is None:
        return default
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def check_tensors(op: str, tensors: dict[str, object]) -> None:
    """Raise ValueError unless every value is a floating-point tensor on the device of the first one."""
    first_name, first = next(iter(tensors.items()))
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{op}: {name} must have a floating dtype, got {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"{op}: {name} is on {x.device}, but {first_name} is on {first.device}")


def check_matrix_state(op: str, state: torch.Tensor | None, r: torch.Tensor) -> None:
    """Raise ValueError unless ``state`` is None or a (B, H, N, N) float tensor on r's device."""
    if state is None:
        return
    B, _, H, N = r.shape
    if not isinstance(state, torch.Tensor) or not state.is_floating_point():
        raise ValueError(f"{op}: state must be a floating-point torch.Tensor (B, H, N, N) or None")
    if state.shape != (B, H, N, N):
        raise ValueError(
            f"{op}: state has shape {tuple(state.shape)}, expected (B, H, N, N) = {(B, H, N, N)} "
            "laid out as [value, key]"
        )
    if state.device != r.device:
        raise ValueError(f"{op}: state is on {state.device}, but r is on {r.device}")
