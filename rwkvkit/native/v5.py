"""RWKV-5.2's native one-token step: the ctypes mirror of ``V5Layer`` / ``V5Model`` (src/step_v5.cpp) and
:func:`build`, which describes a model's weights to it (no weight copied where the layer's storage
already has the kernel's layout; bf16 per-channel vectors become small fp32 copies).

What RWKV-6 (:mod:`rwkvkit.native.v6`) shares with it is here too: the model struct (the same fields in
both C files), the projections of the matrix-state time mix and of the channel mix with receptance.
"""

from __future__ import annotations

import ctypes

from rwkvkit.native.matrix import RkMatrix
from rwkvkit.native.step import ModelDescription, NativeStep

VECTORS = (
    "ln1_w", "ln1_b", "ln2_w", "ln2_b", "time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g",
    "time_decay", "time_faaaa", "lnx_w", "lnx_b", "ffn_time_mix_k", "ffn_time_mix_r",
)  # fmt: skip
# (C, C) projections of the time mix, then the channel mix's: the same in V5Layer and V6Layer
MATRICES = (
    "receptance", "key", "value", "gate", "output", "ffn_key", "ffn_receptance", "ffn_value",
)  # fmt: skip


class V5Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in VECTORS] + [(name, RkMatrix) for name in MATRICES]


class MatrixStateModel(ctypes.Structure):
    """``V5Model`` and ``V6Model`` of the C files (the same fields)."""

    _fields_ = (
        [(name, ctypes.c_int32) for name in ("n_layer", "C", "H", "N", "F", "V")]
        + [("ln_eps", ctypes.c_float), ("gn_eps", ctypes.c_float)]
        + [(name, ctypes.c_void_p) for name in ("ln0_w", "ln0_b", "ln_out_w", "ln_out_b")]
        + [("head", RkMatrix), ("layers", ctypes.c_void_p)]
    )


def shared_vectors(block) -> dict:
    """The per-channel vectors of a v5.2 / v6 block by their C names, except the token-shift weights
    and the decay (which the versions name and use differently)."""
    att = block.att
    return {
        "ln1_w": block.ln1.weight, "ln1_b": block.ln1.bias, "ln2_w": block.ln2.weight,
        "ln2_b": block.ln2.bias, "time_faaaa": att.time_faaaa, "lnx_w": att.ln_x.weight,
        "lnx_b": att.ln_x.bias,
    }  # fmt: skip


def set_matrices(d: ModelDescription, layer: ctypes.Structure, block) -> None:
    """Describe the projections of ``block`` (:data:`MATRICES`) into ``layer``."""
    for name in MATRICES:
        owner, attr = (block.ffn, name[4:]) if name.startswith("ffn_") else (block.att, name)
        setattr(layer, name, d.matrix(owner, attr))


def model_struct(d: ModelDescription, model, layers: ctypes.Array) -> MatrixStateModel:
    """The C model of ``model`` with its described ``layers`` (kept alive by ``d``)."""
    cfg = model.config
    ln0 = model.blocks[0].ln0
    d.keep.append(layers)
    return MatrixStateModel(
        cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.dim_ffn, cfg.vocab_size,
        model.ln_out.eps, model.blocks[0].att.ln_x.eps,
        d.vector(ln0.weight), d.vector(ln0.bias), d.vector(model.ln_out.weight), d.vector(model.ln_out.bias),
        d.matrix(model, "head"), ctypes.addressof(layers),
    )  # fmt: skip


def _layer(d: ModelDescription, block) -> V5Layer:
    att, ffn = block.att, block.ffn
    vectors = shared_vectors(block)
    vectors.update(ffn_time_mix_k=ffn.time_mix_k, ffn_time_mix_r=ffn.time_mix_r)
    for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g", "time_decay"):
        vectors[name] = getattr(att, name)
    layer = V5Layer()
    for name in VECTORS:
        setattr(layer, name, d.vector(vectors[name]))
    set_matrices(d, layer, block)
    return layer


def build(model, lib: ctypes.CDLL) -> NativeStep:
    """The native step of an RWKV-5.2 model; raises :class:`Unsupported` where a weight has no kernel."""
    d = ModelDescription(model)
    layers = (V5Layer * model.config.n_layer)(*(_layer(d, block) for block in model.blocks))
    return NativeStep(lib, model, lib.rk_v5_step, model_struct(d, model, layers), d)
