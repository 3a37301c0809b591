"""RWKV-4's native one-token step: the ctypes mirror of ``V4Layer`` / ``V4Model`` (src/step_v4.cpp) and
:func:`build`, which describes a model's weights to it (no weight copied where the layer's storage
already has the kernel's layout; bf16 per-channel vectors become small fp32 copies). The time mix may be
narrower or wider than the model (``dim_att``)."""

from __future__ import annotations

import ctypes

from rwkvkit.native.matrix import RkMatrix
from rwkvkit.native.step import ModelDescription, NativeStep

VECTORS = (
    "ln1_w", "ln1_b", "ln2_w", "ln2_b", "time_mix_k", "time_mix_v", "time_mix_r", "time_decay",
    "time_first", "ffn_time_mix_k", "ffn_time_mix_r",
)  # fmt: skip
MATRICES = ("key", "value", "receptance", "output", "ffn_key", "ffn_receptance", "ffn_value")


class V4Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in VECTORS] + [(name, RkMatrix) for name in MATRICES]


class V4Model(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_int32) for name in ("n_layer", "C", "A", "F", "V")]
        + [("ln_eps", ctypes.c_float)]
        + [(name, ctypes.c_void_p) for name in ("ln0_w", "ln0_b", "ln_out_w", "ln_out_b")]
        + [("head", RkMatrix), ("layers", ctypes.c_void_p)]
    )


def _layer(d: ModelDescription, block) -> V4Layer:
    att, ffn = block.att, block.ffn
    vectors = {
        "ln1_w": block.ln1.weight, "ln1_b": block.ln1.bias, "ln2_w": block.ln2.weight,
        "ln2_b": block.ln2.bias, "ffn_time_mix_k": ffn.time_mix_k, "ffn_time_mix_r": ffn.time_mix_r,
    }  # fmt: skip
    for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_decay", "time_first"):
        vectors[name] = getattr(att, name)
    layer = V4Layer()
    for name in VECTORS:
        setattr(layer, name, d.vector(vectors[name]))
    for name in MATRICES:
        owner, attr = (ffn, name[4:]) if name.startswith("ffn_") else (att, name)
        setattr(layer, name, d.matrix(owner, attr))
    return layer


def build(model, lib: ctypes.CDLL) -> NativeStep:
    """The native step of an RWKV-4 model; raises :class:`Unsupported` where a weight has no kernel."""
    cfg = model.config
    d = ModelDescription(model)
    layers = (V4Layer * cfg.n_layer)(*(_layer(d, block) for block in model.blocks))
    ln0 = model.blocks[0].ln0
    struct = V4Model(
        cfg.n_layer, cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size, model.ln_out.eps,
        d.vector(ln0.weight), d.vector(ln0.bias), d.vector(model.ln_out.weight), d.vector(model.ln_out.bias),
        d.matrix(model, "head"), ctypes.addressof(layers),
    )  # fmt: skip
    d.keep.append(layers)
    return NativeStep(lib, model, lib.rk_v4_step, struct, d)
