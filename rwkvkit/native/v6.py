"""RWKV-6's native one-token step: the ctypes mirror of ``V6Layer`` (src/step_v6.cpp; the model struct and
the channel mix are every version's, :mod:`rwkvkit.native.step`, the time mix's end is RWKV-5.2's,
:mod:`rwkvkit.native.v5`) and :func:`build`, which describes a model's weights to it. The low-rank factors
of the data-dependent token shift and decay are read in place: ``time_maa_w2`` (5, D, C) as five (D, C)
factors."""

from __future__ import annotations

import ctypes

from rwkvkit.native.matrix import RkMatrix
from rwkvkit.native.step import ChannelMix, ModelDescription, NativeStep, build_step
from rwkvkit.native.v5 import MATRICES, SHARED_VECTORS, shared_vectors

SHIFTS = ("x", "w", "k", "v", "r", "g")  # maa_{x,w,k,v,r,g} = att.time_maa_*, after ln1_w, ln1_b
BRANCHES = 5  # w, k, v, r, g: the columns of time_maa_w1 and the factors of time_maa_w2, in this order


class V6Layer(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", *(f"maa_{s}" for s in SHIFTS), "time_decay")]
        + [(name, ctypes.c_void_p) for name in SHARED_VECTORS]
        + [("maa_w1", RkMatrix), ("maa_w2", RkMatrix * BRANCHES)]
        + [("decay_w1", RkMatrix), ("decay_w2", RkMatrix)]
        + [(name, RkMatrix) for name in MATRICES]
        + [("ffn", ChannelMix)]
    )


def _layer(d: ModelDescription, block) -> V6Layer:
    att = block.att
    vectors = {f"maa_{s}": getattr(att, f"time_maa_{s}") for s in SHIFTS}
    vectors.update(time_decay=att.time_decay, **shared_vectors(att))
    layer = d.layer(V6Layer(), block, vectors, MATRICES, "time_maa")
    layer.maa_w1 = d.low_rank(att.time_maa_w1)
    for i in range(BRANCHES):
        layer.maa_w2[i] = d.low_rank(att.time_maa_w2[i])
    layer.decay_w1, layer.decay_w2 = d.low_rank(att.time_decay_w1), d.low_rank(att.time_decay_w2)
    return layer


def build(model, lib: ctypes.CDLL) -> NativeStep:
    """The native step of an RWKV-6 model; raises :class:`Unsupported` where a weight has no kernel."""
    return build_step(model, lib, lib.rk_v6_step, V6Layer, _layer)
