"""RWKV-5.2 ("Eagle", x052): time mix, model class, config for new models and official init.

Parameters are named exactly like the official checkpoint keys; the shared model loop
(:class:`rwkvkit.models.common.RWKVModel`) runs them in parallel or RNN mode with the same weights and
code. The channel mix is RWKV-4's (:class:`rwkvkit.models.layers.LerpChannelMix`), with
F = int(3.5 C) // 32 * 32; the time mix is built on :class:`rwkvkit.models.layers.MatrixStateTimeMix`.

    TimeMix: x{k,v,r,g} = x * time_mix_{k,v,r,g} + x_prev * (1 - time_mix_{k,v,r,g})
             r, k, v = Wr xr, Wk xk, Wv xv; g = silu(Wg xg)
             per head (H heads of N): y_t = S_{t-1} r_t + (r_t . (u * k_t)) v_t,
             S_t = S_{t-1} diag(w) + v_t k_t^T, with the constant decay w = exp(-exp(time_decay)) and
             u = time_faaaa, both (H, N)                                (WKV-5/6, state [value, key])
             out = Wo(GroupNorm_H(y) * g)
An optional ``att.time_state`` (H, N, N) per layer (state tuning, stored [value, key]) is the initial
wkv state of every new sequence.

Legend: B batch, T time, C = n_embd, H heads, N head size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkvkit.config import ModelConfig
from rwkvkit.models.common import RWKVModel
from rwkvkit.models.init import heads_of, official_layers, time_decay_init, time_faaaa_init
from rwkvkit.models.layers import (
    LerpChannelMix,
    MatrixStateTimeMix,
    channel_param,
    head_params,
    lerp_shift,
    token_shift,
)

ChannelMix = LerpChannelMix  # RWKV-4's feed-forward


class TimeMix(MatrixStateTimeMix):
    """The RWKV-5.2 attention replacement: multi-head matrix state with a constant per-channel decay."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__(config, layer_id)
        C = config.n_embd
        self.time_mix_k, self.time_mix_v, self.time_mix_r, self.time_mix_g = (
            channel_param(C) for _ in range(4)
        )
        self.time_decay = head_params(config)

    def forward(
        self,
        x: Tensor,
        shift: Tensor,
        wkv_state: Tensor,
        v_first: None,
        wkv_out: Tensor | None = None,
        resets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, None]:
        """x (B, T, C); shift (B, C); wkv_state (B, H, N, N) fp32 [value, key] -> (out, state, None)."""
        B, T, _ = x.shape
        x_prev = token_shift(x, shift, resets)  # (B, T, C)
        log_decay = (-torch.exp(self.time_decay.float())).expand(B, T, self.n_head, self.head_size)
        out, wkv_state = self.project_wkv_output(
            lerp_shift(x, x_prev, self.time_mix_r),
            lerp_shift(x, x_prev, self.time_mix_k),
            lerp_shift(x, x_prev, self.time_mix_v),
            lerp_shift(x, x_prev, self.time_mix_g),
            log_decay,  # constant in time
            wkv_state,
            wkv_out,
            resets,
        )
        return out, wkv_state, v_first


class RWKV5(RWKVModel, version="5.2", time_mix=TimeMix, channel_mix=ChannelMix):
    """RWKV-5.2 language model. ``logits, state = model(tokens, state=None)``."""


Model = RWKV5  # the name every version module exports (rwkvkit.models.io.VERSIONS)


def new_shape(n_embd: int, head_size: int) -> dict[str, int | bool]:
    """Heads and widths of a new RWKV-5.2 (F = int(3.5 C) // 32 * 32); ``io.new_config`` adds the rest."""
    return dict(
        n_head=heads_of(n_embd, head_size),
        head_size=head_size,
        dim_ffn=int(n_embd * 3.5) // 32 * 32,
    )


@torch.no_grad()
def init_official_(model: RWKV5) -> RWKV5:
    """Initialise every parameter with the official RWKV-5.2 from-scratch recipe (in place)."""
    C, H, N = model.config.n_embd, model.config.n_head, model.config.head_size
    for att, ffn, (channel, fraction, ratio_0_to_1, ratio_1_to_almost_0) in official_layers(model):
        att.time_mix_k.copy_(fraction**ratio_1_to_almost_0)
        att.time_mix_v.copy_(fraction**ratio_1_to_almost_0 + 0.3 * ratio_0_to_1)
        att.time_mix_r.copy_(fraction ** (0.5 * ratio_1_to_almost_0))
        att.time_mix_g.copy_(fraction ** (0.5 * ratio_1_to_almost_0))
        att.time_decay.copy_(time_decay_init(C, ratio_0_to_1, channel).view(H, N))
        att.time_faaaa.copy_(time_faaaa_init(C, ratio_0_to_1, channel).view(H, N))
        if att.time_state is not None:
            att.time_state.zero_()
        ffn.time_mix_k.copy_(fraction**ratio_1_to_almost_0)
        ffn.time_mix_r.copy_(fraction**ratio_1_to_almost_0)
    return model
