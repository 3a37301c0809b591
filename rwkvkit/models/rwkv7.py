"""RWKV-7 ("Goose", x070): time mix, channel mix, model class, config for new models and official init.

Parameters are named exactly like the official checkpoint keys; the shared model loop
(:class:`rwkvkit.models.common.RWKVModel`) runs them in parallel or RNN mode with the same weights.

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
from torch import nn

from rwkvkit.blas import matmul
from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.models.common import (
    GROUPNORM_EPS,
    Block,
    RWKVModel,
    channel_mix_key_scale,
    group_norm,
    init_shared_,
    lora_width,
    orthogonal_,
    project,
    ramps,
    time_mix_output_scale,
    time_state_param,
    token_shift,
)
from rwkvkit.wkv import wkv7, wkv7_step

# log of the largest per-step decay factor; the decay is exp(-exp(-0.5) * sigmoid(z)), in (0.545, 1)
LOG_DECAY_SCALE = math.exp(-0.5)


class TimeMix(nn.Module):
    """The RWKV-7 attention replacement: data-dependent decay plus a rank-1 delta-rule state update."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size = H, N

        def vec() -> nn.Parameter:
            return nn.Parameter(torch.zeros(1, 1, C))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0 = vec()
        self.w1 = nn.Parameter(torch.zeros(C, config.d_decay))
        self.w2 = nn.Parameter(torch.zeros(config.d_decay, C))
        self.a0 = vec()
        self.a1 = nn.Parameter(torch.zeros(C, config.d_iclr))
        self.a2 = nn.Parameter(torch.zeros(config.d_iclr, C))
        self.has_value_lora = (layer_id > 0 or config.layer0_has_value_lora) and config.d_value > 0
        if self.has_value_lora:
            self.v0 = vec()
            self.v1 = nn.Parameter(torch.zeros(C, config.d_value))
            self.v2 = nn.Parameter(torch.zeros(config.d_value, C))
        self.g1 = nn.Parameter(torch.zeros(C, config.d_gate))
        self.g2 = nn.Parameter(torch.zeros(config.d_gate, C))
        self.k_k = vec()
        self.k_a = vec()
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.time_state = time_state_param(config)
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)
        self.output_scale = time_mix_output_scale(layer_id)

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) normalised input; shift (B, C); wkv_state (B, H, N, N) fp32.

        Returns (out (B, T, C), new wkv_state, v_first (B, T, C)).
        """
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, shift) - x  # (B, T, C)
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)  # (B, T, C)
        k = self.key(xk)
        v = self.value(xv)
        decay_logit = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        log_decay = -LOG_DECAY_SCALE * torch.sigmoid(decay_logit.float())  # (B, T, C) fp32, in [-0.61, 0]
        iclr = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate, (B, T, C)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (iclr - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, H, N)

        y, wkv_state = wkv7(
            heads(r.float()), heads(log_decay), heads(k), heads(v), heads(-kk), heads(kk * iclr), wkv_state
        )  # y (B, T, H, N) fp32
        y = group_norm(self.ln_x, y.reshape(B, T, C), x.dtype)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)  # (B, T, H, N)
        y = y + bonus.view(B, T, C)
        return self.output(y * g * self.output_scale), wkv_state, v_first

    def step(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv_state: torch.Tensor,
        v_first: torch.Tensor | None,
        wkv_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` for one token, x and shift (B, C): the decode fast path (fewer, fused ops; the
        new state is written into ``wkv_out`` when given)."""
        B, C = x.shape
        H, N = self.n_head, self.head_size
        mixes = torch.cat((self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))  # (6, 1, C)
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, shift - x, mixes).unbind(0)  # each (B, C)
        r, k, v = project(self.receptance, xr), project(self.key, xk), project(self.value, xv)
        decay_logit = (self.w0[0] + matmul(torch.tanh(matmul(xw, self.w1)), self.w2)).float()
        log_decay = torch.sigmoid(decay_logit) * -LOG_DECAY_SCALE  # (B, C) fp32
        iclr = torch.sigmoid(self.a0[0] + matmul(matmul(xa, self.a1), self.a2))
        g = matmul(torch.sigmoid(matmul(xg, self.g1)), self.g2)
        kk = F.normalize((k * self.k_k[0]).view(B, H, N), dim=-1, p=2.0)  # (B, H, N)
        k = k * (1 + (iclr - 1) * self.k_a[0])
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0[0] + matmul(matmul(xv, self.v1), self.v2))
        kh, vh, rh = k.view(B, H, N), v.view(B, H, N), r.view(B, H, N)
        y, wkv_state = wkv7_step(
            rh.float(), log_decay.view(B, H, N), kh.float(), vh.float(), -kk.float(),
            (kk * iclr.view(B, H, N)).float(), wkv_state, wkv_out,
        )  # fmt: skip
        y = F.group_norm(y.reshape(B, C), H, self.ln_x.weight.float(), self.ln_x.bias.float(), self.ln_x.eps)
        y = y.to(x.dtype) + ((rh * kh * self.r_k).sum(-1, keepdim=True) * vh).view(B, C)  # + the bonus
        return project(self.output, y * g * self.output_scale), wkv_state, v_first


