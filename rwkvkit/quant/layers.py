"""Weight-only quantized linear layers: int8 per output channel and int4 in groups along the input.

    Int8Linear: w[n, k] ~= q[n, k] * scale[n],                 q in [-127, 127]   (symmetric)
    Int4Linear: w[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g],  q in [0, 15], g = k // group_size

Only the weights are stored small. On the CPU, products of fewer than 64 rows run in rwkvkit.native's
kernels where that library is built (activations quantized to int8 in blocks of 32, integer dot
products; an int4 layer then holds only the portable nibbles those kernels read); otherwise in
torch's own weight-only kernels (``torch._weight_int8pack_mm`` and ``torch._weight_int4pack_mm_for_cpu``,
bf16 activations), which read the small weights directly: decoding, which reads every weight once per
token, is then limited by the bytes of the quantized weights. For many rows at once (prefill) the
weights are dequantized per call and multiplied by a GEMM, in bf16 on a CPU with bf16 arithmetic
(AVX512-BF16 / AMX: 2-3x faster than those kernels at 512 rows), in fp32 on other CPUs (whose bf16 GEMM is
several times slower than fp32). Elsewhere (CUDA, MPS, ...) the layers dequantize to the activation
dtype and use ``F.linear``: correct everywhere, fast on the CPU.

The portable tensors (what a quantized file stores) are ``qweight`` (int8 (N, K), or uint8 (N, K/2)
holding two int4 values per byte, the even k in the low nibble) with fp32 ``scales`` (and ``zeros``);
the CPU kernels' packed forms are made from them when a layer is built. Without the native kernels, an
int4 layer on the CPU holds its nibbles only in torch's packed form (read back exactly, checked when
packing) and makes the portable ``qweight`` again for saving or moving: one copy of the weights in
memory, not two, either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rwkvkit import native
from rwkvkit.blas import cpu_has_bf16_math
from rwkvkit.native.matrix import RK_I4, RK_I8, PackedMatrix
from rwkvkit.native.matrix import matmul as native_matmul

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
PREFILL_ROWS = 64  # from this many rows on, dequantize (to prompt_dtype) and use a GEMM


def _cpu_kernels(device: torch.device) -> bool:
    return device.type == "cpu"


def prompt_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a quantized layer dequantizes to for many rows: bf16 on a CPU with bf16 arithmetic
    (its bf16 GEMM is the fastest there), fp32 on other CPUs (their bf16 GEMM is several times slower than
    fp32, see rwkvkit.blas), the activations' dtype elsewhere."""
    if not _cpu_kernels(x.device):
        return x.dtype
    return torch.bfloat16 if cpu_has_bf16_math() else torch.float32


def _native_kernels(device: torch.device) -> bool:
    """Whether this layer's CPU products go through rwkvkit.native (built and enabled here)."""
    return device.type == "cpu" and native.is_enabled() and native.load() is not None


