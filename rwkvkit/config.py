"""Model configuration: a dataclass describing one RWKV model, inferred from checkpoint tensor shapes.

Every width is read from a tensor's shape, never assumed: released models use low-rank widths that
differ from today's training code. ``config_from_state_dict`` is the one place that does this, for every
supported version ("4", "5.2", "6", "7"); ``detect_version`` follows the reference package's rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from rwkvkit.errors import RwkvkitError

SUPPORTED_VERSIONS = ("4", "5.2", "6", "7")
VERSION_NAMES = {"4": "Raven/Pile", "5.2": "Eagle", "6": "Finch", "7": "Goose"}


@dataclass
class ModelConfig:
    """Shape of an RWKV model. ``version`` is "4", "5.2", "6" or "7".

    RWKV-4 has no heads: ``n_head`` is 0 and ``head_size`` 0, and its time-mix width is ``dim_att``.
    """

    version: str
    n_layer: int
    n_embd: int  # C
    vocab_size: int  # V
    n_head: int  # H (0 for RWKV-4)
    head_size: int  # N, with C == H * N (0 for RWKV-4)
    dim_ffn: int  # F, ffn.key is (F, C)
    dim_att: int = 0  # width of the time-mix projections (att.key is (dim_att, C)); 0 means n_embd
    # Low-rank widths. RWKV-6: time_maa_w1 is (C, 5 * d_mix), time_decay_w1 (C, d_decay).
    # RWKV-7: w1 is (C, d_decay), a1 (C, d_iclr), v1 (C, d_value), g1 (C, d_gate).
    d_mix: int = 0
    d_decay: int = 0
    d_iclr: int = 0
    d_value: int = 0
    d_gate: int = 0
    # RWKV-7: whether layer 0 carries att.v0/v1/v2 (unused there; present in files from the official trainer)
    layer0_has_value_lora: bool = True
    # RWKV-5.2/6/7: whether every layer carries a tuned initial wkv state ``att.time_state`` (H, N, N)
    has_time_state: bool = False

    def __post_init__(self) -> None:
        if self.dim_att == 0:
            self.dim_att = self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        heads = f" H{self.n_head}x{self.head_size}" if self.n_head else ""
        return f"RWKV-{self.version} L{self.n_layer} D{self.n_embd}{heads} F{self.dim_ffn} V{self.vocab_size}"


def detect_version(state_dict: dict[str, torch.Tensor]) -> str:
    """Return the RWKV version string of an official state dict, following the reference package's rules.

    "7" for RWKV-7; "6", "5.2", "5.1", "5.0", "4" for the older generations. Raises RwkvkitError when the
    keys look like no RWKV checkpoint at all.
    """
    keys = list(state_dict)
    if "emb.weight" not in state_dict or not any(k.startswith("blocks.") for k in keys):
        raise RwkvkitError(
            "not an RWKV checkpoint: expected keys 'emb.weight' and 'blocks.N....' "
            f"(found {len(keys)} keys, e.g. {', '.join(keys[:3]) or 'none'})"
        )
    if any(k.endswith("att.r_k") for k in keys):
        return "7"
    if any("time_maa" in k for k in keys):
        return "6"
    if any("ln_x" in k for k in keys):
        decay = state_dict.get("blocks.0.att.time_decay")
        if decay is not None and decay.dim() == 2 and decay.shape[1] > 1:
            return "5.2"
        if any(k.endswith("att.gate.weight") for k in keys):
            return "5.1"
        return "5.0"
    if any(k.endswith("att.time_first") for k in keys):
        return "4"
    raise RwkvkitError(
        "checkpoint keys match no known RWKV version (no att.r_k, time_maa, ln_x or time_first)"
    )


def _shape(state_dict: dict[str, torch.Tensor], key: str, ndim: int | None = None) -> tuple[int, ...]:
    if key not in state_dict:
        raise RwkvkitError(f"checkpoint is missing the key '{key}'")
    shape = tuple(state_dict[key].shape)
    if ndim is not None and len(shape) != ndim:
        raise RwkvkitError(f"'{key}' must be {ndim}-D, got shape {shape}")
    return shape


def _heads(state_dict: dict[str, torch.Tensor], key: str, n_embd: int) -> tuple[int, int]:
    """(n_head, head_size) from an (H, N) tensor, checked against n_embd."""
    n_head, head_size = _shape(state_dict, key, ndim=2)
    if n_head * head_size != n_embd:
        raise RwkvkitError(f"'{key}' shape ({n_head}, {head_size}) does not match n_embd {n_embd}")
    return n_head, head_size


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Infer the model configuration from an official state dict (keys without any prefix)."""
    version = detect_version(state_dict)
    if version not in SUPPORTED_VERSIONS:
        raise RwkvkitError(
            f"this is an RWKV-{version} checkpoint, which rwkvkit does not support "
            f"(supported: RWKV-{', RWKV-'.join(SUPPORTED_VERSIONS)}); RWKV-5.0/5.1 were early previews, "
            "superseded by 5.2"
        )
    layer_ids = {
        int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()
    }
    if not layer_ids:
        raise RwkvkitError("checkpoint has no 'blocks.N.' keys")
    n_layer = max(layer_ids) + 1
    missing_layers = sorted(set(range(n_layer)) - layer_ids)
    if missing_layers:
        raise RwkvkitError(f"checkpoint has no keys for layer(s) {missing_layers} of {n_layer}")
    vocab_size, n_embd = _shape(state_dict, "emb.weight", ndim=2)
    common = dict(
        version=version,
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        dim_ffn=_shape(state_dict, "blocks.0.ffn.key.weight", ndim=2)[0],
    )
    att = "blocks.0.att."
    if version == "4":
        return ModelConfig(
            **common, n_head=0, head_size=0, dim_att=_shape(state_dict, att + "key.weight", ndim=2)[0]
        )
    if version == "7":
        n_head, head_size = _heads(state_dict, att + "r_k", n_embd)
        value_lora = f"blocks.{min(1, n_layer - 1)}.att.v1"
        return ModelConfig(
            **common,
            n_head=n_head,
            head_size=head_size,
            d_decay=_shape(state_dict, att + "w1", ndim=2)[1],
            d_iclr=_shape(state_dict, att + "a1", ndim=2)[1],
            d_value=_shape(state_dict, value_lora, ndim=2)[1] if value_lora in state_dict else 0,
            d_gate=_shape(state_dict, att + "g1", ndim=2)[1],
            layer0_has_value_lora="blocks.0.att.v1" in state_dict,
            has_time_state=att + "time_state" in state_dict,
        )
    # 5.2 and 6: heads from time_faaaa (H, N); an optional tuned initial state in every layer
    n_head, head_size = _heads(state_dict, att + "time_faaaa", n_embd)
    has_time_state = att + "time_state" in state_dict
    if version == "5.2":
        return ModelConfig(**common, n_head=n_head, head_size=head_size, has_time_state=has_time_state)
    d_mix_5 = _shape(state_dict, att + "time_maa_w1", ndim=2)[1]
    if d_mix_5 % 5:
        raise RwkvkitError(f"'{att}time_maa_w1' width {d_mix_5} is not a multiple of 5 (w, k, v, r, g)")
    return ModelConfig(
        **common,
        n_head=n_head,
        head_size=head_size,
        d_mix=d_mix_5 // 5,
        d_decay=_shape(state_dict, att + "time_decay_w1", ndim=2)[1],
        has_time_state=has_time_state,
    )
