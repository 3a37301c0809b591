"""Model configuration: a dataclass describing one RWKV model, inferred from checkpoint tensor shapes.

Every width is read from a tensor's shape, never assumed: released models use low-rank widths that
differ from today's training code. ``config_from_state_dict`` is the one place that does this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from rwkvkit.errors import RwkvkitError


@dataclass
class ModelConfig:
    """Shape of an RWKV model. ``version`` is "7" for RWKV-7 ("Goose")."""

    version: str
    n_layer: int
    n_embd: int  # C
    vocab_size: int  # V
    n_head: int  # H
    head_size: int  # N, with C == H * N
    dim_ffn: int  # F, ffn.key is (F, C)
    # RWKV-7 low-rank widths (w1 is (C, d_decay), a1 (C, d_iclr), v1 (C, d_value), g1 (C, d_gate))
    d_decay: int = 0
    d_iclr: int = 0
    d_value: int = 0
    d_gate: int = 0
    # Whether layer 0 carries att.v0/v1/v2 (unused there; present in files from the official trainer)
    layer0_has_value_lora: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"RWKV-{self.version} L{self.n_layer} D{self.n_embd} H{self.n_head}x{self.head_size} "
            f"F{self.dim_ffn} V{self.vocab_size}"
        )


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


SUPPORTED_VERSIONS = ("7",)


def _shape(state_dict: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise RwkvkitError(f"checkpoint is missing the key '{key}'")
    return tuple(state_dict[key].shape)


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Infer the model configuration from an official state dict (keys without any prefix)."""
    version = detect_version(state_dict)
    if version not in SUPPORTED_VERSIONS:
        raise RwkvkitError(
            f"this is an RWKV-{version} checkpoint; supported versions are: {', '.join(SUPPORTED_VERSIONS)}"
        )
    layer_ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
    n_layer = max(layer_ids) + 1
    missing_layers = sorted(set(range(n_layer)) - layer_ids)
    if missing_layers:
        raise RwkvkitError(f"checkpoint has no keys for layer(s) {missing_layers} of {n_layer}")
    emb = _shape(state_dict, "emb.weight")
    if len(emb) != 2:
        raise RwkvkitError(f"emb.weight must be 2-D (vocab, n_embd), got shape {emb}")
    vocab_size, n_embd = emb
    n_head, head_size = _shape(state_dict, "blocks.0.att.r_k")
    if n_head * head_size != n_embd:
        raise RwkvkitError(f"att.r_k shape ({n_head}, {head_size}) does not match n_embd {n_embd}")
    config = ModelConfig(
        version=version,
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_head=n_head,
        head_size=head_size,
        dim_ffn=_shape(state_dict, "blocks.0.ffn.key.weight")[0],
        d_decay=_shape(state_dict, "blocks.0.att.w1")[1],
        d_iclr=_shape(state_dict, "blocks.0.att.a1")[1],
        d_value=_shape(state_dict, f"blocks.{min(1, n_layer - 1)}.att.v1")[1]
        if f"blocks.{min(1, n_layer - 1)}.att.v1" in state_dict
        else 0,
        d_gate=_shape(state_dict, "blocks.0.att.g1")[1],
        layer0_has_value_lora="blocks.0.att.v1" in state_dict,
    )
    return config
