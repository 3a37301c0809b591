"""RWKV-7's native one-token step: the ctypes mirror of ``V7Layer`` (src/step_v7.cpp; the model struct and
the channel mix, here without receptance, are every version's, :mod:`rwkvkit.native.step`) and
:func:`build`, which describes a model's weights to it. In a layer without the value mix
(``att.has_value_lora`` false), ``v0``, ``v1`` and ``v2`` stay null."""

from __future__ import annotations

import ctypes

from rwkvkit.native.matrix import RkMatrix
from rwkvkit.native.step import ChannelMix, ModelDescription, NativeStep, build_step

# after ln1_w, ln1_b
VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a", "r_k", "lnx_w", "lnx_b")
LOW_RANK = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
MATRICES = ("receptance", "key", "value", "output")


class V7Layer(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", *VECTORS)]
        + [(name, RkMatrix) for name in LOW_RANK + MATRICES]
        + [("ffn", ChannelMix)]
        + [("has_value_lora", ctypes.c_int32), ("reserved", ctypes.c_int32)]
    )


def _layer(d: ModelDescription, block) -> V7Layer:
    att = block.att
    vectors = {name: getattr(att, name) for name in VECTORS if name not in ("v0", "lnx_w", "lnx_b")}
    vectors.update(lnx_w=att.ln_x.weight, lnx_b=att.ln_x.bias)
    low_rank = ("w1", "w2", "a1", "a2", "g1", "g2")
    if att.has_value_lora:
        vectors["v0"] = att.v0
        low_rank += ("v1", "v2")
    layer = d.layer(V7Layer(), block, vectors, MATRICES, "x")
    for name in low_rank:
        setattr(layer, name, d.low_rank(getattr(att, name)))
    layer.has_value_lora = int(att.has_value_lora)
    return layer


def build(model, lib: ctypes.CDLL) -> NativeStep:
    """The native step of an RWKV-7 model; raises :class:`Unsupported` where a weight has no kernel."""
    return build_step(model, lib, lib.rk_v7_step, V7Layer, _layer)
