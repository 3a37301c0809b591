"""Weights described to the native library: the ctypes mirror of ``RkMatrix`` (src/native.h) and the
descriptor of each projection a one-token step multiplies (fp32 / bf16 ``nn.Linear``, Int8Linear,
Int4Linear). A descriptor points into tensors it keeps alive; no weight is copied where the layer's own
storage already has the kernel's layout.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

RK_F32, RK_BF16, RK_I8, RK_I4 = 0, 1, 2, 3


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
    a bias, an adapter, another device or dtype): the model then stays on the torch path."""
    # imported here: quant's layers are only needed for quantized models (and keep this module light)
    from rwkvkit.quant.layers import Int4Linear, Int8Linear

    if type(layer) is nn.Linear and layer.bias is None and layer.weight.device.type == "cpu":
        w = layer.weight.detach()
        kinds = {torch.float32: RK_F32, torch.bfloat16: RK_BF16}
        if w.dtype in kinds and w.is_contiguous():
            return PackedMatrix(kinds[w.dtype], w.shape[0], w.shape[1], w)
        return None
    if type(layer) is Int8Linear and layer.qweight.device.type == "cpu":
        return PackedMatrix(RK_I8, layer.out_features, layer.in_features, layer.qweight, layer.scales)
    if type(layer) is Int4Linear and layer.scales.device.type == "cpu":
        q = layer.portable_qweight()
        return PackedMatrix(
            RK_I4, layer.out_features, layer.in_features, q, layer.scales, layer.zeros, layer.group_size
        )
    return None
