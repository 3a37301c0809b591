"""RWKV-4 ("Raven", Pile models): time mix, channel mix, model class, config for new models, official init.

Parameters are named exactly like the official checkpoint keys; the shared model loop
(:class:`rwkvkit.models.common.RWKVModel`) runs them in parallel or RNN mode with the same weights.

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
from torch import nn

from rwkvkit.config import ModelConfig
from rwkvkit.models.common import (
    Block,
    RWKVModel,
    channel_mix_key_scale,
    init_shared_,
    project,
    ramps,
    time_mix_output_scale,
    token_shift,
)
from rwkvkit.wkv import wkv4, wkv4_step


def mix(x: torch.Tensor, x_prev: torch.Tensor, time_mix: torch.Tensor) -> torch.Tensor:
    """The v4/v5 token shift: x * time_mix + x_prev * (1 - time_mix)."""
    return x * time_mix + x_prev * (1 - time_mix)


class TimeMix(nn.Module):
    """The RWKV-4 attention replacement: a per-channel decaying weighted average of past values."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, A = config.n_embd, config.dim_att
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_first = nn.Parameter(torch.zeros(A))
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.output_scale = time_mix_output_scale(layer_id)

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor, carry: None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """x (B, T, C); shift (B, C); wkv_state (B, 3, A) fp32 (aa, bb, pp). Returns (out, state, carry)."""
        x_prev = token_shift(x, shift)  # (B, T, C)
        k = self.key(mix(x, x_prev, self.time_mix_k)).float()  # (B, T, A)
        v = self.value(mix(x, x_prev, self.time_mix_v)).float()
        r = torch.sigmoid(self.receptance(mix(x, x_prev, self.time_mix_r)))
        log_decay = -torch.exp(self.time_decay.float())  # (A,)
        y, (aa, bb, pp) = wkv4(log_decay, self.time_first.float(), k, v, wkv_state.unbind(1))
        out = self.output(r * y.to(r.dtype) * self.output_scale)
        return out, torch.stack((aa, bb, pp), dim=1), carry

    def step(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv_state: torch.Tensor,
        carry: None,
        wkv_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """:meth:`forward` for one token, x and shift (B, C): the decode fast path (the new state is
        written into ``wkv_out`` when given)."""
        k = project(self.key, mix(x, shift, self.time_mix_k[0])).float()  # (B, A)
        v = project(self.value, mix(x, shift, self.time_mix_v[0])).float()
        r = torch.sigmoid(project(self.receptance, mix(x, shift, self.time_mix_r[0])))
        log_decay = -torch.exp(self.time_decay.float())
        y, state = wkv4_step(log_decay, self.time_first.float(), k, v, wkv_state, out=wkv_out)  # y (B, A)
        return project(self.output, r * y.to(r.dtype) * self.output_scale), state, carry


class ChannelMix(nn.Module):
    """The RWKV-4 (and 5.2) feed-forward: token shift, squared ReLU, sigmoid receptance gate."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, config.dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(config.dim_ffn, C, bias=False)
        self.key_scale = channel_mix_key_scale(layer_id)
        self.output_scale = self.key_scale**2

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        x_prev = token_shift(x, shift)  # (B, T, C)
        r = torch.sigmoid(self.receptance(mix(x, x_prev, self.time_mix_r)))
        k = torch.relu(self.key(mix(x, x_prev, self.time_mix_k))) * self.key_scale  # (B, T, F)
        return r * self.value(k * k)

    def step(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for one token, x and shift (B, C): the decode fast path."""
        r = torch.sigmoid(project(self.receptance, mix(x, shift, self.time_mix_r[0])))
        k = torch.relu_(project(self.key, mix(x, shift, self.time_mix_k[0]))).mul_(self.key_scale)
        return r * project(self.value, k * k)


class RWKV4(RWKVModel):
    """RWKV-4 language model. ``logits, state = model(tokens, state=None)``."""

    version = "4"

    def make_block(self, config: ModelConfig, layer_id: int) -> Block:
        return Block(config, layer_id, TimeMix(config, layer_id), ChannelMix(config, layer_id))


Model = RWKV4  # the name every version module exports (rwkvkit.models.io.VERSIONS)


def new_config(n_layer: int, n_embd: int, vocab_size: int, head_size: int = 0) -> ModelConfig:
    """Config for a new RWKV-4 trained from scratch (``head_size`` is ignored: RWKV-4 has no heads)."""
    return ModelConfig(
        version="4",
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_head=0,
        head_size=0,
        dim_ffn=4 * n_embd,
    )


@torch.no_grad()
def init_official_(model: RWKV4) -> RWKV4:
    """Initialise every parameter with the official RWKV-4 from-scratch recipe (in place)."""
    init_shared_(model)
    cfg = model.config
    A = cfg.dim_att
    for layer_id, block in enumerate(model.blocks):
        _, ddd, r01, r10 = ramps(cfg.n_embd, layer_id, cfg.n_layer, model.device)
        n = torch.arange(A, device=model.device, dtype=torch.float32)
        att, ffn = block.att, block.ffn
        att.time_decay.copy_(-5 + 8 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * r01))
        zigzag = ((n + 1) % 3 - 1) * 0.5
        att.time_first.copy_(math.log(0.3) + zigzag)
        att.time_mix_k.copy_(ddd**r10)
        att.time_mix_v.copy_(ddd**r10 + 0.3 * r01)
        att.time_mix_r.copy_(ddd ** (0.5 * r10))
        ffn.time_mix_k.copy_(ddd**r10)
        ffn.time_mix_r.copy_(ddd**r10)
    return model
