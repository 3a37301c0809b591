"""RWKV-6's native one-token step: the ctypes mirror of ``V6Layer`` (src/step_v6.cpp; the model struct
and the projections are RWKV-5.2's, :mod:`rwkvkit.native.v5`) and :func:`build`, which describes a
model's weights to it (no weight copied where the layer's storage already has the kernel's layout; bf16
per-channel vectors become small fp32 copies). The low-rank factors of the data-dependent token shift and
decay are read in place: ``time_maa_w2`` (5, D, C) as five (D, C) factors."""

from __future__ import annotations

import ctypes

from rwkvkit.native.matrix import RkMatrix
from rwkvkit.native.step import ModelDescription, NativeStep
from rwkvkit.native.v5 import MATRICES, model_struct, set_matrices, shared_vectors

VECTORS = (
    "ln1_w", "ln1_b", "ln2_w", "ln2_b", "maa_x", "maa_w", "maa_k", "maa_v", "maa_r", "maa_g",
    "time_decay", "time_faaaa", "lnx_w", "lnx_b", "ffn_maa_k", "ffn_maa_r",
)  # fmt: skip
BRANCHES = 5  # w, k, v, r, g: the columns of time_maa_w1 and the factors of time_maa_w2, in this order


class V6Layer(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_void_p) for name in VECTORS]
        + [("maa_w1", RkMatrix), ("maa_w2", RkMatrix * BRANCHES)]
        + [("decay_w1", RkMatrix), ("decay_w2", RkMatrix)]
        + [(name, RkMatrix) for name in MATRICES]
    )


def _layer(d: ModelDescription, block) -> V6Layer:
    att, ffn = block.att, block.ffn
    vectors = shared_vectors(block)
    vectors.update(time_decay=att.time_decay, ffn_maa_k=ffn.time_maa_k, ffn_maa_r=ffn.time_maa_r)
    for name in ("x", "w", "k", "v", "r", "g"):
        vectors[f"maa_{name}"] = getattr(att, f"time_maa_{name}")
    layer = V6Layer()
    for name in VECTORS:
        setattr(layer, name, d.vector(vectors[name]))
    layer.maa_w1 = d.low_rank(att.time_maa_w1)
    for i in range(BRANCHES):
        layer.maa_w2[i] = d.low_rank(att.time_maa_w2[i])
    layer.decay_w1, layer.decay_w2 = d.low_rank(att.time_decay_w1), d.low_rank(att.time_decay_w2)
    set_matrices(d, layer, block)
    return layer


def build(model, lib: ctypes.CDLL) -> NativeStep:
    """The native step of an RWKV-6 model; raises :class:`Unsupported` where a weight has no kernel."""
    d = ModelDescription(model)
    layers = (V6Layer * model.config.n_layer)(*(_layer(d, block) for block in model.blocks))
    return NativeStep(lib, model, lib.rk_v6_step, model_struct(d, model, layers), d)