class ChannelMix(nn.Module):
    """The RWKV-7 feed-forward: token shift, squared ReLU, no receptance."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, config.dim_ffn, bias=False)
        self.value = nn.Linear(config.dim_ffn, C, bias=False)
        self.key_scale = channel_mix_key_scale(layer_id)
        self.output_scale = self.key_scale**2

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        xx = token_shift(x, shift) - x  # (B, T, C)
        k = torch.relu(self.key(x + xx * self.x_k)) * self.key_scale  # (B, T, F)
        return self.value(k * k)

    def step(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for one token, x and shift (B, C): the decode fast path."""
        k = torch.relu_(project(self.key, torch.addcmul(x, shift - x, self.x_k[0]))).mul_(self.key_scale)
        return project(self.value, k * k)


class RWKV7(RWKVModel):
    """RWKV-7 language model. ``logits, state = model(tokens, state=None)``."""

    version = "7"

    def make_block(self, config: ModelConfig, layer_id: int) -> Block:
        return Block(config, layer_id, TimeMix(config, layer_id), ChannelMix(config, layer_id))


Model = RWKV7  # the name every version module exports (rwkvkit.models.io.VERSIONS)


def new_config(n_layer: int, n_embd: int, vocab_size: int, head_size: int = 64) -> ModelConfig:
    """Config for a new RWKV-7 trained from scratch, with the official trainer's low-rank widths.

    The formulas reproduce the released models (C=768: 64/64/32/128; C=2048: 96/96/64/256).
    """
    if n_embd % head_size:
        raise RwkvkitError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
    return ModelConfig(
        version="7",
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_head=n_embd // head_size,
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
    init_shared_(model)
    cfg = model.config
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer
    for layer_id, block in enumerate(model.blocks):
        n, ddd, r01, r10 = ramps(C, layer_id, L, model.device)
        linear = (n / (C - 1) - 0.5).view(1, 1, C)
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = (z * z.abs()).view(1, 1, C)
        att, ffn = block.att, block.ffn
        att.x_r.copy_(1 - ddd ** (0.2 * r10))
        att.x_w.copy_(1 - ddd ** (0.9 * r10))
        att.x_k.copy_(1 - ddd ** (0.7 * r10))
        att.x_v.copy_(1 - ddd ** (0.7 * r10))
        att.x_a.copy_(1 - ddd ** (0.9 * r10))
        att.x_g.copy_(1 - ddd ** (0.2 * r10))
        decay_speed = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
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
        ffn.x_k.copy_(1 - ddd ** (r10**4))
    return model