class _QuantizedLinear(nn.Module):
    """What the quantized layers share: the choice of kernel per call, and their native descriptor
    (``_native``, ctypes pointers into the layer's buffers), which is not copied or pickled with them (the
    copy makes its own on first use). A layer supplies ``native_matrix``, ``_torch_rows`` and
    ``dequantize``."""

    in_features: int
    out_features: int

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_native"] = None
        return state

    def native_matrix(self) -> PackedMatrix | None:
        raise NotImplementedError

    def _torch_rows(self, x2: torch.Tensor) -> torch.Tensor | None:
        """torch's weight-only kernel for a few rows x2 (M, K), or None where it does not apply."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype: the native kernels or torch's weight-only kernel for fewer
        than PREFILL_ROWS rows on the CPU, else the dequantized weight's GEMM."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y = None
        if x2.shape[0] < PREFILL_ROWS:
            if _native_kernels(x.device) and (packed := self.native_matrix()) is not None:
                y = native_matmul(native.load(), packed, x2)
            else:
                y = self._torch_rows(x2)
        if y is None:
            dtype = prompt_dtype(x)
            y = F.linear(x2.to(dtype), self.dequantize(dtype))
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 64-byte aligned address (a copy if needed): the CPU weight-only kernels read
    weights with aligned vector loads, and a tensor straight from a file's buffer may sit anywhere."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


# ---------------------------------------------------------------------------------------------- int8


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 (N, K), scales fp32 (N,)): symmetric per output channel, max |w| -> 127."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (N,)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(_QuantizedLinear):
    """y = x W^T with W stored as int8 per output channel (see the module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", _aligned(qweight))  # (N, K) int8
        self.register_buffer("scales", scales.float().contiguous())  # (N,) fp32
        self._scales_bf16 = self.scales.to(torch.bfloat16)
        self._native: PackedMatrix | None = None  # the native kernels' descriptor, made on first use

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._scales_bf16 = self.scales.to(torch.bfloat16)
        self._native = None
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(dtype) * self.scales.to(dtype)[:, None]).to(dtype)  # (N, K)

    def native_matrix(self) -> PackedMatrix | None:
        """This layer as the native CPU kernels read it (None off the CPU, for widths they lack, or for
        scales converted away from fp32)."""
        if self.qweight.device.type != "cpu" or self.in_features % 32 or self.scales.dtype != torch.float32:
            return None
        if self._native is None:
            self._native = PackedMatrix(RK_I8, self.out_features, self.in_features, self.qweight, self.scales)
        return self._native

    def _torch_rows(self, x2: torch.Tensor) -> torch.Tensor | None:
        """torch's CPU int8 weight-only kernel on a few rows x2 (M, K)."""
        if not _cpu_kernels(x2.device):
            return None
        return torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self._scales_bf16)


# ---------------------------------------------------------------------------------------------- int4


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight uint8 (N, K/2), scales fp32 (N, K/G), zeros fp32 (N, K/G)): asymmetric per group.

    Per group q = round((w - min) / scale) with scale = (max - min) / 15, so w ~= q * scale + min =
    (q - 8) * scale + zero with zero = min + 8 * scale (the CPU kernel's form).
    """
    w = weight.detach().float()
    N, K = w.shape
    if K % group_size or K % 2:
        raise ValueError(f"int4 needs the input width {K} to be a multiple of the group size {group_size}")
    groups = w.view(N, K // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K/G)
    scales = ((hi - lo) / 15.0).clamp_min(1e-12)
    q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8).view(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2): even k low nibble, odd k high nibble
    return packed, scales, lo + 8.0 * scales


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> int32 (N, K) in [0, 15]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2).to(torch.int32)


def unpack_int4_cpu_layout(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor | None:
    """The int32 (N, K) values in [0, 15] of torch's CPU int4 packed weight (the inverse of
    ``torch._convert_weight_to_int4pack_for_cpu``), or None where its layout is not this one.

    As observed in torch 2.13: rows in blocks of 64; per block and input k, 32 bytes whose low nibbles
    are the block's rows 0-31 and whose high nibbles are rows 32-63. Callers check the result against
    the values packed (:meth:`Int4Linear._pack`), so another torch's layout is detected, not trusted.
    """
    N, K = out_features, in_features
    if N % 64 or packed.dtype != torch.uint8 or packed.numel() * 2 != N * K:
        return None
    p = packed.reshape(N // 64, K, 32)
    q = torch.cat((p & 0x0F, p >> 4), dim=-1)  # (N/64, K, 64): [block, k, row in block]
    return q.transpose(1, 2).reshape(N, K).to(torch.int32)


_LAYOUT_CHECKED: dict[tuple[int, int], bool] = {}  # (N, K) -> whether the packed form read back exactly


def _reads_back(packed: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether :func:`unpack_int4_cpu_layout` gives ``values`` back from their ``packed`` form: checked
    on the first matrix of each shape in the process (the layout depends on the shape, not the values)."""
    shape = tuple(values.shape)
    if shape not in _LAYOUT_CHECKED:
        back = unpack_int4_cpu_layout(packed, *shape)
        _LAYOUT_CHECKED[shape] = back is not None and torch.equal(back, values)
    return _LAYOUT_CHECKED[shape]


