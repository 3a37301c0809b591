"""A model's one-token decode step through the native library, one C call per token for all layers.

Each version has a module here (``v4.py``, ``v5.py`` for 5.2, ``v6.py``, ``v7.py``) with
``build(model, lib) -> NativeStep | None`` (None where some layer has no native kernel) and a C function
in ``src/step_v*.cpp``. :func:`native_step_for` picks the module from the model's version.

What every version shares is here: the C model struct (:class:`StepModel`), the channel mix
(:class:`ChannelMix`) and :func:`build_step`, which describes a model's layers and model-wide weights to it
(no weight copied where the layer's storage already has the kernel's layout; bf16 per-channel vectors
become small fp32 copies); ``src/layer.h`` has their C side.

Contract of :meth:`NativeStep.step`: tokens (B,) int64 and the model's state (RWKVState); returns
(logits (B, V) fp32, the new RWKVState), equal to the torch path's one-token forward (tests compare
logits and every piece of the state after many steps). The old state is not modified.
"""

from __future__ import annotations

import ctypes
import importlib
import weakref

import torch

from rwkvkit.native import is_enabled, load, status
from rwkvkit.native.matrix import PackedMatrix, RkMatrix, float_matrix, matrix_for, vector
from rwkvkit.state import RWKVState

MAX_ROWS = 64  # batches up to this many rows decode natively; larger ones stay on torch


class Unsupported(Exception):
    """Some weight of the model has no native kernel (another dtype, a bias, an adapter, a GPU)."""


class ChannelMix(ctypes.Structure):
    """``rk::ChannelMix`` (src/layer.h): a layer's ln2, token-shift weights and projections (RWKV-7: no
    ``mix_r`` and no ``receptance``, both left null)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("ln_w", "ln_b", "mix_k", "mix_r")] + [
        (name, RkMatrix) for name in ("key", "receptance", "value")
    ]


class StepModel(ctypes.Structure):
    """``rk::StepModel`` (src/layer.h): every version's C model (RWKV-4: one head of ``dim_att``)."""

    _fields_ = (
        [(name, ctypes.c_int32) for name in ("n_layer", "C", "H", "N", "F", "V")]
        + [("ln_eps", ctypes.c_float), ("gn_eps", ctypes.c_float)]
        + [(name, ctypes.c_void_p) for name in ("ln0_w", "ln0_b", "ln_out_w", "ln_out_b")]
        + [("head", RkMatrix), ("layers", ctypes.c_void_p)]
    )


