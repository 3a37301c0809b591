"""What every RWKV version shares: the block skeleton, the model loop and state handling.

All versions are ``emb -> ln0 -> [x += TimeMix(ln1(x)); x += ChannelMix(ln2(x))] * L -> ln_out -> head``
and differ only inside TimeMix and ChannelMix, which each version module (``rwkv4.py`` .. ``rwkv7.py``)
defines from the building blocks of :mod:`rwkvkit.models.layers`. :class:`RWKVModel` runs the loop for
all of them, in both modes: a whole sequence at once (parallel, chunked WKV) or one token at a time with a
carried state (RNN), with the same parameters and the same code; one token is made fast by the helpers
the mixes call (:mod:`rwkvkit.blas`, ``layers.run_wkv*``), not by a second copy of the mixes.

Precision: weights and matmuls use the model dtype (fp32, bf16 or fp16); the residual stream ``x`` and
the norms are computed in fp32 and the WKV state is fp32 always. Deep models accumulate activations
beyond fp16's 65504 (the reference package halves its fp16 residual every 6 layers for that); here the
residual is fp32, and each sub-block of layer l computes its output 2^-(l // 6) times smaller (its
``output_scale``: the input of its last matmul is scaled) and the loop scales it back in fp32. Powers of
two make that exact in every dtype, so fp32 results are bit-identical and fp16 matmuls stay finite.

Interfaces of a version's modules (x is (B, T, C) in the model dtype, shift (B, C)):
    TimeMix.forward(x, shift, wkv_state, v_first, wkv_out=None) -> (out (B, T, C), new wkv_state, v_first)
    ChannelMix.forward(x, shift) -> out (B, T, C)
each with a float attribute ``output_scale`` (see Precision: ``out`` is the true output times it).
``v_first`` is RWKV-7's layer-0 values, handed from layer to layer (None and unused by the others);
the new wkv state is written into ``wkv_out`` when given.

Legend: B batch, T time, C = n_embd, H heads, N head size, F ffn width, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from rwkvkit import blas
from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.models.init import PROJECTION_SUFFIXES
from rwkvkit.models.layers import layer_norm
from rwkvkit.native import step as native
from rwkvkit.state import RWKVState, layer_zero_wkv, wkv_shape

__all__ = ["PROJECTION_SUFFIXES", "Block", "BlockOutput", "RWKVModel"]


def _blas_matvecs(model: nn.Module) -> bool:
    """Whether a one-row decode step sends its products to numpy (:func:`rwkvkit.blas.linear`)."""
    head = model.head
    return (
        type(head) is nn.Linear
        and head.weight.dtype == torch.float32
        and head.weight.device.type == "cpu"
        and blas.fast_decode_on()
    )


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


class BlockOutput(NamedTuple):
    """What a layer hands on: the residual and the layer's new state (and RWKV-7's v_first)."""

    x: torch.Tensor  # (B, T, C) fp32 residual
    att_shift: torch.Tensor  # (B, C): the time mix's input at the last position
    wkv_state: torch.Tensor  # the new wkv state (see rwkvkit.state)
    ffn_shift: torch.Tensor  # (B, C): the channel mix's input at the last position
    v_first: torch.Tensor | None  # RWKV-7: layer 0's values (B, T, C), mixed into later layers' v


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
        v_first: torch.Tensor | None,
        dtype: torch.dtype,
        wkv_out: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
    ) -> BlockOutput:
        """x (B, T, C) residual -> the new residual and this layer's new state (:class:`BlockOutput`).

        Layer 0 applies ln0 first. ``wkv_state`` None means a fresh sequence (:meth:`initial_wkv`). The
        new wkv state is written into ``wkv_out`` when given; ``resets`` (B, T) marks packed sequences
        (see :meth:`RWKVModel.forward`). Parameters are only read in here, so the block can be a shard
        unit of FSDP.
        """
        if hasattr(self, "ln0"):
            x = layer_norm(self.ln0, x, torch.float32)  # the residual stream, fp32
        if wkv_state is None:
            wkv_state = self.initial_wkv(x.shape[0], x.device)
        xa = layer_norm(self.ln1, x, dtype)
        out, wkv_state, v_first = self.att(xa, att_shift, wkv_state, v_first, wkv_out, resets)
        x = x + out.float() / self.att.output_scale
        xf = layer_norm(self.ln2, x, dtype)
        x = x + self.ffn(xf, ffn_shift, resets).float() / self.ffn.output_scale
        return BlockOutput(x, xa[:, -1], wkv_state, xf[:, -1], v_first)


class RWKVModel(nn.Module):
    """An RWKV language model. ``logits, state = model(tokens, state=None)``.

    tokens: LongTensor (B, T); logits: float32 (B, T, V); state: RWKVState continuing the sequences.
    A version declares itself in its class line, ``class RWKV7(RWKVModel, version="7", time_mix=...,
    channel_mix=...)``: its version and the two mix classes every block is built from.
    """

    version: str = ""
    time_mix: type[nn.Module]  # called as time_mix(config, layer_id)
    channel_mix: type[nn.Module]  # called as channel_mix(config, layer_id)
    # Set by the loaders (rwkvkit.models.io, rwkvkit.quant) and read when saving:
    quantization: dict | None  # {"scheme", "group_size"} of a quantized model, else None
    source_dtypes: dict[str, torch.dtype]  # each key's dtype in the file the model was loaded from
    source_key_order: list[str]  # that file's key order (empty: the model's own order)

    def __init_subclass__(
        cls,
        version: str = "",
        time_mix: type[nn.Module] | None = None,
        channel_mix: type[nn.Module] | None = None,
    ) -> None:
        super().__init_subclass__()
        if version:
            if time_mix is None or channel_mix is None:
                raise TypeError(f"{cls.__name__}: a version needs both time_mix and channel_mix")
            cls.version, cls.time_mix, cls.channel_mix = version, time_mix, channel_mix

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.version != self.version:
            raise ValueError(
                f"{type(self).__name__} needs a version {self.version} config, got {config.version}"
            )
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(
            Block(config, i, self.time_mix(config, i), self.channel_mix(config, i))
            for i in range(config.n_layer)
        )
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Training option: recompute each block in the backward instead of keeping its activations.
        self.grad_checkpoint = False
        self.quantization = None
        self.source_dtypes = {}
        self.source_key_order = []
        # a loaded state dict may replace weights the native decode step points into: build it again
        self.register_load_state_dict_post_hook(lambda module, _keys: native.forget(module))

    def _apply(self, fn, recurse=True):
        native.forget(self)  # weights moved or converted (``.to``, ``.float()``, ...): build the step again
        return super()._apply(fn, recurse)

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
        self,
        tokens: torch.Tensor,
        state: RWKVState | None = None,
        *,
        last_only: bool = False,
        resets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RWKVState]:
        """Run tokens (B, T) from ``state`` (the initial state if None). Returns (logits, new state).

        logits is float32 (B, T, V), or (B, 1, V) for the last position only when ``last_only``.
        ``resets`` (B, T) bool: packed rows of fresh sequences (``state`` None); each True position starts
        a new document from the initial state (WKV state and token shifts), so every document comes out
        as if it ran alone; the returned state is that of each row's last document.
        """
        self.check_tokens(tokens)
        B, T = tokens.shape
        if resets is not None:
            self._check_resets(resets, tokens, state)
        dtype, L = self.dtype, self.config.n_layer
        if state is None:  # fresh sequences: zero shifts; each block makes its initial wkv state
            zeros = torch.zeros(L, B, self.config.n_embd, device=self.device, dtype=dtype)
            layer_states = zip(zeros, [None] * L, zeros, strict=True)
        else:
            state.check_compatible(self.config, B)
            layer_states = zip(state.att_shift, state.wkv, state.ffn_shift, strict=True)
        # one token per sequence without gradients (decoding): the native step where there is one (all
        # layers in one C call, rwkvkit.native); else each layer writes its new wkv state straight into
        # the next state, and one sequence's products run in numpy (rwkvkit.blas)
        decoding = T == 1 and not torch.is_grad_enabled() and blas.fast_decode_on()
        step = native.step_for(self) if decoding and B <= native.MAX_ROWS else None
        if step is not None:
            if state is None:
                state = self.initial_state(B)
            logits, new_state = step.step(tokens[:, 0].to(self.device, torch.long), state)
            return logits.unsqueeze(1), new_state
        x = self.emb(tokens.to(self.device, torch.long))  # (B, T, C)
        threads = _one_torch_thread() if decoding and B == 1 and _blas_matvecs(self) else nullcontext()
        with threads:
            x, new_state = self._run_blocks(x, layer_states, dtype, write_in_place=decoding, resets=resets)
            if last_only:
                x = x[:, -1:]
            logits = blas.linear(self.head, layer_norm(self.ln_out, x, dtype)).float()  # (B, T, V)
        return logits, new_state

    def hidden(self, tokens: torch.Tensor, state: RWKVState | None = None) -> tuple[torch.Tensor, RWKVState]:
        """The head's input for tokens (B, T) from ``state`` (the initial state if None): ``ln_out`` of the
        last block's output, (B, T, C) in the model dtype, and the new state. ``head(h).float()`` is
        :meth:`forward`'s logits; trainers that fuse the head with the loss (TRL's SFT) call this."""
        self.check_tokens(tokens)
        B = tokens.shape[0]
        if state is None:
            state = self.initial_state(B)
        state.check_compatible(self.config, B)
        layer_states = zip(state.att_shift, state.wkv, state.ffn_shift, strict=True)
        x = self.emb(tokens.to(self.device, torch.long))  # (B, T, C)
        x, new_state = self._run_blocks(x, layer_states, self.dtype, write_in_place=False)
        return layer_norm(self.ln_out, x, self.dtype), new_state

    def decode_step(self, tokens: torch.Tensor, state: RWKVState) -> tuple[torch.Tensor, RWKVState]:
        """One token for each of B sequences on the torch path, WITHOUT :meth:`check_tokens` (which reads
        the ids on the host): nothing waits on the device, so a CUDA graph can capture it
        (:mod:`rwkvkit.infer.cuda_graph`). tokens (B, 1) long on the model's device, already checked;
        ``state`` a state for B sequences; call it without gradients. Returns (logits (B, 1, V) float32,
        the new state), as :meth:`forward` does."""
        layer_states = zip(state.att_shift, state.wkv, state.ffn_shift, strict=True)
        x = self.emb(tokens)  # (B, 1, C)
        x, new_state = self._run_blocks(x, layer_states, self.dtype, write_in_place=True)
        logits = blas.linear(self.head, layer_norm(self.ln_out, x, self.dtype)).float()  # (B, 1, V)
        return logits, new_state

    def _check_resets(self, resets: torch.Tensor, tokens: torch.Tensor, state: RWKVState | None) -> None:
        if not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool or resets.shape != tokens.shape:
            got = tuple(resets.shape) if isinstance(resets, torch.Tensor) else type(resets).__name__
            raise RwkvkitError(
                f"resets must be a bool tensor shaped like the tokens {tuple(tokens.shape)}, got {got}"
            )
        if state is not None:
            raise RwkvkitError("resets (packed sequences) start every document fresh: pass state=None")

    def _run_blocks(
        self,
        x: torch.Tensor,
        layer_states,
        dtype: torch.dtype,
        write_in_place: bool,
        resets: torch.Tensor | None = None,
    ):
        """The layers: (x after the last block, the new state). ``write_in_place``: the blocks write
        their new wkv states into one preallocated next state (no stacking copy)."""
        att_shift, wkv_states, ffn_shift = [], [], []
        v_first = None
        recompute = self.grad_checkpoint and torch.is_grad_enabled()
        wkv_next = (
            torch.empty(wkv_shape(self.config, x.shape[0]), device=x.device, dtype=torch.float32)
            if write_in_place
            else None
        )
        if resets is not None:
            resets = resets.to(x.device)
        for i, (block, (att_i, wkv_i, ffn_i)) in enumerate(zip(self.blocks, layer_states, strict=True)):
            layer_inputs = (x, att_i, wkv_i, ffn_i, v_first, dtype)
            if recompute:  # keep only the block inputs; recompute the rest in the backward
                out = torch.utils.checkpoint.checkpoint(
                    block, *layer_inputs, None, resets, use_reentrant=False
                )
            else:
                out = block(*layer_inputs, None if wkv_next is None else wkv_next[i], resets)
            x, v_first = out.x, out.v_first
            att_shift.append(out.att_shift)
            wkv_states.append(out.wkv_state)
            ffn_shift.append(out.ffn_shift)
        wkv = wkv_next if wkv_next is not None else torch.stack(wkv_states)
        return x, RWKVState(torch.stack(att_shift), wkv, torch.stack(ffn_shift))