class Int4Linear(_QuantizedLinear):
    """y = x W^T with W stored as int4 in groups of ``group_size`` inputs (see the module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
        super().__init__()
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("qweight", _aligned(qweight))  # (N, K/2) uint8
        self.register_buffer("scales", scales.float().contiguous())  # (N, K/G)
        self.register_buffer("zeros", zeros.float().contiguous())  # (N, K/G)
        self._pack()

    def _pack(self) -> None:
        """The CPU kernel's packed weight and (K/G, N, 2) bf16 scales-and-zeros (only on the CPU).

        When the packed weight reads back exactly (:func:`unpack_int4_cpu_layout`), the portable
        ``qweight`` is dropped (set to None) and made again from it when needed (saving, dequantizing,
        moving): the weights are then held once, not twice.
        """
        self._packed = self._scales_zeros = self._native = None
        if _native_kernels(self.qweight.device) and self.native_matrix() is not None:
            return  # the native kernels read the portable nibbles: torch's packed form is not needed
        if _cpu_kernels(self.qweight.device) and self.in_features % 32 == 0 and self.out_features % 16 == 0:
            values = unpack_int4(self.qweight)  # (N, K) int32
            self._packed = torch._convert_weight_to_int4pack_for_cpu(values, 2)
            if _reads_back(self._packed, values):
                self.qweight = None
            self._scales_zeros = (
                torch.stack((self.scales.T, self.zeros.T), dim=-1).to(torch.bfloat16).contiguous()
            )

    def _values(self) -> torch.Tensor:
        """The int32 (N, K) weight values in [0, 15], from whichever form the layer holds."""
        if self.qweight is not None:
            return unpack_int4(self.qweight)
        return unpack_int4_cpu_layout(self._packed, self.out_features, self.in_features)

    def portable_qweight(self) -> torch.Tensor:
        """The portable uint8 (N, K/2) nibbles (even k in the low nibble), what a quantized file stores."""
        if self.qweight is not None:
            return self.qweight
        q = self._values()
        return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.qweight is None:  # held as the packed form only: write the portable nibbles
            destination[prefix + "qweight"] = self.portable_qweight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):
        if fn(self.scales) is self.scales:  # nothing moves or converts (e.g. ``.to`` the same device)
            return super()._apply(fn, recurse)
        if self.qweight is None:
            self.qweight = self.portable_qweight()
        out = super()._apply(fn, recurse)
        self._pack()
        return out

    def native_matrix(self) -> PackedMatrix | None:
        """This layer as the native CPU kernels read it (None off the CPU, for widths they lack, or for
        scales converted away from fp32). Where the native kernels are on, the layer holds only the
        portable nibbles they read (see :meth:`_pack`): no copy is made here."""
        if self.scales.device.type != "cpu" or self.in_features % 32 or self.group_size % 32:
            return None
        if self.scales.dtype != torch.float32:
            return None
        if self._native is None:
            N, K = self.out_features, self.in_features
            q = self.portable_qweight()
            self._native = PackedMatrix(RK_I4, N, K, q, self.scales, self.zeros, self.group_size)
        return self._native

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self._values().to(dtype)  # (N, K)
        scales = self.scales.to(dtype).repeat_interleave(self.group_size, dim=1)
        zeros = self.zeros.to(dtype).repeat_interleave(self.group_size, dim=1)
        return (q - 8) * scales + zeros

    def _torch_rows(self, x2: torch.Tensor) -> torch.Tensor | None:
        """torch's CPU int4 weight-only kernel on a few rows x2 (M, K), where the layer is packed for it."""
        if self._packed is None:
            return None
        x2 = x2.to(torch.bfloat16).contiguous()
        return torch._weight_int4pack_mm_for_cpu(x2, self._packed, self.group_size, self._scales_zeros)
