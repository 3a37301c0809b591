"""Small random checkpoints in the official BlinkDL layout, written key by key from the architecture doc.

Independent of rwkvkit's model code on purpose: parity tests feed these files to both rwkvkit and the
reference ``rwkv`` package. ``random_state_dict(version, ...)`` picks the builder of one version.
"""

from __future__ import annotations

import math

import torch


class _Random:
    """Seeded random tensors with the scales of trained weights."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * scale

    def unif(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=self.g)

    def linear(self, out_f: int, in_f: int) -> torch.Tensor:
        return self.randn(out_f, in_f, scale=in_f**-0.5)


def _embedding(rnd: _Random, C: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """emb and blocks.0.ln0, the first keys of every official file (dicts keep the insertion order)."""
    sd = {"emb.weight": rnd.randn(vocab_size, C)}
    sd["blocks.0.ln0.weight"] = rnd.unif(C, lo=0.8, hi=1.2)
    sd["blocks.0.ln0.bias"] = rnd.randn(C, scale=0.1)
    return sd


def _block_norms(rnd: _Random, sd: dict, i: int, C: int) -> None:
    for ln in ("ln1", "ln2"):
        sd[f"blocks.{i}.{ln}.weight"] = rnd.unif(C, lo=0.8, hi=1.2)
        sd[f"blocks.{i}.{ln}.bias"] = rnd.randn(C, scale=0.1)


def _output(rnd: _Random, sd: dict, C: int, vocab_size: int) -> None:
    sd["ln_out.weight"] = rnd.unif(C, lo=0.8, hi=1.2)
    sd["ln_out.bias"] = rnd.randn(C, scale=0.1)
    sd["head.weight"] = rnd.linear(vocab_size, C)


def _ffn_with_receptance(rnd: _Random, sd: dict, f: str, C: int, F: int, mix: str) -> None:
    """The v4 / v5.2 / v6 channel mix: key (F, C), receptance (C, C), value (C, F) and two mixes."""
    for name in ("k", "r"):
        sd[f + f"{mix}_{name}"] = rnd.unif(1, 1, C)
    sd[f + "key.weight"] = rnd.linear(F, C)
    sd[f + "receptance.weight"] = rnd.linear(C, C)
    sd[f + "value.weight"] = rnd.linear(C, F)


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
    rnd = _Random(seed)
    C = n_embd
    A, F = dim_att or C, dim_ffn or 4 * C
    sd = _embedding(rnd, C, vocab_size)
    for i in range(n_layer):
        _block_norms(rnd, sd, i, C)
        a = f"blocks.{i}.att."
        sd[a + "time_decay"] = rnd.unif(A, lo=-6.0, hi=2.0)  # decay exp(-exp(.)) from 0.9975 to 6e-4
        sd[a + "time_first"] = math.log(0.3) + rnd.randn(A, scale=0.5)
        for name in ("k", "v", "r"):
            sd[a + f"time_mix_{name}"] = rnd.unif(1, 1, C)
        sd[a + "key.weight"] = rnd.linear(A, C)
        sd[a + "value.weight"] = rnd.linear(A, C)
        sd[a + "receptance.weight"] = rnd.linear(A, C)
        sd[a + "output.weight"] = rnd.linear(C, A)
        _ffn_with_receptance(rnd, sd, f"blocks.{i}.ffn.", C, F, mix="time_mix")
    _output(rnd, sd, C, vocab_size)
    return {k: v.to(dtype) for k, v in sd.items()}


def _v5_v6_heads(rnd: _Random, sd: dict, a: str, H: int, N: int, time_state: bool) -> None:
    sd[a + "time_faaaa"] = rnd.randn(H, N, scale=0.5)
    if time_state:
        sd[a + "time_state"] = rnd.randn(H, N, N, scale=0.5)  # [value, key], as state tuning writes it


def _v5_v6_projections(rnd: _Random, sd: dict, a: str, C: int) -> None:
    for name in ("receptance", "key", "value", "gate", "output"):
        sd[a + name + ".weight"] = rnd.linear(C, C)
    sd[a + "ln_x.weight"] = rnd.unif(C, lo=0.5, hi=1.5)
    sd[a + "ln_x.bias"] = rnd.randn(C, scale=0.1)


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
    rnd = _Random(seed)
    C, H, N = n_embd, n_embd // head_size, head_size
    F = dim_ffn or int(3.5 * C) // 32 * 32
    sd = _embedding(rnd, C, vocab_size)
    for i in range(n_layer):
        _block_norms(rnd, sd, i, C)
        a = f"blocks.{i}.att."
        for name in ("k", "v", "r", "g"):
            sd[a + f"time_mix_{name}"] = rnd.unif(1, 1, C)
        sd[a + "time_decay"] = rnd.unif(H, N, lo=-6.0, hi=1.0)
        _v5_v6_heads(rnd, sd, a, H, N, time_state)
        _v5_v6_projections(rnd, sd, a, C)
        _ffn_with_receptance(rnd, sd, f"blocks.{i}.ffn.", C, F, mix="time_mix")
    _output(rnd, sd, C, vocab_size)
    return {k: v.to(dtype) for k, v in sd.items()}


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
    rnd = _Random(seed)
    C, H, N = n_embd, n_embd // head_size, head_size
    F = dim_ffn or int(3.5 * C) // 32 * 32
    sd = _embedding(rnd, C, vocab_size)
    for i in range(n_layer):
        _block_norms(rnd, sd, i, C)
        a = f"blocks.{i}.att."
        for name in ("x", "w", "k", "v", "r", "g"):
            sd[a + f"time_maa_{name}"] = rnd.unif(1, 1, C)
        sd[a + "time_maa_w1"] = rnd.randn(C, 5 * d_mix, scale=C**-0.5)
        sd[a + "time_maa_w2"] = rnd.randn(5, d_mix, C, scale=0.3)
        sd[a + "time_decay"] = rnd.unif(1, 1, C, lo=-6.0, hi=1.0)
        sd[a + "time_decay_w1"] = rnd.randn(C, d_decay, scale=C**-0.5)
        sd[a + "time_decay_w2"] = rnd.randn(d_decay, C, scale=0.3)
        _v5_v6_heads(rnd, sd, a, H, N, time_state)
        _v5_v6_projections(rnd, sd, a, C)
        _ffn_with_receptance(rnd, sd, f"blocks.{i}.ffn.", C, F, mix="time_maa")
    _output(rnd, sd, C, vocab_size)
    return {k: v.to(dtype) for k, v in sd.items()}


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
    rnd = _Random(seed)
    C, H, N = n_embd, n_embd // head_size, head_size
    F = dim_ffn or 4 * C
    sd = _embedding(rnd, C, vocab_size)
    for i in range(n_layer):
        _block_norms(rnd, sd, i, C)
        a = f"blocks.{i}.att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = rnd.unif(1, 1, C)
        sd[a + "w0"] = rnd.randn(1, 1, C, scale=1.0) - 0.5
        sd[a + "w1"] = rnd.randn(C, d_decay, scale=0.3)
        sd[a + "w2"] = rnd.randn(d_decay, C, scale=0.3)
        sd[a + "a0"] = rnd.randn(1, 1, C, scale=0.5)
        sd[a + "a1"] = rnd.randn(C, d_iclr, scale=0.3)
        sd[a + "a2"] = rnd.randn(d_iclr, C, scale=0.3)
        if i > 0 or layer0_value_lora:
            sd[a + "v0"] = rnd.randn(1, 1, C, scale=0.5) + 0.5
            sd[a + "v1"] = rnd.randn(C, d_value, scale=0.3)
            sd[a + "v2"] = rnd.randn(d_value, C, scale=0.3)
        sd[a + "g1"] = rnd.randn(C, d_gate, scale=0.3)
        sd[a + "g2"] = rnd.randn(d_gate, C, scale=0.3)
        sd[a + "k_k"] = rnd.unif(1, 1, C, lo=0.5, hi=1.0)
        sd[a + "k_a"] = rnd.unif(1, 1, C, lo=0.8, hi=1.2)
        sd[a + "r_k"] = rnd.randn(H, N, scale=0.3)
        if time_state:
            sd[a + "time_state"] = rnd.randn(H, N, N, scale=0.5)  # [value, key]
        for name in ("receptance", "key", "value", "output"):
            sd[a + name + ".weight"] = rnd.linear(C, C)
        sd[a + "ln_x.weight"] = rnd.unif(C, lo=0.5, hi=1.5)
        sd[a + "ln_x.bias"] = rnd.randn(C, scale=0.1)
        f = f"blocks.{i}.ffn."
        sd[f + "x_k"] = rnd.unif(1, 1, C)
        sd[f + "key.weight"] = rnd.linear(F, C)
        sd[f + "value.weight"] = rnd.linear(C, F)
    _output(rnd, sd, C, vocab_size)
    return {k: v.to(dtype) for k, v in sd.items()}


BUILDERS = {
    "4": random_v4_state_dict,
    "5.2": random_v5_state_dict,
    "6": random_v6_state_dict,
    "7": random_v7_state_dict,
}


def random_state_dict(version: str, **kwargs) -> dict[str, torch.Tensor]:
    """Random weights of one RWKV version in the official layout (kwargs of that version's builder)."""
    return BUILDERS[version](**kwargs)
