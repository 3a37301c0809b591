"""Small random checkpoints in the official BlinkDL layout, written key by key from the architecture doc.

Independent of rwkvkit's model code on purpose: parity tests feed these files to both rwkvkit and the
reference ``rwkv`` package.
"""

from __future__ import annotations

import torch


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
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random RWKV-7 weights with realistic scales, keys and shapes as the official trainer writes them."""
    g = torch.Generator().manual_seed(seed)
    C, H, N = n_embd, n_embd // head_size, head_size
    F = dim_ffn or 4 * C

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def unif(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def linear(out_f, in_f):
        return randn(out_f, in_f, scale=in_f**-0.5)

    sd: dict[str, torch.Tensor] = {"emb.weight": randn(vocab_size, C)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"] = unif(C, lo=0.8, hi=1.2)
            sd[p + "ln0.bias"] = randn(C, scale=0.1)
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = unif(C, lo=0.8, hi=1.2)
            sd[p + ln + ".bias"] = randn(C, scale=0.1)
        a = p + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = unif(1, 1, C)
        sd[a + "w0"] = randn(1, 1, C, scale=1.0) - 0.5
        sd[a + "w1"] = randn(C, d_decay, scale=0.3)
        sd[a + "w2"] = randn(d_decay, C, scale=0.3)
        sd[a + "a0"] = randn(1, 1, C, scale=0.5)
        sd[a + "a1"] = randn(C, d_iclr, scale=0.3)
        sd[a + "a2"] = randn(d_iclr, C, scale=0.3)
        if i > 0 or layer0_value_lora:
            sd[a + "v0"] = randn(1, 1, C, scale=0.5) + 0.5
            sd[a + "v1"] = randn(C, d_value, scale=0.3)
            sd[a + "v2"] = randn(d_value, C, scale=0.3)
        sd[a + "g1"] = randn(C, d_gate, scale=0.3)
        sd[a + "g2"] = randn(d_gate, C, scale=0.3)
        sd[a + "k_k"] = unif(1, 1, C, lo=0.5, hi=1.0)
        sd[a + "k_a"] = unif(1, 1, C, lo=0.8, hi=1.2)
        sd[a + "r_k"] = randn(H, N, scale=0.3)
        for name in ("receptance", "key", "value", "output"):
            sd[a + name + ".weight"] = linear(C, C)
        sd[a + "ln_x.weight"] = unif(C, lo=0.5, hi=1.5)
        sd[a + "ln_x.bias"] = randn(C, scale=0.1)
        f = p + "ffn."
        sd[f + "x_k"] = unif(1, 1, C)
        sd[f + "key.weight"] = linear(F, C)
        sd[f + "value.weight"] = linear(C, F)
    sd["ln_out.weight"] = unif(C, lo=0.8, hi=1.2)
    sd["ln_out.bias"] = randn(C, scale=0.1)
    sd["head.weight"] = linear(vocab_size, C)
    return {k: v.to(dtype) for k, v in sd.items()}
