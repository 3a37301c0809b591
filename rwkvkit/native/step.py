"""A model's one-token decode step through the native library, one C call per token for all layers.

Each version has a module here (``v4.py``, ``v5.py`` for 5.2, ``v6.py``, ``v7.py``) with
``build(model, lib) -> NativeStep | None`` (None where some layer has no native kernel) and a C function
in ``src/step_v*.cpp``. :func:`native_step_for` picks the module from the model's version.

Contract of :meth:`NativeStep.step`: tokens (B,) int64 and the model's state (RWKVState); returns
(logits (B, V) fp32, the new RWKVState), equal to the torch path's one-token forward (tests compare
logits and every piece of the state after many steps). The old state is not modified.
"""

from __future__ import annotations

import ctypes
import importlib

import torch

MAX_ROWS = 64  # batches up to this many rows decode natively; larger ones stay on torch


class NativeStep:
    """Base of a version's native step: the library, the packed weights and the C model struct.

    A version's C entry point (``src/step_v*.cpp``) has one signature for all versions::

        int32_t rk_vX_step(const void* model, int32_t B, const float* x,   // x (B, C): emb(tokens), fp32
                           const float* att_in, const float* wkv_in, const float* ffn_in,
                           float* att_out, float* wkv_out, float* ffn_out, float* logits)
        // shifts (L, B, C) fp32, wkv (L, B, ...) fp32 in rwkvkit.state's layout, logits (B, V) fp32;
        // ``*_out`` may equal ``*_in`` (in place); returns 0, or nonzero on a bad argument.

    It runs every layer (ln0, ln1, time mix with the WKV update, ln2, channel mix), then ln_out and the
    head. The subclass sets ``fn`` (the C function) and ``model_struct`` (a ctypes structure).
    """

    def __init__(self, lib: ctypes.CDLL, model, fn, model_struct: ctypes.Structure, keep: list):
        self.lib = lib
        self.model = model
        self.fn = fn
        self.fn.restype = ctypes.c_int32
        self.fn.argtypes = [ctypes.c_void_p, ctypes.c_int32] + [ctypes.c_void_p] * 8
        self.model_struct = model_struct
        self.keep = keep  # the PackedMatrix / tensors / ctypes arrays the C side points into

    def step(self, tokens: torch.Tensor, state):
        """tokens (B,) int64, state (RWKVState) -> (logits (B, V) fp32, new RWKVState)."""
        from rwkvkit.state import RWKVState  # here: keeps this module free of the model-side imports

        dtype = state.att_shift.dtype
        x = self.model.emb(tokens).float().contiguous()  # (B, C)
        att_in = state.att_shift.float().contiguous()  # (L, B, C)
        ffn_in = state.ffn_shift.float().contiguous()
        wkv_in = state.wkv.contiguous()  # fp32
        att_out, ffn_out, wkv_out = (
            torch.empty_like(att_in),
            torch.empty_like(ffn_in),
            torch.empty_like(wkv_in),
        )
        logits = torch.empty(x.shape[0], self.model.config.vocab_size)  # (B, V)
        rc = self.fn(
            ctypes.addressof(self.model_struct), x.shape[0],
            *(t.data_ptr() for t in (x, att_in, wkv_in, ffn_in, att_out, wkv_out, ffn_out, logits)),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"native step failed with code {rc}")
        return logits, RWKVState(att_out.to(dtype), wkv_out, ffn_out.to(dtype))


VERSION_MODULES = {"4": "v4", "5.2": "v5", "6": "v6", "7": "v7"}


def native_step_for(model) -> NativeStep | None:
    """The native step of ``model`` (fp32 / bf16 / int8 / int4 on the CPU), or None where there is none:
    the library is off, the version has no native step yet, or a layer has no native kernel."""
    from rwkvkit.native import load  # the package's loader (this module is imported by it lazily)

    lib = load()
    name = VERSION_MODULES.get(model.config.version)
    if lib is None or name is None or model.device.type != "cpu":
        return None
    try:
        module = importlib.import_module(f"rwkvkit.native.{name}")
    except ModuleNotFoundError:
        return None
    return module.build(model, lib)
