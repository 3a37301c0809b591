"""RWKV-7 ("Goose", x070): the model, in one readable file.

One set of parameters, named exactly like the official checkpoint keys, serves both modes:
``model(tokens)`` runs a whole sequence in parallel (chunked WKV operator) and ``model(token, state)``
with T = 1 runs one step of the recurrence. The returned state continues the sequences either way.

Legend: B batch, T time, C = n_embd, H heads, N head size, F ffn width, V vocab, L layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.state import RWKVState
from rwkvkit.wkv import wkv7

# log of the largest per-step decay factor; the decay is exp(-exp(-0.5) * sigmoid(z)), in (0.545, 1)
LOG_DECAY_SCALE = math.exp(-0.5)
GROUPNORM_EPS = 64e-5


def _shifted(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """x_prev - x, with ``prev`` (B, C) as the token before x[:, 0]."""
    x_prev = torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)  # (B, T, C)
    return x_prev - x


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
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) normalised input; shift (B, C); wkv_state (B, H, N, N) fp32.

        Returns (out (B, T, C), new wkv_state, v_first (B, T, C)).
        """
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = _shifted(x, shift)  # (B, T, C)
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
            heads(r), heads(log_decay), heads(k), heads(v), heads(-kk), heads(kk * iclr), wkv_state
        )  # y (B, T, H, N)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)  # (B, T, H, N)
        y = y + bonus.view(B, T, C)
        return self.output(y * g), wkv_state, v_first


class ChannelMix(nn.Module):
    """The RWKV-7 feed-forward: token shift, squared ReLU, no receptance."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.n_embd
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, config.dim_ffn, bias=False)
        self.value = nn.Linear(config.dim_ffn, C, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        xx = _shifted(x, shift)  # (B, T, C)
        k = torch.relu(self.key(x + xx * self.x_k)) ** 2  # (B, T, F)
        return self.value(k)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config)


class RWKV7(nn.Module):
    """RWKV-7 language model. ``logits, state = model(tokens, state=None)``.

    tokens: LongTensor (B, T); logits: float32 (B, T, V); state: RWKVState continuing the sequences.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.version != "7":
            raise ValueError(f"RWKV7 needs a version 7 config, got {config.version}")
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def zero_state(self, batch_size: int) -> RWKVState:
        return RWKVState.zeros(self.config, batch_size, device=self.device, dtype=self.dtype)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise RwkvkitError for an empty batch or ids outside [0, vocab_size)."""
        if tokens.dim() != 2:
            raise RwkvkitError(f"tokens must be a 2-D LongTensor (B, T), got shape {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise RwkvkitError("empty input: at least one token is needed")
        if tokens.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise RwkvkitError(f"tokens must be integers, got {tokens.dtype}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise RwkvkitError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def forward(
        self, tokens: torch.Tensor, state: RWKVState | None = None, *, last_only: bool = False
    ) -> tuple[torch.Tensor, RWKVState]:
        """Run tokens (B, T) from ``state`` (zeros if None). Returns (logits, new state).

        logits is float32 (B, T, V), or (B, 1, V) for the last position only when ``last_only``.
        """
        self.check_tokens(tokens)
        B, T = tokens.shape
        if state is None:
            state = self.zero_state(B)
        else:
            state.check_compatible(self.config, B)
        x = self.emb(tokens.to(self.device, torch.long))  # (B, T, C)
        att_shift, wkv_states, ffn_shift = [], [], []
        v_first = None
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            xa = block.ln1(x)
            out, wkv_i, v_first = block.att(xa, state.att_shift[i], state.wkv[i], v_first)
            x = x + out
            xf = block.ln2(x)
            x = x + block.ffn(xf, state.ffn_shift[i])
            att_shift.append(xa[:, -1])
            wkv_states.append(wkv_i)
            ffn_shift.append(xf[:, -1])
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.ln_out(x)).float()  # (B, T, V)
        new_state = RWKVState(torch.stack(att_shift), torch.stack(wkv_states), torch.stack(ffn_shift))
        return logits, new_state


def _lora_width(multiplier: float, base: float) -> int:
    """Low-rank width as the official trainer picks it: a multiple of 32, at least 32."""
    return max(32, int(round(multiplier * base / 32) * 32))


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
        d_decay=_lora_width(1.8, n_embd**0.5),
        d_iclr=_lora_width(1.8, n_embd**0.5),
        d_value=_lora_width(1.3, n_embd**0.5),
        d_gate=_lora_width(0.6, n_embd**0.8),
        layer0_has_value_lora=True,
    )


def _orthogonal_(weight: torch.Tensor, gain: float) -> None:
    """Orthogonal init; like the official trainer, a tall matrix gets gain * sqrt(rows / cols)."""
    rows, cols = weight.shape
    if rows > cols:
        gain *= math.sqrt(rows / cols)
    nn.init.orthogonal_(weight, gain=gain)


@torch.no_grad()
def init_official_(model: RWKV7) -> RWKV7:
    """Initialise every parameter with the official RWKV-7 from-scratch recipe (in place)."""
    cfg = model.config
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer
    dev = model.device
    n = torch.arange(C, device=dev, dtype=torch.float32)
    ddd = (n / C).view(1, 1, C)
    linear = (n / (C - 1) - 0.5).view(1, 1, C)
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = (z * z.abs()).view(1, 1, C)

    nn.init.uniform_(model.emb.weight, -1e-4, 1e-4)
    _orthogonal_(model.head.weight, 0.5)  # gain 0.5 * sqrt(V / C) when V > C
    model.ln_out.weight.fill_(1.0)
    model.ln_out.bias.zero_()
    for layer_id, block in enumerate(model.blocks):
        r01 = layer_id / max(L - 1, 1)
        r10 = 1.0 - layer_id / L
        for ln in (getattr(block, "ln0", None), block.ln1, block.ln2):
            if ln is not None:
                ln.weight.fill_(1.0)
                ln.bias.zero_()
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
            _orthogonal_(up, 0.1)
        att.k_k.copy_(0.71 - 0.1 * linear)
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        _orthogonal_(att.receptance.weight, 1.0)
        _orthogonal_(att.key.weight, 0.1)
        _orthogonal_(att.value.weight, 1.0)
        att.output.weight.zero_()
        att.ln_x.weight.fill_(((layer_id + 1) / L) ** 0.7)
        att.ln_x.bias.zero_()
        ffn.x_k.copy_(1 - ddd ** (r10**4))
        _orthogonal_(ffn.key.weight, 1.0)
        ffn.value.weight.zero_()
    return model