class ModelDescription:
    """Collects what a version's C structures point into, keeping every tensor alive (``keep``)."""

    def __init__(self, model):
        if model.dtype not in (torch.float32, torch.bfloat16):
            raise Unsupported(f"weights in {model.dtype}")
        self.keep: list = []
        self.copied: list[tuple[torch.Tensor, int]] = []  # (source, its version) of each copied vector
        self.modules: list[tuple] = []  # (owner, name, layer, its weight) of each matrix

    def vector(self, t: torch.Tensor) -> int:
        """The address of ``t`` as a flat fp32 vector (a copy only if it is not one already)."""
        v = vector(t)
        if v.data_ptr() != t.data_ptr():
            self.copied.append((t, t._version))
        self.keep.append(v)
        return v.data_ptr()

    def low_rank(self, t: torch.Tensor) -> RkMatrix:
        return self._struct(float_matrix(t), "low-rank factor")

    def matrix(self, owner, name: str) -> RkMatrix:
        """The descriptor of the layer ``owner.name`` (an ``nn.Linear`` or a quantized layer)."""
        layer = getattr(owner, name)
        self.modules.append((owner, name, layer, getattr(layer, "weight", None)))
        return self._struct(matrix_for(layer), type(layer).__name__)

    def layer(self, struct: ctypes.Structure, block, vectors: dict, matrices: tuple, shift: str):
        """Fills a version's C layer ``struct`` from ``block``: ln1 and the per-channel ``vectors`` (C name ->
        tensor), the time mix's projections ``matrices`` (``block.att``'s, by name) and the channel mix
        ``ffn`` (``shift``: the prefix of its token-shift weights, ``time_mix`` or ``time_maa`` or ``x``)."""
        vectors = {"ln1_w": block.ln1.weight, "ln1_b": block.ln1.bias, **vectors}
        unknown = set(vectors).union(matrices) - {name for name, _ in struct._fields_}
        if unknown:  # setattr would add them as plain attributes, leaving the C fields null
            raise TypeError(f"{type(struct).__name__} has no fields {sorted(unknown)}")
        for name, t in vectors.items():
            setattr(struct, name, self.vector(t))
        for name in matrices:
            setattr(struct, name, self.matrix(block.att, name))
        ffn, gated = block.ffn, block.ffn.has_receptance
        mix_k = self.vector(getattr(ffn, f"{shift}_k"))
        mix_r = self.vector(getattr(ffn, f"{shift}_r")) if gated else None
        receptance = self.matrix(ffn, "receptance") if gated else RkMatrix()
        struct.ffn = ChannelMix(
            self.vector(block.ln2.weight), self.vector(block.ln2.bias), mix_k, mix_r,
            self.matrix(ffn, "key"), receptance, self.matrix(ffn, "value"),
        )  # fmt: skip
        return struct

    def _struct(self, packed: PackedMatrix | None, what: str) -> RkMatrix:
        if packed is None:
            raise Unsupported(f"no native kernel for a {what}")
        self.keep.append(packed)
        return packed.struct


class NativeStep:
    """A version's native step: the library, the packed weights and the C model struct.

    A version's C entry point (``src/step_v*.cpp``) has one signature for all versions::

        int32_t rk_vX_step(const void* model, int32_t B, const float* x,   // x (B, C): emb(tokens), fp32
                           const float* att_in, const float* wkv_in, const float* ffn_in,
                           float* att_out, float* wkv_out, float* ffn_out, float* logits)
        // shifts (L, B, C) fp32, wkv (L, B, ...) fp32 in rwkvkit.state's layout, logits (B, V) fp32;
        // wkv_out may equal wkv_in (each state row is read before it is written); att_out and ffn_out
        // must not alias the inputs (ln2 writes ffn_out before the shift reads ffn_in); returns 0, or
        // nonzero on a bad argument. NativeStep.step always passes fresh outputs.

    It runs every layer (ln0, ln1, time mix with the WKV update, ln2, channel mix), then ln_out and the
    head. :func:`build_step` gives it ``fn`` (the C function) and ``model_struct`` (a :class:`StepModel`).
    """

    def __init__(self, lib: ctypes.CDLL, model, fn, model_struct: ctypes.Structure, d: ModelDescription):
        self.lib = lib
        self.emb = model.emb  # not the model: the cache below is keyed by it, weakly
        self.vocab_size = model.config.vocab_size
        self.fn = fn
        self.fn.restype = ctypes.c_int32
        self.fn.argtypes = [ctypes.c_void_p, ctypes.c_int32] + [ctypes.c_void_p] * 8
        self.model_struct = model_struct
        self.description = d  # what the C side points into, kept alive; and what to check is current

    def is_current(self) -> bool:
        """Whether the model still holds the layers and weights this step was built from (a layer
        replaced by quantization or an adapter, a weight reassigned or a copied vector edited in place
        means it must be built again). Moves, conversions and ``load_state_dict`` are caught by the
        model itself (it drops its step)."""
        d = self.description
        layers_in_place = all(
            getattr(owner, name) is layer and getattr(layer, "weight", None) is weight
            for owner, name, layer, weight in d.modules
        )
        return layers_in_place and all(t._version == v for t, v in d.copied)

    def step(self, tokens: torch.Tensor, state):
        """tokens (B,) int64, state (RWKVState) -> (logits (B, V) fp32, new RWKVState)."""
        dtype = state.att_shift.dtype
        x = self.emb(tokens).float().contiguous()  # (B, C)
        att_in = state.att_shift.float().contiguous()  # (L, B, C)
        ffn_in = state.ffn_shift.float().contiguous()
        wkv_in = state.wkv.contiguous()  # fp32
        att_out, ffn_out, wkv_out = (
            torch.empty_like(att_in),
            torch.empty_like(ffn_in),
            torch.empty_like(wkv_in),
        )
        logits = torch.empty(x.shape[0], self.vocab_size)  # (B, V)
        rc = self.fn(
            ctypes.addressof(self.model_struct), x.shape[0],
            *(t.data_ptr() for t in (x, att_in, wkv_in, ffn_in, att_out, wkv_out, ffn_out, logits)),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"native step failed with code {rc}")
        return logits, RWKVState(att_out.to(dtype), wkv_out, ffn_out.to(dtype))


