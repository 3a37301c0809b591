"""RWKV-7 ("Goose", x070): time mix, channel mix, model class, config for new models and official init.

Parameters are named exactly like the official checkpoint keys; the shared model loop
(:class:`rwkvkit.models.common.RWKVModel`) runs them in parallel or RNN mode with the same weights and
code, built from :mod:`rwkvkit.models.layers`.

    TimeMix: xx = x_prev - x; x{r,w,k,v,a,g} = x + xx * x_{r,w,k,v,a,g}
             decay d = exp(-exp(-0.5) * sigmoid(w0 + tanh(xw w1) w2)); iclr a = sigmoid(a0 + xa a1 a2)
             v mixed towards layer 0's v (v_first); kk = normalize(k * k_k); k = k * (1 + (a - 1) k_a)
             S_t = S_{t-1} (diag(d) - kk (a kk)^T) + v k^T, y = S_t r     (WKV-7, state [value, key])
             out = Wo((GroupNorm(y) + (sum_head r k r_k) v) * g),  g = sigmoid(xg g1) g2
    ChannelMix: Wv(relu(Wk (x + xx * x_k))^2)
An optional ``att.time_state`` (H, N, N) per layer (state tuning, [value, key]) is the initial wkv state of
every new sequence. The reference package's v7 class loads such a file and ignores the keys; to use the
tuned state there, pass ``state[3 * i + 1] = sd[f"blocks.{i}.att.time_state"]`` (the same layout).

Legend: B batch, T time, C = n_embd, H heads, N head size, F ffn width, V vocab, L layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkvkit.blas import linear, matmul
from rwkvkit.config import ModelConfig
from rwkvkit.models.common import RWKVModel
from rwkvkit.models.init import heads_of, lora_width, official_layers, orthogonal_
from rwkvkit.models.layers import (
    SquaredReluChannelMix,
    add_matrix_state_projections,
    channel_param,
    group_norm,
    run_wkv7,
    token_shift,
)

# log of the largest per-step decay factor; the decay is exp(-exp(-0.5) * sigmoid(z)), in (0.545, 1)
LOG_DECAY_SCALE = math.exp(-0.5)


class TimeMix(nn.Module):
    """The RWKV-7 attention replacement: data-dependent decay plus a rank-1 delta-rule state update."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (channel_param(C) for _ in range(6))
        self.w0 = channel_param(C)
        self.w1 = nn.Parameter(torch.zeros(C, config.d_decay))
        self.w2 = nn.Parameter(torch.zeros(config.d_decay, C))
        self.a0 = channel_param(C)
        self.a1 = nn.Parameter(torch.zeros(C, config.d_iclr))
        self.a2 = nn.Parameter(torch.zeros(config.d_iclr, C))
        self.has_value_lora = (layer_id > 0 or config.layer0_has_value_lora) and config.d_value > 0
        if self.has_value_lora:
            self.v0 = channel_param(C)
            self.v1 = nn.Parameter(torch.zeros(C, config.d_value))
            self.v2 = nn.Parameter(torch.zeros(config.d_value, C))
        self.g1 = nn.Parameter(torch.zeros(C, config.d_gate))
        self.g2 = nn.Parameter(torch.zeros(config.d_gate, C))
        self.k_k = channel_param(C)
        self.k_a = channel_param(C)
        self.r_k = nn.Parameter(torch.zeros(H, N))
        add_matrix_state_projections(self, config, layer_id, gate=False)

    def forward(
        self,
        x: Tensor,
        shift: Tensor,
        wkv_state: Tensor,
        v_first: Tensor | None,
        wkv_out: Tensor | None = None,
        resets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) normalised input; shift (B, C); wkv_state (B, H, N, N) fp32; v_first (B, T, C)
        (None in layer 0, which makes it); resets (B, T) bool: packed rows (see RWKVModel.forward). Returns
        (out (B, T, C), new wkv_state, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, shift, resets) - x  # (B, T, C)
        mixes = torch.cat((self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)).unsqueeze(1)
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, xx, mixes).unbind(0)  # (6, 1, 1, C) -> each (B, T, C)

        r, k, v = linear(self.receptance, xr), linear(self.key, xk), linear(self.value, xv)  # (B, T, C)
        decay_logit = (self.w0 + matmul(torch.tanh(matmul(xw, self.w1)), self.w2)).float()
        log_decay = torch.sigmoid(decay_logit) * -LOG_DECAY_SCALE  # (B, T, C) fp32, in [-0.61, 0]
        iclr = torch.sigmoid(self.a0 + matmul(matmul(xa, self.a1), self.a2))  # in-context learning rate
        g = matmul(torch.sigmoid(matmul(xg, self.g1)), self.g2)

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)  # (B, T, H, N)
        k = k * (1 + (iclr - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + matmul(matmul(xv, self.v1), self.v2))

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, H, N)

        rh, kh, vh = heads(r), heads(k), heads(v)
        y, wkv_state = run_wkv7(
            rh, heads(log_decay), kh, vh, -kk, kk * heads(iclr), wkv_state, wkv_out, resets
        )
        y = group_norm(self.ln_x, y.reshape(B, T, C), x.dtype)  # y (B, T, H, N) fp32 -> (B, T, C)
        bonus = (rh * kh * self.r_k).sum(dim=-1, keepdim=True) * vh  # (B, T, H, N)
        y = y + bonus.view(B, T, C)
        return linear(self.output, y * g * self.output_scale), wkv_state, v_first


