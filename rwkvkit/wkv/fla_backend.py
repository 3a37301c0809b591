"""fla (flash-linear-attention, ``fla-core``) as a fused backend of WKV-7 and WKV-5.2/6: the one adapter.

This module owns every convention that differs between rwkvkit's WKV contracts (:mod:`rwkvkit.wkv.v7`,
:mod:`rwkvkit.wkv.v6`) and fla 0.6's chunk kernels, and the rule for which inputs those kernels run. It
gives two :class:`~rwkvkit.wkv.dispatch.FusedForm` records, :data:`FLA_WKV7` (``chunk_rwkv7``) and
:data:`FLA_WKV6` (``chunk_rwkv6``), registered in :mod:`rwkvkit.wkv.ops`; nothing else calls fla.
Install with ``pip install 'rwkvkit[gpu]'`` (``fla-core`` pinned to 0.6.x, MIT licence).

The conventions handled here (each one a measured trap):

- state layout: fla's state is [key, value] (B, H, K, V); rwkvkit's is [value, key] (B, H, V, K). The
  initial state is transposed (and made contiguous, float32) on the way in, the final state on the way
  out; it always comes back float32 [value, key], contiguous.
- scale: ``chunk_rwkv6`` defaults to ``scale = 1/sqrt(K)`` (so does fla's ``fused_recurrent_rwkv7``);
  rwkvkit's recurrences have no scale, so ``scale=1.0`` is always passed (without it the outputs were
  off by 75-88%).
- argument order: ``chunk_rwkv6(r, k, v, w, u, ...)`` (w after v); ``chunk_rwkv7(r, w, k, v, a, b,
  ...)`` (rwkvkit's order). Arguments are passed by keyword after the tensors.
- decay: both kernels take ``w`` as the natural LOG of the per-step decay per key channel (w <= 0),
  rwkvkit's own parameterisation, so w is passed as is, but always in float32 (fla accumulates it in
  float32; a bf16 w would lose the decay's precision). RWKV-5.2's constant decay, expanded over (B, T)
  by the model (a stride-0 view), is materialised per step (``contiguous``), since ``chunk_rwkv6``
  wants a per-step w.
- a, b of WKV-7: fla's DPLR rule is ``S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``
  in [key, value], which is rwkvkit's ``S_{t-1} (diag(exp(w_t)) + a_t b_t^T) + v_t k_t^T`` transposed:
  same names, same roles.
- dtypes: r, k, v, a, b and u run in r's dtype (float16, bfloat16 or float32), y comes back in r's
  dtype. float32 inputs run TF32 matmuls inside Triton (about 1e-3 relative error, not fp32 accuracy;
  ``TRITON_F32_DEFAULT=ieee`` asks Triton for full fp32), and ``chunk_rwkv7`` warns once about fp32.
  float64 is outside fla's contract (use impl="reference" / "chunked" to verify in float64).
- torch.compile: fla's chunk ops are excluded from compilation, so the call runs inside
  ``torch.compiler.disable`` (a graph break, the kernel itself runs eagerly).
- API version: fla 0.6 removed ``head_first`` (inputs are [B, T, H, ...]; passing it raises) and
  changed ``chunk_rwkv7``'s default chunk size (16, or 64 with a caller-asserted ``lower_bound``); this
  adapter never passes ``head_first``, ``chunk_size`` or ``lower_bound`` (rwkvkit's w may reach 0,
  which ``lower_bound`` excludes), and refuses any fla outside 0.6.x.
- contract limits: CUDA tensors only (never chosen on CPU), head size N <= 256 (fla's state kernels
  hold a whole key row of up to 256 in one block), T >= 1, no packed rows (the dispatch runs those
  chunked; fla's ``cu_seqlens`` is not used).

fla is imported lazily, on the first CUDA input that could run (``import rwkvkit`` never imports it);
the result of that import is cached (:func:`load_fla`; ``load_fla.cache_clear()`` forgets it).
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rwkvkit.wkv.dispatch import FusedForm, State

__all__ = [
    "FLA_MAX_HEAD_SIZE",
    "FLA_REQUIREMENT",
    "FLA_VERSION",
    "FLA_WKV6",
    "FLA_WKV7",
    "FlaKernels",
    "load_fla",
    "on_cuda",
]

FLA_VERSION = (0, 6)  # the minor version this adapter is written for
FLA_REQUIREMENT = "fla-core>=0.6,<0.7"  # the `gpu` extra of pyproject.toml
FLA_MAX_HEAD_SIZE = 256  # fla's chunk kernels hold one key row (N <= 256) in a block
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INSTALL_HINT = "pip install 'rwkvkit[gpu]'"


@dataclass(frozen=True)
class FlaKernels:
    """The fla functions the adapter calls, and fla's version."""

    version: str
    chunk_rwkv7: object
    chunk_rwkv6: object