def build_step(model, lib: ctypes.CDLL, fn, layer_type, layer_of) -> NativeStep:
    """The :class:`NativeStep` of ``model`` through the C function ``fn``, ``layer_of(d, block)`` describing
    each block as a ``layer_type`` (with :meth:`ModelDescription.layer`). Raises :class:`Unsupported`
    where a weight has no kernel."""
    cfg = model.config
    if cfg.n_head:
        heads, head_size, gn_eps = cfg.n_head, cfg.head_size, model.blocks[0].att.ln_x.eps
    else:  # RWKV-4: no heads (one of its time-mix width) and no GroupNorm
        heads, head_size, gn_eps = 1, cfg.dim_att, 0.0
    d = ModelDescription(model)
    layers = (layer_type * cfg.n_layer)(*(layer_of(d, block) for block in model.blocks))
    d.keep.append(layers)
    ln0 = model.blocks[0].ln0
    struct = StepModel(
        cfg.n_layer, cfg.n_embd, heads, head_size, cfg.dim_ffn, cfg.vocab_size, model.ln_out.eps, gn_eps,
        d.vector(ln0.weight), d.vector(ln0.bias), d.vector(model.ln_out.weight), d.vector(model.ln_out.bias),
        d.matrix(model, "head"), ctypes.addressof(layers),
    )  # fmt: skip
    return NativeStep(lib, model, fn, struct, d)


VERSION_MODULES = {"4": "v4", "5.2": "v5", "6": "v6", "7": "v7"}


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> NativeStep, or None: has none


def step_for(model) -> NativeStep | None:
    """The native step ``model`` decodes one token with (built on first use and kept while current), or
    None: the model then decodes on the torch path."""
    if not is_enabled():
        return None
    step = _STEPS.get(model, False)
    if step is False or (step is not None and not step.is_current()):
        step = _STEPS[model] = native_step_for(model)
    return step


def forget(model) -> None:
    """Drop ``model``'s step (its weights moved, converted or were loaded): the next call builds again."""
    _STEPS.pop(model, None)


def decode_path(version: str) -> str:
    """One line: the path a model of ``version`` loaded as rwkvkit loads it (fp32, bf16 or quantized)
    decodes one token on (what ``rwkvkit info`` prints)."""
    lib = load()
    if lib is None or version not in VERSION_MODULES:
        return status() if lib is None else f"pure torch (no native step for RWKV-{version})"
    return f"native, up to {MAX_ROWS} rows a call ({lib.rk_build_info().decode()})"


def native_step_for(model) -> NativeStep | None:
    """The native step of ``model`` (fp32 / bf16 / int8 / int4 on the CPU), or None where there is none:
    the library is off, the version has no native step yet, or a layer has no native kernel."""
    lib = load()
    name = VERSION_MODULES.get(model.config.version)
    if lib is None or name is None or model.device.type != "cpu":
        return None
    try:
        module = importlib.import_module(f"rwkvkit.native.{name}")
    except ModuleNotFoundError:
        return None
    try:
        return module.build(model, lib)
    except Unsupported:
        return None
