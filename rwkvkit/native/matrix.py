"""Weights described to the native library: the ctypes mirror of ``RkMatrix`` (src/native.h) and the
descriptor of each matrix a one-token step multiplies (fp32 / bf16 ``nn.Linear``, the quantized layers,
the low-rank factors) and of per-channel vectors. A descriptor points into tensors it keeps alive; no
weight is copied where the layer's own storage already has the kernel's layout.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

RK_F32, RK_BF16, RK_I8, RK_I4 = 0, 1, 2, 3
FLOAT_KINDS = {torch.float32: RK_F32, torch.bfloat16: RK_BF16}  # the float weights the kernels read


class RkMatrix(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("rows", ctypes.c_int32),
        ("cols", ctypes.c_int32),
        ("group_size", ctypes.c_int32),
        ("data", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("extra", ctypes.c_void_p),
    ]


def ptr(t: torch.Tensor | None) -> int | None:
    """The data address of a contiguous CPU tensor (None for None)."""
    if t is None:
        return None
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("native kernels need contiguous CPU tensors")
    return t.data_ptr()


class PackedMatrix:
    """One projection as the library sees it: ``struct`` (an RkMatrix) and the tensors it points into."""

    def __init__(
        self, kind: int, rows: int, cols: int, data: torch.Tensor, scales=None, zeros=None, group_size=0
    ):
        self.tensors = [t for t in (data, scales, zeros) if t is not None]  # kept alive while in use
        self.struct = RkMatrix(kind, rows, cols, group_size, ptr(data), ptr(scales), ptr(zeros), None)


def matrix_for(layer: nn.Module) -> PackedMatrix | None:
    """The descriptor of ``layer``'s weight, or None where the library has no kernel for it (a layer with
    a bias, an adapter, another device or dtype): the model then stays on the torch path.

    A plain ``nn.Linear`` (fp32 / bf16, no bias) is described here; other layers describe themselves
    through a ``native_matrix()`` method (the quantized layers of :mod:`rwkvkit.quant.layers`).
    """
    if type(layer) is nn.Linear:
        if layer.bias is None:
            return float_matrix(layer.weight)
        return None
    describe = getattr(layer, "native_matrix", None)
    return describe() if describe is not None else None


def float_matrix(weight: torch.Tensor) -> PackedMatrix | None:
    """A 2-D fp32 / bf16 weight as the kernels read it, rows and columns as stored: an ``nn.Linear``
    weight (out, in), read as x W^T, or a low-rank factor (in, out) as the checkpoints hold it (x @ W)."""
    w = weight.detach()
    if w.device.type != "cpu" or w.dtype not in FLOAT_KINDS or w.dim() != 2 or not w.is_contiguous():
        return None
    return PackedMatrix(FLOAT_KINDS[w.dtype], w.shape[0], w.shape[1], w)


def vector(t: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter as the flat contiguous fp32 tensor the library reads (no copy if it is)."""
    return t.detach().float().contiguous().reshape(-1)


def matmul(lib, packed: PackedMatrix, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """y (B, rows) = x (B, cols) W^T through the library's kernel (or its plain-loop reference)."""
    x = x.detach().float().contiguous()
    y = torch.empty(x.shape[0], packed.struct.rows)
    fn = lib.rk_matmul_reference if reference else lib.rk_matmul
    rc = fn(ctypes.byref(packed.struct), ctypes.c_int32(x.shape[0]), ctypes.c_void_p(x.data_ptr()),
            ctypes.c_void_p(y.data_ptr()))  # fmt: skip
    if rc != 0:
        raise ValueError(f"rk_matmul refused the matrix (code {rc})")
    return y
