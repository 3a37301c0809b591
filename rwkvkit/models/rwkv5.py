"""RWKV-5.2 ("Eagle", x052): time mix, model class, config for new models and official init.

Parameters are named exactly like the official checkpoint keys; the shared model loop
(:class:`rwkvkit.models.common.RWKVModel`) runs them in parallel or RNN mode with the same weights.
The channel mix is RWKV-4's (:class:`rwkvkit.models.rwkv4.ChannelMix`), with F = int(3.5 C) // 32 * 32.

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
import torch.nn.functional as F
from torch import nn

from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.models.common import (
    GROUPNORM_EPS,
    Block,
    RWKVModel,
    group_norm,
    init_shared_,
    project,
    ramps,
    time_mix_output_scale,
    time_state_param,
    token_shift,
)
from rwkvkit.models.rwkv4 import ChannelMix, mix
from rwkvkit.wkv import wkv6, wkv6_step


def head_params(config: ModelConfig) -> nn.Parameter:
    """A zero (H, N) parameter (time_decay of v5.2, time_faaaa of v5.2 and v6)."""
    return nn.Parameter(torch.zeros(config.n_head, config.head_size))


class MatrixStateTimeMix(nn.Module):
    """What the RWKV-5.2 and RWKV-6 time mixes share: the bonus ``time_faaaa`` (H, N), an optional tuned
    initial state, the five (C, C) projections, ``ln_x``, and :meth:`attend`, which ends both forwards."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        self.time_faaaa = head_params(config)
        self.time_state = time_state_param(config)
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)
        self.output_scale = time_mix_output_scale(layer_id)

    def attend(
        self,
        xr: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        xg: torch.Tensor,
        log_decay: torch.Tensor,
        wkv_state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token-shifted inputs x{r,k,v,g} (B, T, C) and the log-decay (B, T, H, N) -> (out, state)."""
        B, T, C = xr.shape
        H, N = self.n_head, self.head_size
        r = self.receptance(xr).float().view(B, T, H, N)
        k = self.key(xk).float().view(B, T, H, N)
        v = self.value(xv).float().view(B, T, H, N)
        g = F.silu(self.gate(xg))  # (B, T, C)
        y, wkv_state = wkv6(r, log_decay, k, v, self.time_faaaa.float(), wkv_state)  # y (B, T, H, N)
        y = group_norm(self.ln_x, y.reshape(B, T, C), xr.dtype)
        return self.output(y * g * self.output_scale), wkv_state

    def attend_step(
        self,
        xr: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        xg: torch.Tensor,
        log_decay: torch.Tensor,
        wkv_state: torch.Tensor,
        wkv_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend` for one token: x{r,k,v,g} (B, C), log-decay (B, H, N) (the decode fast path;
        the new state is written into ``wkv_out`` when given)."""
        B, C = xr.shape
        H, N = self.n_head, self.head_size
        r = project(self.receptance, xr).float().view(B, H, N)
        k = project(self.key, xk).float().view(B, H, N)
        v = project(self.value, xv).float().view(B, H, N)
        g = F.silu(project(self.gate, xg))  # (B, C)
        y, wkv_state = wkv6_step(r, log_decay, k, v, self.time_faaaa.float(), wkv_state, wkv_out)  # (B, H, N)
        y = F.group_norm(y.reshape(B, C), H, self.ln_x.weight.float(), self.ln_x.bias.float(), self.ln_x.eps)
        return project(self.output, y.to(xr.dtype) * g * self.output_scale), wkv_state


class TimeMix(MatrixStateTimeMix):
    """The RWKV-5.2 attention replacement: multi-head matrix state with a constant per-channel decay."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__(config, layer_id)
        C = config.n_embd
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_g = nn.Parameter(torch.zeros(1, 1, C))
        self.time_decay = head_params(config)

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor, carry: None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """x (B, T, C); shift (B, C); wkv_state (B, H, N, N) fp32 [value, key] -> (out, state, carry)."""
        B, T, _ = x.shape
        x_prev = token_shift(x, shift)  # (B, T, C)
        log_decay = (-torch.exp(self.time_decay.float())).expand(B, T, self.n_head, self.head_size)
        out, wkv_state = self.attend(
            mix(x, x_prev, self.time_mix_r),
            mix(x, x_prev, self.time_mix_k),
            mix(x, x_prev, self.time_mix_v),
            mix(x, x_prev, self.time_mix_g),
            log_decay,  # constant in time
            wkv_state,
        )
        return out, wkv_state, carry

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
        log_decay = (-torch.exp(self.time_decay.float())).expand(x.shape[0], self.n_head, self.head_size)
        out, wkv_state = self.attend_step(
            mix(x, shift, self.time_mix_r[0]),
            mix(x, shift, self.time_mix_k[0]),
            mix(x, shift, self.time_mix_v[0]),
            mix(x, shift, self.time_mix_g[0]),
            log_decay,
            wkv_state,
            wkv_out,
        )
        return out, wkv_state, carry


class RWKV5(RWKVModel):
    """RWKV-5.2 language model. ``logits, state = model(tokens, state=None)``."""

    version = "5.2"

    def make_block(self, config: ModelConfig, layer_id: int) -> Block:
        return Block(config, layer_id, TimeMix(config, layer_id), ChannelMix(config, layer_id))


Model = RWKV5  # the name every version module exports (rwkvkit.models.io.VERSIONS)


def new_config(n_layer: int, n_embd: int, vocab_size: int, head_size: int = 64) -> ModelConfig:
    """Config for a new RWKV-5.2 trained from scratch (F = int(3.5 C) // 32 * 32, as the trainer picks)."""
    if n_embd % head_size:
        raise RwkvkitError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
    return ModelConfig(
        version="5.2",
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_head=n_embd // head_size,
        head_size=head_size,
        dim_ffn=int(n_embd * 3.5) // 32 * 32,
    )


def time_decay_init(C: int, r01: float, n: torch.Tensor) -> torch.Tensor:
    """Official decay speeds of v5.2 / v6: -6 + 5 (n / (C - 1)) ** (0.7 + 1.3 r01), per channel (C,)."""
    return -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01)


def time_faaaa_init(C: int, r01: float, n: torch.Tensor) -> torch.Tensor:
    """Official bonus of v5.2 / v6: r01 (1 - n / (C - 1)) + 0.1 ((n + 1) % 3 - 1), per channel (C,)."""
    return r01 * (1 - n / (C - 1)) + 0.1 * ((n + 1) % 3 - 1)


@torch.no_grad()
def init_official_(model: RWKV5) -> RWKV5:
    """Initialise every parameter with the official RWKV-5.2 from-scratch recipe (in place)."""
    init_shared_(model)
    cfg = model.config
    C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
    for layer_id, block in enumerate(model.blocks):
        n, ddd, r01, r10 = ramps(C, layer_id, cfg.n_layer, model.device)
        att, ffn = block.att, block.ffn
        att.time_mix_k.copy_(ddd**r10)
        att.time_mix_v.copy_(ddd**r10 + 0.3 * r01)
        att.time_mix_r.copy_(ddd ** (0.5 * r10))
        att.time_mix_g.copy_(ddd ** (0.5 * r10))
        att.time_decay.copy_(time_decay_init(C, r01, n).view(H, N))
        att.time_faaaa.copy_(time_faaaa_init(C, r01, n).view(H, N))
        if att.time_state is not None:
            att.time_state.zero_()
        ffn.time_mix_k.copy_(ddd**r10)
        ffn.time_mix_r.copy_(ddd**r10)
    return model
