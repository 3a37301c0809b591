"""The one dispatch point of the WKV operators: which implementation ``impl=None`` means.

Also the conventions every operator shares: argument checks for ``impl`` / ``chunk_size`` and the
dtype the state is computed in (:func:`compute_dtype`).

Every operator (``wkv4``, ``wkv6``, ``wkv7``) takes ``impl=`` and resolves it here. ``impl=None`` means
the value of a context variable (:data:`WKV_IMPL`, "auto" unless set), which :func:`use_impl` switches
for the code running in the current context only: a ``with use_impl("reference"):`` in one thread (or
asyncio task) never changes the implementation another thread's model runs. A model that must always
run one implementation passes ``impl=`` explicitly. The model code never calls an implementation
directly.

Implementations: "reference" (step by step, the ground truth) and "chunked" (chunk-parallel, pure
PyTorch, any device). "auto" resolves to "reference" for T <= AUTO_STEP_MAX_T (one-token inference,
where it is faster) and "chunked" above (WKV-4 without gradients always takes its step form: per
channel, it is faster than its chunked form).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator

import torch

__all__ = [
    "AUTO",
    "AUTO_STEP_MAX_T",
    "IMPLEMENTATIONS",
    "WKV_IMPL",
    "check_chunk_size",
    "check_matrix_state",
    "check_tensors",
    "compute_dtype",
    "full_precision",
    "get_default_impl",
    "resolve_impl",
    "set_default_impl",
    "use_impl",
]

# Names accepted by `impl=` besides "auto" (None means the context's choice, see WKV_IMPL).
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "chunked")

AUTO = "auto"  # the choice by T (and, for WKV-4, by whether gradients are needed)

# Auto uses the step form up to this T: on CPU (B=1, H=12, N=64) it is faster than chunked for T <= 3.
AUTO_STEP_MAX_T = 3

# What impl=None means in the current context (thread / asyncio task): "auto" unless use_impl set it.
WKV_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("rwkvkit_wkv_impl", default=AUTO)


def _check_impl(impl: str | None, op: str = "wkv") -> None:
    if impl is not None and impl != AUTO and impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: unknown impl {impl!r}; expected None or {AUTO!r} (auto) or one of {IMPLEMENTATIONS}"
        )


def get_default_impl() -> str | None:
    """What ``impl=None`` resolves to in the current context (None = the automatic choice by T)."""
    impl = WKV_IMPL.get()
    return None if impl == AUTO else impl


@contextlib.contextmanager
def use_impl(impl: str | None) -> Iterator[None]:
    """Context manager: within the block, every WKV operator called with ``impl=None`` uses `impl`
    (None or "auto": the automatic choice). It applies to the current context only: other threads (the
    engine's, for one) and other asyncio tasks keep their own choice."""
    _check_impl(impl)
    token = WKV_IMPL.set(AUTO if impl is None else impl)
    try:
        yield
    finally:
        WKV_IMPL.reset(token)


def set_default_impl(impl: str | None) -> str | None:
    """Deprecated (use :func:`use_impl`, or pass ``impl=``): make ``impl=None`` mean `impl` in the
    current context from now on (None restores the automatic choice). Returns the previous value.

    Kept for one release. It used to switch a process-wide default; it now sets the context variable
    :data:`WKV_IMPL` of the calling thread / task only.
    """
    _check_impl(impl)
    warnings.warn(
        "rwkvkit.wkv.set_default_impl is deprecated: use `with rwkvkit.wkv.use_impl(...)` or impl=",
        DeprecationWarning,
        stacklevel=2,
    )
    previous = get_default_impl()
    WKV_IMPL.set(AUTO if impl is None else impl)
    return previous


def resolve_impl(op: str, impl: str | None, T: int, step_max_t: float = AUTO_STEP_MAX_T) -> str:
    """The implementation an operator named `op` runs for a sequence of length T.

    None means the context's choice (:data:`WKV_IMPL`). Auto picks "reference" for T <= ``step_max_t``
    (an operator whose step form is the faster one for some use passes a larger bound there) and
    "chunked" above.
    """
    _check_impl(impl, op)
    if impl is None:
        impl = WKV_IMPL.get()
    if impl == AUTO:
        impl = "reference" if T <= step_max_t else "chunked"
    return impl


def check_chunk_size(op: str, chunk_size: int | None, default: int) -> int:
    """``chunk_size`` validated (a positive int), or ``default`` for None."""
    if chunk_size is None:
        return default
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the state is computed in: float64 for float64 inputs (to verify), otherwise float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off: the operators run in fp32 inside even under ``torch.autocast`` (bf16
    training), which would otherwise lower their matmuls to bf16."""
    return torch.autocast(device_type=device.type, enabled=False)