def on_cuda(x: torch.Tensor) -> bool:
    """Whether fla's kernels can run on x's device (a CUDA tensor; tests replace this to fake one)."""
    return x.device.type == "cuda"


def _minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


@functools.cache
def load_fla() -> FlaKernels | str:
    """Import fla's chunk kernels: a :class:`FlaKernels`, or the reason they cannot be used (cached)."""
    try:
        fla = importlib.import_module("fla")
    except ModuleNotFoundError as exc:
        if exc.name == "fla":
            return f"fla is not installed ({INSTALL_HINT})"
        return f"fla could not be imported: {exc}"
    except ImportError as exc:
        return f"fla could not be imported: {exc}"
    version = str(getattr(fla, "__version__", "unknown"))
    if _minor(version) != FLA_VERSION:
        want = ".".join(map(str, FLA_VERSION))
        return f"fla {version} is installed, rwkvkit's adapter needs fla {want}.x ({INSTALL_HINT})"
    try:
        rwkv7 = importlib.import_module("fla.ops.rwkv7")
        rwkv6 = importlib.import_module("fla.ops.rwkv6")
    except ImportError as exc:  # fla without Triton, say
        return f"fla {version}'s kernels could not be imported: {exc}"
    return FlaKernels(version=version, chunk_rwkv7=rwkv7.chunk_rwkv7, chunk_rwkv6=rwkv6.chunk_rwkv6)


def _unavailable(tensors: Sequence[torch.Tensor], state: State) -> str | None:
    """Why fla cannot run these (already validated) inputs, or None. The lead tensor r is first."""
    r = tensors[0]
    if not on_cuda(r):
        return f"fla's kernels run on CUDA tensors only, got a {r.device.type} tensor"
    if r.dtype not in KERNEL_DTYPES:
        return f"fla runs float16, bfloat16 or float32 inputs, got r in {r.dtype}"
    parts = [*tensors] + ([state] if isinstance(state, torch.Tensor) else [])
    if any(x.dtype == torch.float64 for x in parts):
        return "fla does not run float64 inputs (use impl='reference' or 'chunked' to verify in float64)"
    _, T, _, N = r.shape
    if N > FLA_MAX_HEAD_SIZE:
        return f"head size N={N} is above fla's limit of {FLA_MAX_HEAD_SIZE}"
    if T < 1:
        return "fla needs T >= 1"
    loaded = load_fla()
    return loaded if isinstance(loaded, str) else None


def _kernels() -> FlaKernels:
    loaded = load_fla()
    if isinstance(loaded, str):  # run() is only called after _unavailable() said yes
        raise RuntimeError(loaded)
    return loaded


def _state_in(state: torch.Tensor | None) -> torch.Tensor | None:
    """rwkvkit's (B, H, V, K) state as fla's (B, H, K, V), float32 and contiguous."""
    return None if state is None else state.to(torch.float32).transpose(-1, -2).contiguous()


def _state_out(state: torch.Tensor) -> torch.Tensor:
    """fla's final (B, H, K, V) state as rwkvkit's (B, H, V, K), float32 and contiguous."""
    return state.to(torch.float32).transpose(-1, -2).contiguous()


def _kernel_inputs(r: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    """r and xs in r's dtype, contiguous (the kernels index them as dense [B, T, H, N])."""
    return [x.to(r.dtype).contiguous() for x in (r, *xs)]


@torch.compiler.disable
def _run_wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """wkv7's contract (r, w, k, v, a, b (B, T, H, N), state [value, key]) on fla's chunk_rwkv7."""
    out_dtype = r.dtype
    r, k, v, a, b = _kernel_inputs(r, k, v, a, b)  # (B, T, H, N)
    w = w.to(torch.float32).contiguous()  # (B, T, H, N) log decay, as fla takes it
    y, final = _kernels().chunk_rwkv7(
        r, w, k, v, a, b, scale=1.0, initial_state=_state_in(state), output_final_state=True
    )
    return y.to(out_dtype), _state_out(final)  # (B, T, H, N), (B, H, V, K)


@torch.compiler.disable
def _run_wkv6(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """wkv6's contract (r, w, k, v (B, T, H, N), u (H, N), state [value, key]) on fla's chunk_rwkv6."""
    out_dtype = r.dtype
    r, k, v, u = _kernel_inputs(r, k, v, u)
    w = w.to(torch.float32).contiguous()  # (B, T, H, N): RWKV-5.2's expanded constant decay materialised
    y, final = _kernels().chunk_rwkv6(
        r, k, v, w, u, scale=1.0, initial_state=_state_in(state), output_final_state=True
    )
    return y.to(out_dtype), _state_out(final)  # (B, T, H, N), (B, H, V, K)


FLA_WKV7 = FusedForm(name="fla", unavailable=_unavailable, run=_run_wkv7)
FLA_WKV6 = FusedForm(name="fla", unavailable=_unavailable, run=_run_wkv6)
