"""Small random checkpoints in the official BlinkDL layout: one table of keys and shapes per version.

Independent of rwkvkit's model code on purpose: parity tests feed these files to both rwkvkit and the
reference ``rwkv`` package, so the tables below are a second statement of the official layout, written
from the checkpoint-layout table of the architecture doc (not read off rwkvkit's modules). Each row names
a key, its shape in the dims of the version (C = n_embd, A = dim_att, F = dim_ffn, H heads of size N,
V = vocab_size, D_* the low-rank widths) and how its random values are drawn, with the scales of trained
weights; one writer turns a table into a state dict. Tensors are drawn in the order of the rows, which is
the order of the official files. ``random_state_dict(version, ...)`` picks the builder of one version.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Init(NamedTuple):
    """How a tensor's values are drawn: uniform in [lo, hi), or normal * scale + shift.

    ``scale`` may name a dim: the scale is then dim ** -0.5 (a weight scaled by its fan-in).
    """

    kind: str  # "unif" or "randn"
    lo: float = 0.0
    hi: float = 1.0
    scale: float | str = 1.0
    shift: float = 0.0


def U(lo: float = 0.0, hi: float = 1.0) -> Init:
    return Init("unif", lo=lo, hi=hi)


def N(scale: float | str = 1.0, shift: float = 0.0) -> Init:
    return Init("randn", scale=scale, shift=shift)


class Row(NamedTuple):
    key: str  # under "blocks.{i}." for the rows of a block table
    shape: tuple[int | str, ...]  # ints, dim names, or products such as "5*D_MIX"
    init: Init
    when: str = "always"  # "always", "first_layer", "time_state" or "value_lora" (see _wanted)


LN_WEIGHT, LN_BIAS, MIX = U(0.8, 1.2), N(0.1), U()


def _each(prefix: str, names: str | tuple[str, ...], shape: tuple, init: Init) -> tuple[Row, ...]:
    """One row per name (each character of a str): prefix + name, all of the same shape and init."""
    return tuple(Row(prefix + name, shape, init) for name in names)


def _linears(prefix: str, names: tuple[str, ...], out_dim: str, in_dim: str) -> tuple[Row, ...]:
    """``{prefix}{name}.weight`` (out_dim, in_dim) for each name, scaled by 1 / sqrt(in_dim)."""
    return tuple(Row(f"{prefix}{name}.weight", (out_dim, in_dim), N(in_dim)) for name in names)


# Keys outside the blocks: emb first and ln_out / head last, as in every official file.
MODEL_START = (Row("emb.weight", ("V", "C"), N()),)
MODEL_END = (
    Row("ln_out.weight", ("C",), LN_WEIGHT),
    Row("ln_out.bias", ("C",), LN_BIAS),
    *_linears("", ("head",), "V", "C"),
)

# The norms that open every block (ln0 only in block 0, before its ln1).
NORMS = (
    Row("ln0.weight", ("C",), LN_WEIGHT, "first_layer"),
    Row("ln0.bias", ("C",), LN_BIAS, "first_layer"),
    Row("ln1.weight", ("C",), LN_WEIGHT),
    Row("ln1.bias", ("C",), LN_BIAS),
    Row("ln2.weight", ("C",), LN_WEIGHT),
    Row("ln2.bias", ("C",), LN_BIAS),
)
LN_X = (Row("att.ln_x.weight", ("C",), U(0.5, 1.5)), Row("att.ln_x.bias", ("C",), LN_BIAS))
TIME_STATE = Row(
    "att.time_state", ("H", "N", "N"), N(0.5), "time_state"
)  # [value, key], as state tuning writes it


def _ffn_with_receptance(mix: str) -> tuple[Row, ...]:
    """The v4 / v5.2 / v6 channel mix: two mixes, key (F, C), receptance (C, C), value (C, F)."""
    return (
        *_each(f"ffn.{mix}_", ("k", "r"), (1, 1, "C"), MIX),
        *_linears("ffn.", ("key",), "F", "C"),
        *_linears("ffn.", ("receptance",), "C", "C"),
        *_linears("ffn.", ("value",), "C", "F"),
    )


V4_BLOCK = (
    *NORMS,
    Row("att.time_decay", ("A",), U(-6.0, 2.0)),  # decay exp(-exp(.)) from 0.9975 to 6e-4
    Row("att.time_first", ("A",), N(0.5, shift=math.log(0.3))),
    *_each("att.time_mix_", "kvr", (1, 1, "C"), MIX),
    *_linears("att.", ("key", "value", "receptance"), "A", "C"),
    *_linears("att.", ("output",), "C", "A"),
    *_ffn_with_receptance("time_mix"),
)

V5_HEADS_AND_PROJECTIONS = (
    Row("att.time_faaaa", ("H", "N"), N(0.5)),
    TIME_STATE,
    *_linears("att.", ("receptance", "key", "value", "gate", "output"), "C", "C"),
    *LN_X,
)

V5_BLOCK = (
    *NORMS,
    *_each("att.time_mix_", "kvrg", (1, 1, "C"), MIX),
    Row("att.time_decay", ("H", "N"), U(-6.0, 1.0)),
    *V5_HEADS_AND_PROJECTIONS,
    *_ffn_with_receptance("time_mix"),
)

V6_BLOCK = (
    *NORMS,
    *_each("att.time_maa_", "xwkvrg", (1, 1, "C"), MIX),
    Row("att.time_maa_w1", ("C", "5*D_MIX"), N("C")),
    Row("att.time_maa_w2", (5, "D_MIX", "C"), N(0.3)),
    Row("att.time_decay", (1, 1, "C"), U(-6.0, 1.0)),
    Row("att.time_decay_w1", ("C", "D_DECAY"), N("C")),
    Row("att.time_decay_w2", ("D_DECAY", "C"), N(0.3)),
    *V5_HEADS_AND_PROJECTIONS,
    *_ffn_with_receptance("time_maa"),
)

V7_BLOCK = (
    *NORMS,
    *_each("att.", ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"), (1, 1, "C"), MIX),
    Row("att.w0", (1, 1, "C"), N(1.0, shift=-0.5)),
    Row("att.w1", ("C", "D_DECAY"), N(0.3)),
    Row("att.w2", ("D_DECAY", "C"), N(0.3)),
    Row("att.a0", (1, 1, "C"), N(0.5)),
    Row("att.a1", ("C", "D_ICLR"), N(0.3)),
    Row("att.a2", ("D_ICLR", "C"), N(0.3)),
    Row("att.v0", (1, 1, "C"), N(0.5, shift=0.5), "value_lora"),
    Row("att.v1", ("C", "D_VALUE"), N(0.3), "value_lora"),
    Row("att.v2", ("D_VALUE", "C"), N(0.3), "value_lora"),
    Row("att.g1", ("C", "D_GATE"), N(0.3)),
    Row("att.g2", ("D_GATE", "C"), N(0.3)),
    Row("att.k_k", (1, 1, "C"), U(0.5, 1.0)),
    Row("att.k_a", (1, 1, "C"), U(0.8, 1.2)),
    Row("att.r_k", ("H", "N"), N(0.3)),
    TIME_STATE,
    *_linears("att.", ("receptance", "key", "value", "output"), "C", "C"),
    *LN_X,
    Row("ffn.x_k", (1, 1, "C"), MIX),
    *_linears("ffn.", ("key",), "F", "C"),
    *_linears("ffn.", ("value",), "C", "F"),
)

BLOCK_TABLES = {"4": V4_BLOCK, "5.2": V5_BLOCK, "6": V6_BLOCK, "7": V7_BLOCK}


# --------------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------------


def _size(dim: int | str, dims: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    return math.prod(int(part) if part.isdigit() else dims[part] for part in dim.split("*"))


def _draw(g: torch.Generator, shape: tuple[int, ...], init: Init, dims: dict[str, int]) -> torch.Tensor:
    if init.kind == "unif":
        return init.lo + (init.hi - init.lo) * torch.rand(*shape, generator=g)
    scale = dims[init.scale] ** -0.5 if isinstance(init.scale, str) else init.scale
    out = torch.randn(*shape, generator=g) * scale
    return out + init.shift if init.shift else out


def _wanted(row: Row, layer: int, flags: dict[str, bool]) -> bool:
    if row.when == "first_layer":
        return layer == 0
    if row.when == "value_lora":  # RWKV-7 layer 0 may lack v0/v1/v2 (it takes v as is)
        return layer > 0 or flags["layer0_value_lora"]
    return row.when == "always" or flags[row.when]


def write_state_dict(
    version: str, n_layer: int, dims: dict[str, int], dtype: torch.dtype, seed: int, **flags: bool
) -> dict[str, torch.Tensor]:
    """Random weights of one version's table: model start, n_layer blocks, model end, then cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    flags = {"time_state": False, "layer0_value_lora": True, **flags}
    rows = [(row.key, row) for row in MODEL_START]
    for i in range(n_layer):
        rows += [(f"blocks.{i}.{row.key}", row) for row in BLOCK_TABLES[version] if _wanted(row, i, flags)]
    rows += [(row.key, row) for row in MODEL_END]
    sd = {key: _draw(g, tuple(_size(d, dims) for d in row.shape), row.init, dims) for key, row in rows}
    return {k: v.to(dtype) for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# One builder per version: its knobs and default dims
# --------------------------------------------------------------------------------------------------


def random_v4_state_dict(
    n_layer: int = 2,
    n_embd: int = 64,
    vocab_size: int = 97,
    dim_att: int | None = None,
    dim_ffn: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random RWKV-4 weights (keys and shapes of the official trainer; time_decay spans fast to slow)."""
    dims = {"C": n_embd, "V": vocab_size, "A": dim_att or n_embd, "F": dim_ffn or 4 * n_embd}
    return write_state_dict("4", n_layer, dims, dtype, seed)


def _head_dims(n_embd: int, head_size: int, vocab_size: int, dim_ffn: int) -> dict[str, int]:
    """The dims of the versions with heads (5.2, 6, 7)."""
    return {"C": n_embd, "V": vocab_size, "H": n_embd // head_size, "N": head_size, "F": dim_ffn}


def random_v5_state_dict(
    n_layer: int = 2,
    n_embd: int = 64,
    head_size: int = 16,
    vocab_size: int = 97,
    dim_ffn: int | None = None,
    time_state: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random RWKV-5.2 weights: time_decay and time_faaaa (H, N), F = int(3.5 C) // 32 * 32."""
    dims = _head_dims(n_embd, head_size, vocab_size, dim_ffn or int(3.5 * n_embd) // 32 * 32)
    return write_state_dict("5.2", n_layer, dims, dtype, seed, time_state=time_state)


def random_v6_state_dict(
    n_layer: int = 2,
    n_embd: int = 64,
    head_size: int = 16,
    vocab_size: int = 97,
    dim_ffn: int | None = None,
    d_mix: int = 8,
    d_decay: int = 16,
    time_state: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random RWKV-6 weights: data-dependent token shift (time_maa_w1/w2) and decay (time_decay_w1/w2)."""
    dims = _head_dims(n_embd, head_size, vocab_size, dim_ffn or int(3.5 * n_embd) // 32 * 32)
    dims.update(D_MIX=d_mix, D_DECAY=d_decay)
    return write_state_dict("6", n_layer, dims, dtype, seed, time_state=time_state)


def random_v7_state_dict(
    n_layer: int = 2,
    n_embd: int = 64,
    head_size: int = 16,
    vocab_size: int = 97,
    dim_ffn: int | None = None,
    d_decay: int = 8,
    d_iclr: int = 8,
    d_value: int = 4,
    d_gate: int = 16,
    layer0_value_lora: bool = True,
    time_state: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random RWKV-7 weights with realistic scales, keys and shapes as the official trainer writes them."""
    dims = _head_dims(n_embd, head_size, vocab_size, dim_ffn or 4 * n_embd)
    dims.update(D_DECAY=d_decay, D_ICLR=d_iclr, D_VALUE=d_value, D_GATE=d_gate)
    flags = {"time_state": time_state, "layer0_value_lora": layer0_value_lora}
    return write_state_dict("7", n_layer, dims, dtype, seed, **flags)


BUILDERS = {
    "4": random_v4_state_dict,
    "5.2": random_v5_state_dict,
    "6": random_v6_state_dict,
    "7": random_v7_state_dict,
}


def random_state_dict(version: str, **kwargs) -> dict[str, torch.Tensor]:
    """Random weights of one RWKV version in the official layout (kwargs of that version's builder)."""
    return BUILDERS[version](**kwargs)
