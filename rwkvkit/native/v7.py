"""RWKV-7's native one-token step: the ctypes mirror of ``V7Layer`` / ``V7Model`` (src/step_v7.cpp) and
:func:`build`, which describes a model's weights to it (no weight copied where the layer's storage
already has the kernel's layout; bf16 per-channel vectors become small fp32 copies)."""

from __future__ import annotations

import ctypes

from rwkvkit.native.matrix import RkMatrix
from rwkvkit.native.step import ModelDescription, NativeStep

VECTORS = (
    "ln1_w", "ln1_b", "ln2_w", "ln2_b", "x_r", "x_w", "x_k", "x_v", "x_a", "x_g",
    "w0", "a0", "v0", "k_k", "k_a", "r_k", "lnx_w", "lnx_b", "ffn_x_k",
)  # fmt: skip
LOW_RANK = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
MATRICES = ("receptance", "key", "value", "output", "ffn_key", "ffn_value")


class V7Layer(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_void_p) for name in VECTORS]
        + [(name, RkMatrix) for name in LOW_RANK + MATRICES]
        + [("has_value_lora", ctypes.c_int32), ("reserved", ctypes.c_int32)]
    )


class V7Model(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_int32) for name in ("n_layer", "C", "H", "N", "F", "V")]
        + [("ln_eps", ctypes.c_float), ("gn_eps", ctypes.c_float)]
        + [(name, ctypes.c_void_p) for name in ("ln0_w", "ln0_b", "ln_out_w", "ln_out_b")]
        + [("head", RkMatrix), ("layers", ctypes.c_void_p)]
    )


def _layer(d: ModelDescription, block) -> V7Layer:
    att, ffn = block.att, block.ffn
    vectors = {
        "ln1_w": block.ln1.weight, "ln1_b": block.ln1.bias, "ln2_w": block.ln2.weight,
        "ln2_b": block.ln2.bias, "lnx_w": att.ln_x.weight, "lnx_b": att.ln_x.bias, "ffn_x_k": ffn.x_k,
    }  # fmt: skip
    for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a", "r_k"):
        vectors[name] = getattr(att, name)
    low_rank = {name: getattr(att, name) for name in ("w1", "w2", "a1", "a2", "g1", "g2")}
    if att.has_value_lora:
        vectors["v0"] = att.v0
        low_rank.update(v1=att.v1, v2=att.v2)
    layer = V7Layer()
    for name in VECTORS:
        setattr(layer, name, d.vector(vectors[name]) if name in vectors else None)
    for name in LOW_RANK:
        setattr(layer, name, d.low_rank(low_rank[name]) if name in low_rank else RkMatrix())
    owners = {"receptance": (att, "receptance"), "key": (att, "key"), "value": (att, "value")}
    owners.update(output=(att, "output"), ffn_key=(ffn, "key"), ffn_value=(ffn, "value"))
    for name in MATRICES:
        setattr(layer, name, d.matrix(*owners[name]))
    layer.has_value_lora = int(att.has_value_lora)
    return layer


def build(model, lib: ctypes.CDLL) -> NativeStep:
    """The native step of an RWKV-7 model; raises :class:`Unsupported` where a weight has no kernel."""
    cfg = model.config
    d = ModelDescription(model)
    layers = (V7Layer * cfg.n_layer)(*(_layer(d, block) for block in model.blocks))
    ln0 = model.blocks[0].ln0
    struct = V7Model(
        cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.dim_ffn, cfg.vocab_size,
        model.ln_out.eps, model.blocks[0].att.ln_x.eps,
        d.vector(ln0.weight), d.vector(ln0.bias), d.vector(model.ln_out.weight), d.vector(model.ln_out.bias),
        d.matrix(model, "head"), ctypes.addressof(layers),
    )  # fmt: skip
    d.keep.append(layers)
    return NativeStep(lib, model, lib.rk_v7_step, struct, d)
