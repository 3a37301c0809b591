"""The official from-scratch init recipes' shared helpers and the configs of new models.

Each version module's ``init_official_`` sets its own time parameters from the ramps here, after
:func:`init_shared_` has set what every version shares (embedding, head, norms, projections). The
recipes follow the official trainers (RWKV-LM), including their widths for new models.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from rwkvkit.errors import RwkvkitError

if TYPE_CHECKING:
    from rwkvkit.models.common import RWKVModel

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


def heads_of(n_embd: int, head_size: int) -> int:
    """The number of heads of a new model (v5.2 / v6 / v7): ``n_embd`` must be a multiple of
    ``head_size``."""
    if n_embd % head_size:
        raise RwkvkitError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
    return n_embd // head_size


def lora_width(multiplier: float, base: float) -> int:
    """Low-rank width as the official trainer picks it: a multiple of 32, at least 32."""
    return max(32, int(round(multiplier * base / 32) * 32))


def orthogonal_(weight: torch.Tensor, gain: float) -> None:
    """Orthogonal init; like the official trainer, a tall matrix gets gain * sqrt(rows / cols)."""
    rows, cols = weight.shape
    if rows > cols:
        gain *= math.sqrt(rows / cols)
    nn.init.orthogonal_(weight, gain=gain)


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
    """The per-channel ramps and per-layer ratios of the official init recipes (layer l of L, C
    channels), named as the official trainers name them."""

    channel: torch.Tensor  # c = 0 .. C - 1, (C,)
    fraction: torch.Tensor  # c / C as (1, 1, C) (the trainers' "ddd")
    ratio_0_to_1: float  # l / (L - 1): 0 at the first layer, 1 at the last
    ratio_1_to_almost_0: float  # 1 - l / L: 1 at the first layer, 1 / L at the last


def ramps(C: int, layer_id: int, n_layer: int, device: torch.device) -> Ramps:
    channel = torch.arange(C, device=device, dtype=torch.float32)
    return Ramps(
        channel, (channel / C).view(1, 1, C), layer_id / max(n_layer - 1, 1), 1.0 - layer_id / n_layer
    )


def official_layers(model: RWKVModel) -> Iterator[tuple[nn.Module, nn.Module, Ramps]]:
    """Start the official from-scratch init of ``model`` (:func:`init_shared_`), then yield each layer's
    time mix, channel mix and :func:`ramps` for the version's own recipe to set (in place)."""
    init_shared_(model)
    C, L = model.config.n_embd, model.config.n_layer
    for layer_id, block in enumerate(model.blocks):
        yield block.att, block.ffn, ramps(C, layer_id, L, model.device)


def time_decay_init(C: int, ratio_0_to_1: float, channel: torch.Tensor) -> torch.Tensor:
    """Official decay speeds of v5.2 / v6: -6 + 5 (c / (C - 1)) ** (0.7 + 1.3 ratio_0_to_1), (C,)."""
    return -6 + 5 * (channel / (C - 1)) ** (0.7 + 1.3 * ratio_0_to_1)


def time_faaaa_init(C: int, ratio_0_to_1: float, channel: torch.Tensor) -> torch.Tensor:
    """Official bonus of v5.2 / v6: ratio_0_to_1 (1 - c / (C - 1)) + 0.1 ((c + 1) % 3 - 1), (C,)."""
    return ratio_0_to_1 * (1 - channel / (C - 1)) + 0.1 * ((channel + 1) % 3 - 1)
