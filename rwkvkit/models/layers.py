"""The building blocks the version files share: token shift, norms, output scales, the squared-ReLU
channel mix, the matrix-state time mix (v5.2 / v6) and its projections, and the WKV calls of the mixes.

Every mix is written once over (B, T, C). Decoding one token at a time is made fast by what the mixes
call, not by a second copy of them: the products go through :mod:`rwkvkit.blas` (``linear``,
``matmul``: one fp32 CPU row through numpy's BLAS) and the WKV calls here (``run_wkv4/6/7``) take the
operators' single-token forms (``wkv*_step``) for one token without gradients, writing the new state
into the model's next state (``wkv_out``) in place.

Legend: B batch, T time, C = n_embd, H heads, N head size, F ffn width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkvkit.blas import fast_decode_on, linear
from rwkvkit.config import ModelConfig
from rwkvkit.wkv import wkv4, wkv4_step, wkv6, wkv6_step, wkv7, wkv7_step
from rwkvkit.wkv.kernels import step_usable
from rwkvkit.wkv.kernels import wkv7_step as triton_wkv7_step

GROUPNORM_EPS = 64e-5  # ln_x of v5.2 / v6 / v7 (the trainers' x / 8 with eps 1e-5 is the same thing)
RESCALE_EVERY = 6  # sub-block outputs are computed 2x smaller every this many layers (common.py)


def time_mix_output_scale(layer_id: int) -> float:
    """2^-(layer // 6): the factor a time mix applies to the input of its output projection."""
    return 2.0 ** -(layer_id // RESCALE_EVERY)


def channel_mix_key_scale(layer_id: int) -> float:
    """The factor a channel mix applies to relu(key(x)) before squaring: a power of two whose square
    (the channel mix's ``output_scale``) is at most 2^-(layer // 6), so relu(k)^2 cannot overflow first."""
    return 2.0 ** -math.ceil((layer_id // RESCALE_EVERY) / 2)


def token_shift(x: torch.Tensor, prev: torch.Tensor, resets: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev: x shifted one step back in time, with ``prev`` (B, C) as the token before x[:, 0]; zeros
    (a fresh sequence's shift) where ``resets`` (B, T) marks the start of a packed sequence."""
    if x.shape[1] == 1:
        return prev.unsqueeze(1)  # (B, 1, C), no copy
    x_prev = torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)  # (B, T, C)
    if resets is not None:
        x_prev = x_prev.masked_fill(resets.unsqueeze(-1), 0.0)
    return x_prev


def lerp_shift(x: torch.Tensor, x_prev: torch.Tensor, time_mix: torch.Tensor) -> torch.Tensor:
    """The v4 / v5.2 token shift: x * time_mix + x_prev * (1 - time_mix)."""
    return x * time_mix + x_prev * (1 - time_mix)


def layer_norm(ln: nn.LayerNorm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``ln`` applied in fp32 (whatever the weights' dtype), the result cast to ``dtype``."""
    weight, bias = ln.weight.float(), ln.bias.float()
    return F.layer_norm(x.float(), ln.normalized_shape, weight, bias, ln.eps).to(dtype)


def group_norm(gn: nn.GroupNorm, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-head normalisation ``gn`` of y (B, T, C), in fp32, the result cast to ``dtype``."""
    B, T, C = y.shape
    out = F.group_norm(y.reshape(B * T, C).float(), gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps)
    return out.view(B, T, C).to(dtype)


def channel_param(C: int) -> nn.Parameter:
    """A zero (1, 1, C) parameter (token-shift weights, per-channel biases)."""
    return nn.Parameter(torch.zeros(1, 1, C))


def head_params(config: ModelConfig) -> nn.Parameter:
    """A zero (H, N) parameter (time_decay of v5.2, time_faaaa of v5.2 and v6)."""
    return nn.Parameter(torch.zeros(config.n_head, config.head_size))


def time_state_param(config: ModelConfig) -> nn.Parameter | None:
    """``att.time_state`` (H, N, N) [value, key], the tuned initial wkv state of a layer (state tuning),
    when the config has one (v5.2 / v6 / v7), else None."""
    if not config.has_time_state:
        return None
    H, N = config.n_head, config.head_size
    return nn.Parameter(torch.zeros(H, N, N))


# ---------------------------------------------------------------------------------------------- WKV


def one_decode_token(x: torch.Tensor) -> bool:
    """Whether ``x`` (B, T, ...) is one token per sequence without gradients (decoding), where the WKV
    runs its single-token form (off under ``rwkvkit.blas.fast_decode(False)``)."""
    return x.shape[1] == 1 and not torch.is_grad_enabled() and fast_decode_on()


def _into(out: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """``state``, copied into ``out`` when given (the caller reads the new state from there)."""
    return state if out is None else out.copy_(state)


def run_wkv4(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor,
    out: Tensor | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """WKV-4 for k, v (B, T, A) fp32 from state (B, 3, A) (aa, bb, pp): (y (B, T, A), new state), the new
    state written into ``out`` when given. ``resets`` (B, T): packed rows (:mod:`rwkvkit.wkv.varlen`)."""
    if one_decode_token(k):
        y, state = wkv4_step(w, u, k[:, 0], v[:, 0], state, out=out)
        return y.unsqueeze(1), state
    y, (aa, bb, pp) = wkv4(w, u, k, v, state.unbind(1), resets=resets)
    return y, _into(out, torch.stack((aa, bb, pp), dim=1))


def run_wkv6(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    state: Tensor,
    out: Tensor | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """WKV-5/6 for r, w, k, v (B, T, H, N) fp32, u (H, N), state (B, H, N, N): (y (B, T, H, N), new
    state), the new state written into ``out`` when given. ``resets`` (B, T): packed rows."""
    if one_decode_token(r):
        y, state = wkv6_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], u, state, out)
        return y.unsqueeze(1), state
    y, state = wkv6(r, w, k, v, u, state, resets=resets)
    return y, _into(out, state)


def use_triton_step(state: Tensor, out: Tensor | None) -> bool:
    """Whether the WKV-7 decode step runs rwkvkit's Triton kernel: a contiguous fp32 CUDA state (and
    ``out``) with Triton importable; otherwise (CPU, no Triton) the PyTorch step."""
    return step_usable(state) and state.is_contiguous() and (out is None or out.is_contiguous())


def run_wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor,
    out: Tensor | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """WKV-7 for r, w, k, v, a, b (B, T, H, N) (w fp32), state (B, H, N, N): (y (B, T, H, N) fp32, new
    state), the new state written into ``out`` when given. ``resets`` (B, T): packed rows."""
    if one_decode_token(r):
        step = [t[:, 0].float() for t in (r, w, k, v, a, b)]
        if use_triton_step(state, out):
            y, state = triton_wkv7_step(*step, state, out)
        else:
            y, state = wkv7_step(*step, state, out)
        return y.unsqueeze(1), state
    y, state = wkv7(r.float(), w, k, v, a, b, state, resets=resets)
    return y, _into(out, state)


# ---------------------------------------------------------------------------------------------- mixes


class SquaredReluChannelMix(nn.Module):
    """The feed-forward of every version: out = [sigmoid(Wr xr) *] Wv(relu(Wk xk)^2), where xk and xr
    mix each token with the one before. A version names its token-shift weights (``add_shift_weights``,
    called first so the parameters keep the official order) and says how they mix (``shifted``); RWKV-7
    has no receptance (``has_receptance = False``)."""

    has_receptance = True

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.add_shift_weights(C)
        self.key = nn.Linear(C, config.dim_ffn, bias=False)
        if self.has_receptance:
            self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(config.dim_ffn, C, bias=False)
        self.key_scale = channel_mix_key_scale(layer_id)
        self.output_scale = self.key_scale**2

    def add_shift_weights(self, C: int) -> None:
        raise NotImplementedError

    def shifted(self, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(xk, xr) from x and x_prev (B, T, C); xr None without receptance."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, resets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, C), shift (B, C) -> out (B, T, C) (times ``output_scale``); resets (B, T): packed rows."""
        xk, xr = self.shifted(x, token_shift(x, shift, resets))
        # in place on the projection's fresh output (saves two (B, T, F) tensors; autograd-safe: the
        # product keeps no output, and relu's output, which it keeps, is not written afterwards)
        k = torch.relu_(linear(self.key, xk).mul_(self.key_scale))  # (B, T, F)
        out = linear(self.value, k * k)
        if xr is None:
            return out
        return torch.sigmoid(linear(self.receptance, xr)) * out


class LerpChannelMix(SquaredReluChannelMix):
    """The RWKV-4 and 5.2 feed-forward: x{k,r} = x * time_mix_{k,r} + x_prev * (1 - time_mix_{k,r})."""

    def add_shift_weights(self, C: int) -> None:
        self.time_mix_k = channel_param(C)
        self.time_mix_r = channel_param(C)

    def shifted(self, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lerp_shift(x, x_prev, self.time_mix_k), lerp_shift(x, x_prev, self.time_mix_r)


def add_matrix_state_projections(mix: nn.Module, config: ModelConfig, layer_id: int, gate: bool) -> None:
    """What the matrix-state time mixes (v5.2, v6, v7) end with, set on ``mix``: the tuned initial state
    ``time_state`` (or None), the (C, C) projections receptance, key, value (, gate), output, the per-head
    ``ln_x`` and the ``output_scale``."""
    C, H = config.n_embd, config.n_head
    mix.time_state = time_state_param(config)
    mix.receptance = nn.Linear(C, C, bias=False)
    mix.key = nn.Linear(C, C, bias=False)
    mix.value = nn.Linear(C, C, bias=False)
    if gate:
        mix.gate = nn.Linear(C, C, bias=False)
    mix.output = nn.Linear(C, C, bias=False)
    mix.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)
    mix.output_scale = time_mix_output_scale(layer_id)


class MatrixStateTimeMix(nn.Module):
    """What the RWKV-5.2 and RWKV-6 time mixes share: the bonus ``time_faaaa`` (H, N), the projections
    (:func:`add_matrix_state_projections`), and :meth:`project_wkv_output`, which ends both forwards."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.time_faaaa = head_params(config)
        add_matrix_state_projections(self, config, layer_id, gate=True)

    def project_wkv_output(
        self,
        xr: Tensor,
        xk: Tensor,
        xv: Tensor,
        xg: Tensor,
        log_decay: Tensor,
        wkv_state: Tensor,
        wkv_out: Tensor | None = None,
        resets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The token-shifted inputs x{r,k,v,g} (B, T, C) and the log-decay (B, T, H, N): project r, k, v
        and the gate, run the WKV, normalise per head, gate and project out. Returns (out, new state)."""
        B, T, C = xr.shape
        H, N = self.n_head, self.head_size
        r = linear(self.receptance, xr).float().view(B, T, H, N)
        k = linear(self.key, xk).float().view(B, T, H, N)
        v = linear(self.value, xv).float().view(B, T, H, N)
        g = F.silu(linear(self.gate, xg))  # (B, T, C)
        y, wkv_state = run_wkv6(r, log_decay, k, v, self.time_faaaa.float(), wkv_state, wkv_out, resets)
        y = group_norm(self.ln_x, y.reshape(B, T, C), xr.dtype)
        return linear(self.output, y * g * self.output_scale), wkv_state