class ChannelMix(SquaredReluChannelMix):
    """The RWKV-7 feed-forward: token shift, squared ReLU, no receptance."""

    has_receptance = False

    def add_shift_weights(self, C: int) -> None:
        self.x_k = channel_param(C)

    def shifted(self, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.addcmul(x, x_prev - x, self.x_k), None


class RWKV7(RWKVModel, version="7", time_mix=TimeMix, channel_mix=ChannelMix):
    """RWKV-7 language model. ``logits, state = model(tokens, state=None)``."""


Model = RWKV7  # the name every version module exports (rwkvkit.models.io.VERSIONS)


def new_shape(n_embd: int, head_size: int) -> dict[str, int | bool]:
    """Heads and widths of a new RWKV-7, the official trainer's (``io.new_config`` adds the rest).

    The formulas reproduce the released models (C=768: 64/64/32/128; C=2048: 96/96/64/256).
    """
    return dict(
        n_head=heads_of(n_embd, head_size),
        head_size=head_size,
        dim_ffn=4 * n_embd,
        d_decay=lora_width(1.8, n_embd**0.5),
        d_iclr=lora_width(1.8, n_embd**0.5),
        d_value=lora_width(1.3, n_embd**0.5),
        d_gate=lora_width(0.6, n_embd**0.8),
        layer0_has_value_lora=True,
    )


@torch.no_grad()
def init_official_(model: RWKV7) -> RWKV7:
    """Initialise every parameter with the official RWKV-7 from-scratch recipe (in place)."""
    C, N = model.config.n_embd, model.config.head_size
    for att, ffn, (n, fraction, ratio_0_to_1, ratio_1_to_almost_0) in official_layers(model):
        linear = (n / (C - 1) - 0.5).view(1, 1, C)
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = (z * z.abs()).view(1, 1, C)
        att.x_r.copy_(1 - fraction ** (0.2 * ratio_1_to_almost_0))
        att.x_w.copy_(1 - fraction ** (0.9 * ratio_1_to_almost_0))
        att.x_k.copy_(1 - fraction ** (0.7 * ratio_1_to_almost_0))
        att.x_v.copy_(1 - fraction ** (0.7 * ratio_1_to_almost_0))
        att.x_a.copy_(1 - fraction ** (0.9 * ratio_1_to_almost_0))
        att.x_g.copy_(1 - fraction ** (0.2 * ratio_1_to_almost_0))
        decay_speed = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1**0.3)
        att.w0.copy_(decay_speed.view(1, 1, C) + 0.5 + 2.5 * zigzag)
        att.a0.copy_(-0.19 + 0.3 * zigzag + 0.4 * linear)
        lora_pairs = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
        if att.has_value_lora:
            att.v0.copy_(0.73 - 0.4 * linear)
            lora_pairs.append((att.v1, att.v2))
        for down, up in lora_pairs:
            down.zero_()
            orthogonal_(up, 0.1)
        att.k_k.copy_(0.71 - 0.1 * linear)
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        if att.time_state is not None:
            att.time_state.zero_()
        ffn.x_k.copy_(1 - fraction ** (ratio_1_to_almost_0**4))
    return model
