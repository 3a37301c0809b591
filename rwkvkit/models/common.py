"""What every RWKV version shares: the block skeleton, the model loop, state handling and init helpers.

All versions are ``emb -> ln0 -> [x += TimeMix(ln1(x)); x += ChannelMix(ln2(x))] * L -> ln_out -> head``
and differ only inside TimeMix and ChannelMix, which each version module (``rwkv4.py`` .. ``rwkv7.py``)
defines. :class:`RWKVModel` runs the loop for all of them, in both modes: a whole sequence at once
(parallel, chunked WKV) or one token at a time with a carried state (RNN), with the same parameters.

Precision: weights and matmuls use the model dtype (fp32, bf16 or fp16); the residual stream ``x`` and
the norms are computed in fp32 and the WKV state is fp32 always. Deep models accumulate activations
beyond fp16's 65504 (the reference package halves its fp16 residual every 6 layers for that); here the
residual is fp32, and each sub-block of layer l computes its output 2^-(l // 6) times smaller (its
``output_scale``: the input of its last matmul is scaled) and the loop scales it back in fp32. Powers of
two make that exact in every dtype, so fp32 results are bit-identical and fp16 matmuls stay finite.

Interfaces of a version's modules (x is (B, T, C) in the model dtype, shift (B, C)):
    TimeMix.forward(x, shift, wkv_state, carry) -> (out (B, T, C), new wkv_state, carry)
    ChannelMix.forward(x, shift) -> out (B, T, C)
each with a float attribute ``output_scale`` (see Precision: ``out`` is the true output times it).
``carry`` is a value handed from layer to layer (RWKV-7's v_first; None and unused by the others).

Legend: B batch, T time, C = n_embd, H heads, N head size, F ffn width, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from rwkvkit import blas
from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.state import RWKVState, layer_zero_wkv, wkv_shape

GROUPNORM_EPS = 64e-5  # ln_x of v5.2 / v6 / v7 (the trainers' x / 8 with eps 1e-5 is the same thing)
RESCALE_EVERY = 6  # sub-block outputs are computed 2x smaller every this many layers (see Precision)


def time_mix_output_scale(layer_id: int) -> float:
    """2^-(layer // 6): the factor a time mix applies to the input of its output projection."""
    return 2.0 ** -(layer_id // RESCALE_EVERY)


def channel_mix_key_scale(layer_id: int) -> float:
    """The factor a channel mix applies to relu(key(x)) before squaring: a power of two whose square
    (the channel mix's ``output_scale``) is at most 2^-(layer // 6), so relu(k)^2 cannot overflow first."""
    return 2.0 ** -math.ceil((layer_id // RESCALE_EVERY) / 2)


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for the decode fast path: one fp32 row on the CPU goes through numpy's BLAS
    (:mod:`rwkvkit.blas`); everything else (batches, other dtypes and devices, quantized layers) is the
    module itself."""
    if type(linear) is nn.Linear and linear.bias is None and x.shape[0] == 1:
        return blas.linear_row(x, linear.weight)
    return linear(x)


def _blas_matvecs(model: nn.Module) -> bool:
    """Whether a one-row decode step sends its matrix-vector products to numpy (see :func:`project`)."""
    head = model.head
    return type(head) is nn.Linear and head.weight.dtype == torch.float32 and head.weight.device.type == "cpu"


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread for a decode step whose products run in numpy's BLAS threads: torch's idle
    OpenMP threads would otherwise spin on the same cores (a one-row step measured 8x slower)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """x_prev: x shifted one step back in time, with ``prev`` (B, C) as the token before x[:, 0]."""
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)  # (B, T, C)


def layer_norm(ln: nn.LayerNorm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``ln`` applied in fp32 (whatever the weights' dtype), the result cast to ``dtype``."""
    weight, bias = ln.weight.float(), ln.bias.float()
    return F.layer_norm(x.float(), ln.normalized_shape, weight, bias, ln.eps).to(dtype)


def group_norm(gn: nn.GroupNorm, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-head normalisation ``gn`` of y (B, T, C), in fp32, the result cast to ``dtype``."""
    B, T, C = y.shape
    out = F.group_norm(y.reshape(B * T, C).float(), gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps)
    return out.view(B, T, C).to(dtype)


def time_state_param(config: ModelConfig) -> nn.Parameter | None:
    """``att.time_state`` (H, N, N) [value, key], the tuned initial wkv state of a layer (state tuning),
    when the config has one (v5.2 / v6 / v7), else None."""
    if not config.has_time_state:
        return None
    H, N = config.n_head, config.head_size
    return nn.Parameter(torch.zeros(H, N, N))


class Block(nn.Module):
    """One layer: ln0 (layer 0 only), ln1 + TimeMix (``att``), ln2 + ChannelMix (``ffn``)."""

    def __init__(self, config: ModelConfig, layer_id: int, att: nn.Module, ffn: nn.Module):
        super().__init__()
        C = config.n_embd
        self.config = config
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = att
        self.ffn = ffn

    def initial_wkv(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The wkv state this layer starts a fresh sequence from: its tuned ``att.time_state`` (H, N, N)
        for every row if it has one, else zeros (pp = -1e38 for RWKV-4). fp32."""
        tuned = getattr(self.att, "time_state", None)
        if tuned is not None:
            return tuned.float().unsqueeze(0).expand(batch_size, *tuned.shape)
        return layer_zero_wkv(self.config, batch_size, device)

    def forward(
        self,
        x: torch.Tensor,
        att_shift: torch.Tensor,
        wkv_state: torch.Tensor | None,
        ffn_shift: torch.Tensor,
        carry: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) residual -> (x, new att shift (B, C), new wkv state, new ffn shift, carry).

        Layer 0 applies ln0 first. ``wkv_state`` None means a fresh sequence (:meth:`initial_wkv`).
        Parameters are only read in here, so the block can be a shard unit of FSDP.
        """
        if hasattr(self, "ln0"):
            x = layer_norm(self.ln0, x, torch.float32)  # the residual stream, fp32
        if wkv_state is None:
            wkv_state = self.initial_wkv(x.shape[0], x.device)
        xa = layer_norm(self.ln1, x, dtype)
        out, wkv_state, carry = self.att(xa, att_shift, wkv_state, carry)
        x = x + out.float() / self.att.output_scale
        xf = layer_norm(self.ln2, x, dtype)
        x = x + self.ffn(xf, ffn_shift).float() / self.ffn.output_scale
        return x, xa[:, -1], wkv_state, xf[:, -1], carry

    def step(
        self,
        x: torch.Tensor,
        att_shift: torch.Tensor,
        wkv_state: torch.Tensor | None,
        ffn_shift: torch.Tensor,
        carry: torch.Tensor | None,
        dtype: torch.dtype,
        wkv_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` for one token per sequence, x (B, C): the decode fast path (inference only;
        the mixes' ``step`` methods do the same computation in fewer ops; tests compare the two). The
        new wkv state is written into ``wkv_out`` when given."""
        if hasattr(self, "ln0"):
            x = layer_norm(self.ln0, x, torch.float32)
        if wkv_state is None:
            wkv_state = self.initial_wkv(x.shape[0], x.device)
        xa = layer_norm(self.ln1, x, dtype)
        out, wkv_state, carry = self.att.step(xa, att_shift, wkv_state, carry, wkv_out)
        x = x + out.float() / self.att.output_scale
        xf = layer_norm(self.ln2, x, dtype)
        x = x + self.ffn.step(xf, ffn_shift).float() / self.ffn.output_scale
        return x, xa, wkv_state, xf, carry


class RWKVModel(nn.Module):
    """An RWKV language model. ``logits, state = model(tokens, state=None)``.

    tokens: LongTensor (B, T); logits: float32 (B, T, V); state: RWKVState continuing the sequences.
    Subclasses set ``version`` and implement :meth:`make_block`.
    """

    version: str = ""
    # Set by the loaders (rwkvkit.models.io, rwkvkit.quant) and read when saving:
    quantization: dict | None  # {"scheme", "group_size"} of a quantized model, else None
    source_dtypes: dict[str, torch.dtype]  # each key's dtype in the file the model was loaded from
    source_key_order: list[str]  # that file's key order (empty: the model's own order)

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.version != self.version:
            raise ValueError(
                f"{type(self).__name__} needs a version {self.version} config, got {config.version}"
            )
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(self.make_block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Training option: recompute each block in the backward instead of keeping its activations.
        self.grad_checkpoint = False
        # Decode fast path (Block.step) for one token without gradients, where every mix has a step
        # method; set False to run the general path instead (tests compare the two).
        self.fast_step = all(hasattr(b.att, "step") and hasattr(b.ffn, "step") for b in self.blocks)
        self.quantization = None
        self.source_dtypes = {}
        self.source_key_order = []

    def make_block(self, config: ModelConfig, layer_id: int) -> Block:
        raise NotImplementedError

    def quantizable_layers(self) -> list[str]:
        """Names of the ``nn.Linear`` modules weight-only quantization may replace (what
        :mod:`rwkvkit.quant` asks the model): the projections of both mixes and the head."""
        return [
            name
            for name, module in self.named_modules()
            if isinstance(module, nn.Linear) and (name == "head" or name.endswith(PROJECTION_SUFFIXES))
        ]

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def zero_state(self, batch_size: int) -> RWKVState:
        """The untuned state of ``batch_size`` fresh sequences (zeros; pp = -1e38 for RWKV-4)."""
        return RWKVState.zeros(self.config, batch_size, device=self.device, dtype=self.dtype)

    def initial_state(self, batch_size: int) -> RWKVState:
        """The state a fresh sequence starts from (what ``state=None`` means): :meth:`zero_state`, except
        that layers with a tuned initial state (``att.time_state``, [value, key]) start from it."""
        state = self.zero_state(batch_size)
        wkv = [block.initial_wkv(batch_size, self.device) for block in self.blocks]
        return RWKVState(state.att_shift, torch.stack(wkv), state.ffn_shift)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise RwkvkitError for an empty batch or ids outside [0, vocab_size)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise RwkvkitError(f"tokens must be a 2-D LongTensor (B, T), got {shape}")
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
        """Run tokens (B, T) from ``state`` (the initial state if None). Returns (logits, new state).

        logits is float32 (B, T, V), or (B, 1, V) for the last position only when ``last_only``.
        """
        self.check_tokens(tokens)
        B, T = tokens.shape
        dtype, L = self.dtype, self.config.n_layer
        if state is None:  # fresh sequences: zero shifts; each block makes its initial wkv state
            zeros = torch.zeros(L, B, self.config.n_embd, device=self.device, dtype=dtype)
            layer_states = zip(zeros, [None] * L, zeros, strict=True)
        else:
            state.check_compatible(self.config, B)
            layer_states = zip(state.att_shift, state.wkv, state.ffn_shift, strict=True)
        x = self.emb(tokens.to(self.device, torch.long))  # (B, T, C)
        # one token per sequence, no gradients: the decode fast path (same results, fewer ops)
        stepping = T == 1 and not torch.is_grad_enabled() and self.fast_step
        threads = _one_torch_thread() if stepping and B == 1 and _blas_matvecs(self) else nullcontext()
        with threads:
            if stepping:
                x, new_state = self._run_blocks(x[:, 0], layer_states, dtype, stepping=True)  # x (B, C)
                logits = project(self.head, layer_norm(self.ln_out, x, dtype)).unsqueeze(1).float()
            else:
                x, new_state = self._run_blocks(x, layer_states, dtype, stepping=False)
                if last_only:
                    x = x[:, -1:]
                logits = self.head(layer_norm(self.ln_out, x, dtype)).float()  # (B, T, V)
        return logits, new_state

    def _run_blocks(self, x: torch.Tensor, layer_states, dtype: torch.dtype, stepping: bool):
        """The layers: (x after the last block, the new state)."""
        att_shift, wkv_states, ffn_shift = [], [], []
        carry = None
        recompute = self.grad_checkpoint and torch.is_grad_enabled()
        # a step writes each layer's new wkv state straight into the next state (no stacking copy)
        wkv_next = (
            torch.empty(wkv_shape(self.config, x.shape[0]), device=x.device, dtype=torch.float32)
            if stepping
            else None
        )
        for i, (block, (att_i, wkv_i, ffn_i)) in enumerate(zip(self.blocks, layer_states, strict=True)):
            layer_inputs = (x, att_i, wkv_i, ffn_i, carry, dtype)
            if stepping:
                outputs = block.step(*layer_inputs, wkv_out=wkv_next[i])
            elif recompute:  # keep only the block inputs; recompute the rest in the backward
                outputs = torch.utils.checkpoint.checkpoint(block, *layer_inputs, use_reentrant=False)
            else:
                outputs = block(*layer_inputs)
            x, att_i, wkv_i, ffn_i, carry = outputs
            att_shift.append(att_i)
            wkv_states.append(wkv_i)
            ffn_shift.append(ffn_i)
        wkv = wkv_next if stepping else torch.stack(wkv_states)
        return x, RWKVState(torch.stack(att_shift), wkv, torch.stack(ffn_shift))


# ---------------------------------------------------------------------------------------------- init


def lora_width(multiplier: float, base: float) -> int:
    """Low-rank width as the official trainer picks it: a multiple of 32, at least 32."""
    return max(32, int(round(multiplier * base / 32) * 32))


def orthogonal_(weight: torch.Tensor, gain: float) -> None:
    """Orthogonal init; like the official trainer, a tall matrix gets gain * sqrt(rows / cols)."""
    rows, cols = weight.shape
    if rows > cols:
        gain *= math.sqrt(rows / cols)
    nn.init.orthogonal_(weight, gain=gain)


# The projection matrices (nn.Linear) of both mixes, as module-name suffixes; each version has a subset
# (RWKV-4 and 7 have no att.gate, RWKV-7 no ffn.receptance). ``head`` is not among them.
PROJECTION_SUFFIXES: tuple[str, ...] = (
    "att.receptance",
    "att.key",
    "att.value",
    "att.gate",
    "att.output",
    "ffn.key",
    "ffn.value",
    "ffn.receptance",
)

# Official gains of the projection matrices (all others: 1).
PROJECTION_GAINS = {
    "att.key": 0.1,
    "att.gate": 0.1,
    "att.output": 0.0,
    "ffn.value": 0.0,
    "ffn.receptance": 0.0,
}


@torch.no_grad()
def init_shared_(model: RWKVModel) -> None:
    """The part of the official from-scratch init that is the same for every version (in place).

    emb ~ U(-1e-4, 1e-4); head orthogonal with gain 0.5 * sqrt(V / C) when V > C; norms weight 1,
    bias 0, except ln_x.weight = ((layer + 1) / L) ** 0.7; every projection (``nn.Linear``) orthogonal
    with the gains of PROJECTION_GAINS (zero for the output-side matrices). The version's own time
    parameters are set by its module's ``init_official_``.
    """
    L = model.config.n_layer
    nn.init.uniform_(model.emb.weight, -1e-4, 1e-4)
    orthogonal_(model.head.weight, 0.5)
    for name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            module.bias.zero_()
            if name.endswith("ln_x"):
                module.weight.fill_(((int(name.split(".")[1]) + 1) / L) ** 0.7)
            else:
                module.weight.fill_(1.0)
        elif isinstance(module, nn.Linear) and name != "head":
            gain = next((g for key, g in PROJECTION_GAINS.items() if name.endswith(key)), 1.0)
            if gain == 0.0:
                module.weight.zero_()
            else:
                orthogonal_(module.weight, gain)


class Ramps(NamedTuple):
    """The per-channel ramps and per-layer ratios of the official init recipes (layer l of L, C channels).

    n[c] = c (C,); ddd = n / C as (1, 1, C); r01 = l / (L - 1) (0 -> 1 over the layers); r10 = 1 - l / L.
    """

    n: torch.Tensor
    ddd: torch.Tensor
    r01: float
    r10: float


def ramps(C: int, layer_id: int, n_layer: int, device: torch.device) -> Ramps:
    n = torch.arange(C, device=device, dtype=torch.float32)
    return Ramps(n, (n / C).view(1, 1, C), layer_id / max(n_layer - 1, 1), 1.0 - layer_id / n_layer)
