"""RWKV-4 ("Raven", Pile models): time mix, channel mix, model class, config for new models, official init.

Parameters are named exactly like the official checkpoint keys; the shared model loop
(:class:`rwkvkit.models.common.RWKVModel`) runs them in parallel or RNN mode with the same weights and
code. The channel mix is :class:`rwkvkit.models.layers.LerpChannelMix` (shared with RWKV-5.2).

    TimeMix: x{k,v,r} = x * time_mix_{k,v,r} + x_prev * (1 - time_mix_{k,v,r})
             k = Wk xk, v = Wv xv, r = sigmoid(Wr xr)                    (per channel, no heads)
             wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (same without v)
             with w = -exp(time_decay), u = time_first                  (WKV-4, state (aa, bb, pp))
             out = Wo(r * wkv)
    ChannelMix: x{k,r} mixed the same way; out = sigmoid(Wr xr) * Wv(relu(Wk xk)^2)   (also RWKV-5.2's)

Legend: B batch, T time, C = n_embd, A = dim_att (the time-mix width, C in released models), F ffn width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rwkvkit.blas import linear
from rwkvkit.config import ModelConfig
from rwkvkit.models.common import RWKVModel
from rwkvkit.models.init import official_layers
from rwkvkit.models.layers import (
    LerpChannelMix,
    channel_param,
    lerp_shift,
    run_wkv4,
    time_mix_output_scale,
    token_shift,
)

ChannelMix = LerpChannelMix  # RWKV-4's feed-forward (RWKV-5.2 shares it)


class TimeMix(nn.Module):
    """The RWKV-4 attention replacement: a per-channel decaying weighted average of past values."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, A = config.n_embd, config.dim_att
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_first = nn.Parameter(torch.zeros(A))
        self.time_mix_k, self.time_mix_v, self.time_mix_r = (channel_param(C) for _ in range(3))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.output_scale = time_mix_output_scale(layer_id)

    def forward(
        self,
        x: Tensor,
        shift: Tensor,
        wkv_state: Tensor,
        v_first: None,
        wkv_out: Tensor | None = None,
        resets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, None]:
        """x (B, T, C); shift (B, C); wkv_state (B, 3, A) fp32 (aa, bb, pp) -> (out, new state, None)."""
        x_prev = token_shift(x, shift, resets)  # (B, T, C)
        k = linear(self.key, lerp_shift(x, x_prev, self.time_mix_k)).float()  # (B, T, A)
        v = linear(self.value, lerp_shift(x, x_prev, self.time_mix_v)).float()
        r = torch.sigmoid(linear(self.receptance, lerp_shift(x, x_prev, self.time_mix_r)))
        log_decay = -torch.exp(self.time_decay.float())  # (A,)
        y, wkv_state = run_wkv4(log_decay, self.time_first.float(), k, v, wkv_state, wkv_out, resets)
        return linear(self.output, r * y.to(r.dtype) * self.output_scale), wkv_state, v_first


class RWKV4(RWKVModel, version="4", time_mix=TimeMix, channel_mix=ChannelMix):
    """RWKV-4 language model. ``logits, state = model(tokens, state=None)``."""


Model = RWKV4  # the name every version module exports (rwkvkit.models.io.VERSIONS)


def new_shape(n_embd: int, head_size: int) -> dict[str, int | bool]:
    """Heads and widths of a new RWKV-4 (``head_size`` ignored: no heads); ``io.new_config`` adds the rest."""
    return dict(
        n_head=0,
        head_size=0,
        dim_ffn=4 * n_embd,
    )


@torch.no_grad()
def init_official_(model: RWKV4) -> RWKV4:
    """Initialise every parameter with the official RWKV-4 from-scratch recipe (in place)."""
    A = model.config.dim_att
    n = torch.arange(A, device=model.device, dtype=torch.float32)
    for att, ffn, (_, fraction, ratio_0_to_1, ratio_1_to_almost_0) in official_layers(model):
        att.time_decay.copy_(-5 + 8 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = ((n + 1) % 3 - 1) * 0.5
        att.time_first.copy_(math.log(0.3) + zigzag)
        att.time_mix_k.copy_(fraction**ratio_1_to_almost_0)
        att.time_mix_v.copy_(fraction**ratio_1_to_almost_0 + 0.3 * ratio_0_to_1)
        att.time_mix_r.copy_(fraction ** (0.5 * ratio_1_to_almost_0))
        ffn.time_mix_k.copy_(fraction**ratio_1_to_almost_0)
        ffn.time_mix_r.copy_(fraction**ratio_1_to_almost_0)
    return model
