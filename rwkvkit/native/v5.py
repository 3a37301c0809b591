"""RWKV-5.2's native one-token step: the ctypes mirror of ``V5Layer`` (src/step_v5.cpp; the model struct
and the channel mix are every version's, :mod:`rwkvkit.native.step`) and :func:`build`, which describes a
model's weights to it. What RWKV-6 (:mod:`rwkvkit.native.v6`) shares with it is here too: the vectors
and projections of the matrix-state time mix's end."""

from __future__ import annotations

import ctypes

from rwkvkit.native.matrix import RkMatrix
from rwkvkit.native.step import ChannelMix, ModelDescription, NativeStep, build_step

VECTORS = ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g", "time_decay")  # after ln1_w, ln1_b
SHARED_VECTORS = ("time_faaaa", "lnx_w", "lnx_b")  # then these, as in V6Layer
MATRICES = ("receptance", "key", "value", "gate", "output")  # (C, C): the same in V5Layer and V6Layer


class V5Layer(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", *VECTORS, *SHARED_VECTORS)]
        + [(name, RkMatrix) for name in MATRICES]
        + [("ffn", ChannelMix)]
    )


def shared_vectors(att) -> dict:
    """:data:`SHARED_VECTORS` of a v5.2 / v6 time mix, by their C names."""
    return {"time_faaaa": att.time_faaaa, "lnx_w": att.ln_x.weight, "lnx_b": att.ln_x.bias}


def _layer(d: ModelDescription, block) -> V5Layer:
    vectors = {name: getattr(block.att, name) for name in VECTORS} | shared_vectors(block.att)
    return d.layer(V5Layer(), block, vectors, MATRICES, "time_mix")


def build(model, lib: ctypes.CDLL) -> NativeStep:
    """The native step of an RWKV-5.2 model; raises :class:`Unsupported` where a weight has no kernel."""
    return build_step(model, lib, lib.rk_v5_step, V5Layer, _layer)
