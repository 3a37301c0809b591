"""rwkvkit models as Hugging Face ``transformers`` models: a config, a causal-LM wrapper, Auto registration.

``RwkvkitForCausalLM`` holds an rwkvkit model as its submodule ``model``, so its state dict is
``model.<official RWKV key>`` (``model.emb.weight``, ``model.blocks.0.att.key.weight``, ``model.head.weight``)
and ``save_pretrained`` / ``from_pretrained`` write and read safetensors of exactly those tensors.
Importing this module registers ``RwkvkitConfig`` (model type "rwkvkit") with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM``.

The cache is the RNN state. ``forward`` returns the new :class:`rwkvkit.state.RWKVState` as ``state``
(one of the cache names ``generate`` carries from step to step) and takes it back as ``state=``; with a
state, only the tokens that follow it are read. ``generate`` therefore prefills the prompt once, then
feeds one token per step on a fixed-size state; beam search regroups the state's rows
(:meth:`RwkvkitForCausalLM._reorder_cache`). ``generate(input_ids, state=s)`` continues sequences from
``s`` (``input_ids`` being only what follows it).

Attention masks: a position with mask 0 is treated as absent. Its token is not read (the row's state
passes it unchanged) and its logits are zeros. Rows whose masks differ are run in groups of equal
unmasked length, each row from its first unmasked token, so a left-padded batch decodes exactly as each
prompt alone would. A mask of ones costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.models.common import Block, RWKVModel
from rwkvkit.models.io import build_model, new_config, version_module
from rwkvkit.state import RWKVState

__all__ = ["RwkvkitCausalLMOutput", "RwkvkitConfig", "RwkvkitForCausalLM"]

# ModelConfig's shape fields that a new config may leave unset (None): new_config fills them in
_SHAPE_FIELDS = (
    "n_head",
    "head_size",
    "dim_ffn",
    "dim_att",
    "d_mix",
    "d_decay",
    "d_iclr",
    "d_value",
    "d_gate",
)
IGNORE_INDEX = -100  # labels never scored, as in transformers' causal LMs


class RwkvkitConfig(PretrainedConfig):
    """The fields of :class:`rwkvkit.config.ModelConfig` as a transformers config.

    Widths left as None are those of a new model of that version and size (``rwkvkit.models.new_config``
    with ``head_size``, 64 unless given). ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``
    and ``intermediate_size`` read ``n_embd``, ``n_layer``, ``n_head`` and ``dim_ffn``.
    """

    model_type = "rwkvkit"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "intermediate_size": "dim_ffn",
    }
    keys_to_ignore_at_inference = ["state"]

    version: str = "7"
    n_layer: int = 12
    n_embd: int = 768
    vocab_size: int = 65536
    n_head: int | None = None
    head_size: int | None = None
    dim_ffn: int | None = None
    dim_att: int | None = None
    d_mix: int | None = None
    d_decay: int | None = None
    d_iclr: int | None = None
    d_value: int | None = None
    d_gate: int | None = None
    layer0_has_value_lora: bool = True
    has_time_state: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if any(getattr(self, name) is None for name in _SHAPE_FIELDS):
            shape = new_config(
                self.version, self.n_layer, self.n_embd, self.vocab_size, self.head_size or 64
            ).to_dict()
            for name in _SHAPE_FIELDS:
                if getattr(self, name) is None:
                    setattr(self, name, shape[name])
        super().__post_init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> RwkvkitConfig:
        """The transformers config of an rwkvkit ``ModelConfig`` (``kwargs``: more transformers fields)."""
        return cls(**config.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The rwkvkit ``ModelConfig`` this config describes."""
        fields = ModelConfig.__dataclass_fields__
        return ModelConfig(**{name: getattr(self, name) for name in fields})


@dataclass
class RwkvkitCausalLMOutput(ModelOutput):
    """What :meth:`RwkvkitForCausalLM.forward` returns.

    loss: the mean next-token cross-entropy over labels != -100 (with ``labels``); logits: float32 (B, T, V)
    ((B, k, V) with ``logits_to_keep=k``); state: the RNN state after the input (with ``use_cache``), the
    cache ``generate`` hands to the next step.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: RWKVState | None = None


def _put_rows(state: RWKVState, rows: torch.Tensor, part: RWKVState) -> RWKVState:
    """``state`` with its batch rows ``rows`` replaced by ``part``'s rows (a new state)."""
    return RWKVState(
        state.att_shift.index_copy(1, rows, part.att_shift.to(state.att_shift.dtype)),
        state.wkv.index_copy(1, rows, part.wkv),
        state.ffn_shift.index_copy(1, rows, part.ffn_shift.to(state.ffn_shift.dtype)),
    )


