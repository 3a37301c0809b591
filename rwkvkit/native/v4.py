"""RWKV-4's native one-token step: the ctypes mirror of ``V4Layer`` (src/step_v4.cpp; the model struct and
the channel mix are every version's, :mod:`rwkvkit.native.step`) and :func:`build`, which describes a
model's weights to it. The time mix may be narrower or wider than the model (``dim_att``): the C model
has one head of that width."""

from __future__ import annotations

import ctypes

from rwkvkit.native.matrix import RkMatrix
from rwkvkit.native.step import ChannelMix, ModelDescription, NativeStep, build_step

VECTORS = ("time_mix_k", "time_mix_v", "time_mix_r", "time_decay", "time_first")  # after ln1_w, ln1_b
MATRICES = ("key", "value", "receptance", "output")


class V4Layer(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", *VECTORS)]
        + [(name, RkMatrix) for name in MATRICES]
        + [("ffn", ChannelMix)]
    )


def _layer(d: ModelDescription, block) -> V4Layer:
    vectors = {name: getattr(block.att, name) for name in VECTORS}
    return d.layer(V4Layer(), block, vectors, MATRICES, "time_mix")


def build(model, lib: ctypes.CDLL) -> NativeStep:
    """The native step of an RWKV-4 model; raises :class:`Unsupported` where a weight has no kernel."""
    return build_step(model, lib, lib.rk_v4_step, V4Layer, _layer)
