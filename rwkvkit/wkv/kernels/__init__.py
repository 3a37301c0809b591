"""rwkvkit's own Triton kernels for WKV-7 (the one-token step and the whole-sequence forward/backward).

This package owns the rule for when they can run (:func:`unavailable`) and the lazy entry points; the
kernels live in :mod:`.wkv7_step` and :mod:`.wkv7_seq` and import Triton only when first called, so
``import rwkvkit`` works without Triton. They run on CUDA tensors, or on CPU tensors under Triton's
interpreter (environment TRITON_INTERPRET=1, set before Triton is imported: the tests do this).

The state is float32 [value, key] (B, H, N, N) as everywhere in rwkvkit; N must be a power of two in
[4, 128]; inputs bfloat16, float16 or float32 (float64 stays on the reference forms).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import torch

from rwkvkit.wkv.dispatch import FusedForm

__all__ = ["TRITON_WKV7", "triton_available", "unavailable", "wkv7_seq", "wkv7_step"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    """Whether the triton package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter is switched on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reason(x: torch.Tensor) -> str | None:
    """None when a kernel may run on x's device, else why not."""
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu" and interpreting():
        return None
    return f"not a CUDA tensor (device {x.device.type}; CPU needs TRITON_INTERPRET=1)"


def unavailable(tensors: Sequence[torch.Tensor], state: torch.Tensor | None) -> str | None:
    """None when the Triton WKV-7 sequence kernel can run r, w, k, v, a, b = tensors (B, T, H, N) from
    `state`, else the reason it cannot."""
    r = tensors[0]
    reason = device_reason(r)
    if reason is not None:
        return reason
    if not triton_available():
        return "triton is not installed (pip install 'rwkvkit[triton]')"
    if any(x.dtype not in DTYPES for x in tensors):
        return f"inputs must be float32, bfloat16 or float16 (got {sorted({str(x.dtype) for x in tensors})})"
    if state is not None and state.dtype == torch.float64:
        return "the state is float64 (the kernel keeps a float32 state)"
    N = r.shape[-1]
    if N < 4 or N > 128 or N & (N - 1):
        return f"head size N={N} must be a power of two in [4, 128]"
    return None


def wkv7_seq(r, w, k, v, a, b, state=None):  # noqa: ANN001, ANN201 (see .wkv7_seq.wkv7_triton)
    """The Triton WKV-7 over a whole sequence (:func:`rwkvkit.wkv.kernels.wkv7_seq.wkv7_triton`)."""
    from rwkvkit.wkv.kernels.wkv7_seq import wkv7_triton  # imports triton: only when a kernel runs

    return wkv7_triton(r, w, k, v, a, b, state)


def wkv7_step(r, w, k, v, a, b, state, out=None):  # noqa: ANN001, ANN201 (see .wkv7_step)
    """The Triton WKV-7 decode step (:func:`rwkvkit.wkv.kernels.wkv7_step.wkv7_step_triton`)."""
    from rwkvkit.wkv.kernels.wkv7_step import wkv7_step_triton  # imports triton: only when a kernel runs

    return wkv7_step_triton(r, w, k, v, a, b, state, out)


def step_usable(state: torch.Tensor) -> bool:
    """Whether the model's decode fast path should use the Triton step for this state: CUDA, Triton
    importable, a float32 state with a power-of-two head size in [4, 128]."""
    N = state.shape[-1]
    return (
        state.device.type == "cuda"
        and state.dtype == torch.float32
        and 4 <= N <= 128
        and not N & (N - 1)
        and triton_available()
    )


# The fused form of the WKV-7 record (rwkvkit.wkv.ops): impl="triton", and "auto" on CUDA.
TRITON_WKV7 = FusedForm(name="triton", unavailable=unavailable, run=wkv7_seq)
