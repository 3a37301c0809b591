"""RWKV-6 ("Finch", x060): time mix, channel mix, model class, config for new models and official init.

Parameters are named exactly like the official checkpoint keys; the shared model loop
(:class:`rwkvkit.models.common.RWKVModel`) runs them in parallel or RNN mode with the same weights and
code. The time mix is built on :class:`rwkvkit.models.layers.MatrixStateTimeMix`, the channel mix on
:class:`rwkvkit.models.layers.SquaredReluChannelMix`.

    TimeMix: xx = x_prev - x; xxx = x + xx * time_maa_x
             (mw, mk, mv, mr, mg) = tanh(xxx W1) W2 per branch   (data-dependent token shift, LoRA D_MIX)
             x{w,k,v,r,g} = x + xx * (time_maa_{w,k,v,r,g} + m{w,k,v,r,g})
             r, k, v = Wr xr, Wk xk, Wv xv; g = silu(Wg xg)
             w_t = exp(-exp(time_decay + tanh(xw Wd1) Wd2))    (data-dependent decay, LoRA D_DECAY)
             per head: y_t = S_{t-1} r_t + (r_t . (u * k_t)) v_t, S_t = S_{t-1} diag(w_t) + v_t k_t^T
             with u = time_faaaa (H, N)                         (WKV-5/6, state [value, key])
             out = Wo(GroupNorm_H(y) * g)
    ChannelMix: xk = x + xx * time_maa_k, xr likewise; out = sigmoid(Wr xr) * Wv(relu(Wk xk)^2)
Note that time_maa_* weight the PREVIOUS token (they are RWKV-4/5's 1 - time_mix). An optional
``att.time_state`` (H, N, N) per layer (state tuning, stored [value, key]) is the initial wkv state of
every new sequence.

Legend: B batch, T time, C = n_embd, H heads, N head size, D = d_mix, Dd = d_decay.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rwkvkit.blas import matmul
from rwkvkit.config import ModelConfig
from rwkvkit.models.common import RWKVModel
from rwkvkit.models.init import heads_of, official_layers, time_decay_init, time_faaaa_init
from rwkvkit.models.layers import MatrixStateTimeMix, SquaredReluChannelMix, channel_param, token_shift


class TimeMix(MatrixStateTimeMix):
    """The RWKV-6 attention replacement: matrix state with data-dependent decay and token shift."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__(config, layer_id)
        C, D, Dd = config.n_embd, config.d_mix, config.d_decay
        self.time_maa_x, self.time_maa_w, self.time_maa_k = (channel_param(C) for _ in range(3))
        self.time_maa_v, self.time_maa_r, self.time_maa_g = (channel_param(C) for _ in range(3))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
        self.time_decay = channel_param(C)
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, Dd))
        self.time_decay_w2 = nn.Parameter(torch.zeros(Dd, C))

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
        B, T, C = x.shape
        xx = token_shift(x, shift, resets) - x  # (B, T, C)
        xxx = torch.addcmul(x, xx, self.time_maa_x)
        m = torch.tanh(matmul(xxx, self.time_maa_w1)).view(B * T, 5, -1).transpose(0, 1)  # (5, B*T, D)
        mw, mk, mv, mr, mg = torch.bmm(m, self.time_maa_w2).view(5, B, T, C).unbind(0)
        xw = torch.addcmul(x, xx, self.time_maa_w + mw)
        decay_logit = self.time_decay + matmul(torch.tanh(matmul(xw, self.time_decay_w1)), self.time_decay_w2)
        log_decay = -torch.exp(decay_logit.float()).view(B, T, self.n_head, self.head_size)  # <= 0
        out, wkv_state = self.project_wkv_output(
            torch.addcmul(x, xx, self.time_maa_r + mr),
            torch.addcmul(x, xx, self.time_maa_k + mk),
            torch.addcmul(x, xx, self.time_maa_v + mv),
            torch.addcmul(x, xx, self.time_maa_g + mg),
            log_decay,
            wkv_state,
            wkv_out,
            resets,
        )
        return out, wkv_state, v_first


class ChannelMix(SquaredReluChannelMix):
    """The RWKV-6 feed-forward: RWKV-4's, with the token shift weighted by time_maa (previous token)."""

    def add_shift_weights(self, C: int) -> None:
        self.time_maa_k = channel_param(C)
        self.time_maa_r = channel_param(C)

    def shifted(self, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xx = x_prev - x  # (B, T, C)
        return torch.addcmul(x, xx, self.time_maa_k), torch.addcmul(x, xx, self.time_maa_r)


class RWKV6(RWKVModel, version="6", time_mix=TimeMix, channel_mix=ChannelMix):
    """RWKV-6 language model. ``logits, state = model(tokens, state=None)``."""


Model = RWKV6  # the name every version module exports (rwkvkit.models.io.VERSIONS)


def new_shape(n_embd: int, head_size: int) -> dict[str, int | bool]:
    """Heads and widths of a new RWKV-6, the official trainer's (``io.new_config`` adds the rest).

    F = int(3.5 C) // 32 * 32; D_MIX = 32 and D_DECAY = 64 (both doubled at C = 4096).
    """
    wide = 2 if n_embd == 4096 else 1
    return dict(
        n_head=heads_of(n_embd, head_size),
        head_size=head_size,
        dim_ffn=int(n_embd * 3.5) // 32 * 32,
        d_mix=32 * wide,
        d_decay=64 * wide,
    )


@torch.no_grad()
def init_official_(model: RWKV6) -> RWKV6:
    """Initialise every parameter with the official RWKV-6 from-scratch recipe (in place)."""
    C, H, N = model.config.n_embd, model.config.n_head, model.config.head_size
    for att, ffn, (channel, fraction, ratio_0_to_1, ratio_1_to_almost_0) in official_layers(model):
        att.time_maa_x.copy_(1 - fraction**ratio_1_to_almost_0)
        att.time_maa_w.copy_(1 - fraction**ratio_1_to_almost_0)
        att.time_maa_k.copy_(1 - fraction**ratio_1_to_almost_0)
        att.time_maa_v.copy_(1 - (fraction**ratio_1_to_almost_0 + 0.3 * ratio_0_to_1))
        att.time_maa_r.copy_(1 - fraction ** (0.5 * ratio_1_to_almost_0))
        att.time_maa_g.copy_(1 - fraction ** (0.5 * ratio_1_to_almost_0))
        att.time_maa_w1.zero_()
        att.time_maa_w2.uniform_(-0.01, 0.01)
        att.time_decay.copy_(time_decay_init(C, ratio_0_to_1, channel).view(1, 1, C))
        att.time_decay_w1.zero_()
        att.time_decay_w2.uniform_(-0.01, 0.01)
        att.time_faaaa.copy_(time_faaaa_init(C, ratio_0_to_1, channel).view(H, N))
        if att.time_state is not None:
            att.time_state.zero_()
        ffn.time_maa_k.copy_(1 - fraction**ratio_1_to_almost_0)
        ffn.time_maa_r.copy_(1 - fraction**ratio_1_to_almost_0)
    return model