def _shifted_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) at position t against labels[:, t + 1], ignoring -100.

    The mean over scored labels, or their sum divided by ``num_items_in_batch`` when the trainer gives it
    (gradient accumulation over batches of different sizes).
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B * (T - 1), V)
    target = labels[:, 1:].reshape(-1).to(logits.device)  # (B * (T - 1),)
    if num_items_in_batch is None:
        return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


class RwkvkitForCausalLM(PreTrainedModel, GenerationMixin):
    """An rwkvkit model (RWKV-4, 5.2, 6 or 7) as a transformers causal LM.

    ``RwkvkitForCausalLM(config)`` builds a new model (official from-scratch init, unless loading);
    ``RwkvkitForCausalLM.from_rwkvkit(model)`` wraps an existing rwkvkit model (sharing its tensors);
    ``.rwkvkit_model`` is the wrapped model.
    """

    config_class = RwkvkitConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = [Block.__name__]  # one layer (rwkvkit.models.common.Block) stays on one device
    supports_gradient_checkpointing = True  # rwkvkit's own: each block recomputed in the backward
    _is_stateful = True  # no assisted generation: a state cannot be rolled back

    def __init__(self, config: RwkvkitConfig, rwkvkit_model: RWKVModel | None = None):
        super().__init__(config)
        if rwkvkit_model is None:
            # on the device and dtype transformers asks for (e.g. "meta" while from_pretrained loads)
            device, dtype = torch.empty(0).device, torch.get_default_dtype()
            rwkvkit_model = build_model(config.to_model_config(), device=device, dtype=dtype)
        else:  # a model handed over keeps its weights: the init pass skips tensors marked initialised
            for tensor in [*rwkvkit_model.parameters(), *rwkvkit_model.buffers()]:
                tensor._is_hf_initialized = True
        self.model = rwkvkit_model
        self.post_init()

    @classmethod
    def from_rwkvkit(cls, model: RWKVModel, **config_kwargs) -> RwkvkitForCausalLM:
        """Wrap an rwkvkit model (its tensors are shared, not copied). ``config_kwargs``: transformers
        config fields such as ``eos_token_id``."""
        if not isinstance(model, RWKVModel):
            raise RwkvkitError(f"from_rwkvkit needs an rwkvkit model, got {type(model).__name__}")
        config = RwkvkitConfig.from_model_config(model.config, **config_kwargs)
        return cls(config, rwkvkit_model=model)

    @property
    def rwkvkit_model(self) -> RWKVModel:
        return self.model

    def _init_weights(self, module: nn.Module) -> None:
        """No per-module init: the official recipe sets the whole model (:meth:`initialize_weights`)."""

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official from-scratch init of the rwkvkit model, only when none of its tensors were loaded
        or handed over (transformers marks those ``_is_hf_initialized``): those keep their weights."""
        if any(getattr(t, "_is_hf_initialized", False) for t in self.model.parameters()):
            return
        version_module(self.model.config.version).init_official_(self.model)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.emb = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.head = value

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers: int = 1
    ) -> None:
        """Activation checkpointing is rwkvkit's ``grad_checkpoint`` (every block, non-reentrant
        ``torch.utils.checkpoint``); a custom checkpoint function or ``every_n_layers`` is not used."""
        self.model.grad_checkpoint = enable
        self.model.gradient_checkpointing = enable  # what transformers' is_activation_checkpointing reads

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the RNN state, not a key/value cache

    def _reorder_cache(self, state: RWKVState, beam_idx: torch.Tensor) -> RWKVState:
        """Beam search: the state rows of the beams kept, in their new order."""
        return state.select(beam_idx)

    @property
    def base_model(self) -> RwkvkitBackbone:
        """What trainers call for hidden states (TRL's SFT fuses the head with its loss): the rwkvkit model
        without its head. ``base_model_prefix`` stays "model", the weights' prefix."""
        return RwkvkitBackbone(self.model)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        state: RWKVState | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> RwkvkitCausalLMOutput | tuple:
        """input_ids (B, T) from ``state`` (fresh sequences if None) -> logits, loss, new state.

        attention_mask (B, T) or (B, T_past + T) (its last T columns apply): 0 marks a position as
        absent (see the module docstring). labels (B, T): scored against the logits one position
        earlier, -100 ignored. use_cache (default: the config's, off in training mode): return the state.
        logits_to_keep=k > 0: logits of the last k positions only. ``kwargs`` such as ``position_ids``
        mean nothing to an RNN and are ignored (packed sequences are not separated), except
        ``num_items_in_batch`` (see the loss).
        """
        _check_inputs(input_ids, inputs_embeds)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if return_dict is None:
            return_dict = self.config.return_dict
        last_only = logits_to_keep == 1 and labels is None

        def run(tokens: torch.Tensor, part_state: RWKVState | None):
            return self.model(tokens, part_state, last_only=last_only)

        vocab = self.config.vocab_size
        args = (input_ids, attention_mask, state, last_only, vocab, torch.float32)
        logits, new_state = _run_masked(run, self.model, *args)
        loss = None
        if labels is not None:
            loss = _shifted_loss(logits, labels, kwargs.get("num_items_in_batch"))
        if logits_to_keep > 1:
            logits = logits[:, -logits_to_keep:]
        output = RwkvkitCausalLMOutput(loss=loss, logits=logits, state=new_state if use_cache else None)
        return output if return_dict else output.to_tuple()


@dataclass
class RwkvkitBackboneOutput(ModelOutput):
    """What :class:`RwkvkitBackbone` returns: last_hidden_state (B, T, C), the head's input; state."""

    last_hidden_state: torch.Tensor | None = None
    state: RWKVState | None = None


class RwkvkitBackbone:
    """An rwkvkit model without its head, called like a transformers base model (``input_ids``,
    ``attention_mask``, ``state``, ``use_cache``): ``head(last_hidden_state)`` is the wrapper's logits.
    A view of the model, holding no weights of its own."""

    _tp_plan = None  # no tensor or pipeline parallel plans (transformers asks its base models)
    _pp_plan = None

    def __init__(self, model: RWKVModel):
        self.model = model

    def __call__(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        state: RWKVState | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> RwkvkitBackboneOutput:
        _check_inputs(input_ids, inputs_embeds)
        args = (input_ids, attention_mask, state, False, self.model.config.n_embd, self.model.dtype)
        hidden, new_state = _run_masked(self.model.hidden, self.model, *args)
        return RwkvkitBackboneOutput(last_hidden_state=hidden, state=new_state if use_cache else None)


def _check_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    if inputs_embeds is not None:
        raise RwkvkitError("rwkvkit models read input_ids, not inputs_embeds")
    if input_ids is None:
        raise RwkvkitError("rwkvkit models need input_ids (B, T)")


def _run_masked(
    run,
    model: RWKVModel,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    state: RWKVState | None,
    last_only: bool,
    width: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, RWKVState]:
    """``run(tokens, state) -> (out (B, T or 1, width) of dtype, new state)`` with masked positions absent.

    A mask of ones (or none) is one call. Otherwise rows are grouped by their number of unmasked tokens,
    each group runs as one batch of its rows' unmasked tokens from their own state rows, and the outputs
    are scattered back; masked positions get zeros (with ``last_only``: rows whose last position is
    masked).
    """
    B, T = tokens.shape
    if attention_mask is not None and attention_mask.dim() != 2:
        raise RwkvkitError(f"attention_mask must be 2-D (B, T), got {tuple(attention_mask.shape)}")
    mask = None if attention_mask is None else attention_mask[:, -T:].to(tokens.device).bool()  # (B, T)
    if mask is None or bool(mask.all()):
        return run(tokens, state)
    lengths = mask.sum(1)  # (B,)
    out = torch.zeros(B, 1 if last_only else T, width, dtype=dtype, device=model.device)  # (B, T or 1, W)
    new_state = state if state is not None else model.initial_state(B)
    for n in sorted(set(lengths.tolist()) - {0}):
        rows = (lengths == n).nonzero().flatten()  # (R,)
        positions = mask[rows].nonzero()[:, 1].view(len(rows), n)  # (R, n): each row's kept columns
        part_out, part = run(tokens[rows].gather(1, positions), None if state is None else state.select(rows))
        new_state = _put_rows(new_state, rows.to(new_state.wkv.device), part)
        rows = rows.to(out.device)
        if last_only:  # the output at position T - 1, for the rows where it is unmasked
            ends = (positions[:, -1] == T - 1).to(out.device)
            out = out.index_put((rows[ends],), part_out[ends].to(dtype))
        else:
            out = out.index_put((rows[:, None].expand(-1, n), positions.to(out.device)), part_out.to(dtype))
    return out, new_state


AutoConfig.register(RwkvkitConfig.model_type, RwkvkitConfig, exist_ok=True)
AutoModel.register(RwkvkitConfig, RwkvkitForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(RwkvkitConfig, RwkvkitForCausalLM, exist_ok=True)
