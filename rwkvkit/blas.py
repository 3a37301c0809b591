"""The products the mixes call (``linear``, ``matmul``, ``state_matvec``), each in its fastest CPU form.

The mixes are written once over (B, T, C); decoding one token at a time is the case these helpers make
fast. One token at a time the products are small: one row against a projection matrix, a low-rank pair,
each head's (N, N) wkv state against a vector. torch's CPU kernels are slow at those sizes here
(benchmarks/RESULTS.md has the machine): a (1, 12, 64, 64) state times a vector takes 45-90 us in torch
and 7 us in numpy; a one-row product with a (768, 3072) matrix reads the weights about twice as fast in
numpy. So a single fp32 CPU row (one sequence, one token) goes through numpy's BLAS. With more rows
torch keeps them: numpy's BLAS threads spin after a call and would contend with torch's threads over the
same cores (a batch-32 step measured 2.7x slower), and a batched state product is faster as a
multiply-and-sum than as torch's batched matmul (0.2 ms against 0.9 ms at batch 32). Gradients, other
dtypes and other devices get torch's own product.

Prompts of a bf16 model on a CPU without bf16 arithmetic (AVX2 machines: no AVX512-BF16 or AMX) run
their products in fp32: torch's bf16 GEMM there is several times slower than its fp32 GEMM (an RWKV-7
L12-D768 prompt of 512 tokens measured 66 tokens/s in bf16 against 568 in fp32), and the weights widen
to fp32 once per call. Results are the fp32 product rounded to bf16 (as close to fp32 as bf16 gets).

``fast_decode(False)`` (a context manager, per thread / asyncio task) turns these shortcuts and the
single-token WKV forms (:mod:`rwkvkit.models.layers`) off, so tests can compare them with plain torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_FAST_DECODE: contextvars.ContextVar[bool] = contextvars.ContextVar("rwkvkit_fast_decode", default=True)


def fast_decode_on() -> bool:
    """Whether the one-token shortcuts are on in this context (they are unless :func:`fast_decode`)."""
    return _FAST_DECODE.get()


@contextlib.contextmanager
def fast_decode(enabled: bool) -> Iterator[None]:
    """Within the block (this thread / task only), the one-token shortcuts are on or off."""
    token = _FAST_DECODE.set(enabled)
    try:
        yield
    finally:
        _FAST_DECODE.reset(token)


def _numpy_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp32 CPU tensors, no gradient to record, shortcuts on."""
    return (
        a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and _FAST_DECODE.get()
    )


@functools.cache
def cpu_has_bf16_math() -> bool:
    """Whether this machine's CPU multiplies bf16 natively (AVX512-BF16 or AMX, as torch.cpu reports)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _widen_bf16(a: torch.Tensor, b: torch.Tensor) -> bool:
    """bf16 CPU tensors, no gradient to record, shortcuts on, and no bf16 arithmetic in this CPU: the
    product runs faster in fp32."""
    return (
        a.dtype == torch.bfloat16
        and b.dtype == torch.bfloat16
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and not torch.is_grad_enabled()
        and _FAST_DECODE.get()
        and not cpu_has_bf16_math()
    )


def _one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a (..., K) and b (K, N): through numpy for a single fp32 CPU row of ``a``."""
    if _one_row(a) and _numpy_ok(a, b):
        return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))
    if not _one_row(a) and _widen_bf16(a, b):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


def linear_row(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x (..., K) and weight (N, K): through numpy for a single fp32 CPU row."""
    if _one_row(x) and _numpy_ok(x, weight):
        return torch.from_numpy(x.detach().numpy() @ weight.detach().numpy().T)
    return x @ weight.T


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for x (..., K): a single fp32 CPU row through a plain bias-free ``nn.Linear`` goes
    through numpy, more bf16 rows on a CPU without bf16 arithmetic through an fp32 product; everything
    else (other dtypes and devices, quantized or adapted layers) is the module itself."""
    if type(layer) is nn.Linear and layer.bias is None:
        if _one_row(x):
            return linear_row(x, layer.weight)
        if _widen_bf16(x, layer.weight):
            return widened_linear(x, layer.weight)
    return layer(x)


WIDEN_ROWS = 4096  # weight rows widened to fp32 at a time: at most 4096 x K fp32 temporary (12 MB at K = 768)


def widened_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for bf16 x (..., K) and weight (N, K) as an fp32 product rounded to bf16, the weight
    widened WIDEN_ROWS rows at a time (a vocabulary-sized head would otherwise need a whole fp32 copy)."""
    x32 = x.float()
    N = weight.shape[0]
    if N <= WIDEN_ROWS:
        return F.linear(x32, weight.float()).to(x.dtype)
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)  # (..., N)
    for start in range(0, N, WIDEN_ROWS):
        block = weight[start : start + WIDEN_ROWS]
        out[..., start : start + block.shape[0]] = F.linear(x32, block.float())
    return out


def state_matvec(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``state @ x`` per head: state (B, H, V, K), x (B, H, K) -> (B, H, V)."""
    if state.shape[0] == 1 and _numpy_ok(state, x):
        return torch.from_numpy(np.matmul(state.detach().numpy(), x.detach().numpy()[..., None])[..., 0])
    if state.device.type == "cpu":
        return (state * x.unsqueeze(-2)).sum(-1)
    return (state @ x.unsqueeze(-1)).squeeze(-1)
