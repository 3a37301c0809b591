"""The Hugging Face layouts of RWKV checkpoints: tensor names, tensor shapes and config.json per version.

This module owns the one table of how an official BlinkDL key is named and shaped in each Hub layout
(and back), and the ``config.json`` each layout carries. It is pure mapping, no files
(:mod:`rwkvkit.checkpoint` reads folders, :mod:`rwkvkit.export.hf` writes them). The layouts, one per
version, as they are published:

    version  layout          model_type   architectures            names
    4        transformers    rwkv         RwkvForCausalLM          rwkv.blocks.N.attention.time_mix_key, ...
    5.2      rwkv-hf         rwkv5        Rwkv5ForCausalLM         rwkv.blocks.N.attention.time_faaaa, ...
    6        rwkv-hf         rwkv6        Rwkv6ForCausalLM         rwkv.blocks.N.attention.time_maa_w1, ...
    7        fla-hub         rwkv7        RWKV7ForCausalLM         model.layers.N.attn.w_lora.lora.0.weight
    any      rwkvkit         rwkvkit      RwkvkitForCausalLM       model.<official key> (rwkvkit.hf's wrapper)

RWKV-4/5.2/6 (transformers' ``RwkvForCausalLM`` and the RWKV team's remote code for ``RWKV/v5-Eagle-*-HF`` /
``RWKV/v6-Finch-*-HF``): ``emb`` -> ``rwkv.embeddings``, ``blocks.0.ln0`` -> ``rwkv.blocks.0.pre_ln``,
``att`` -> ``attention``, ``ffn`` -> ``feed_forward``, ``time_mix_{k,v,r,g}`` -> ``time_mix_{key,value,
receptance,gate}``, ``ln_out`` -> ``rwkv.ln_out``, ``head`` unchanged; every shape is the official one.

RWKV-7 (flash-linear-attention's ``RWKV7ForCausalLM``, the fla-hub repos, read by llama.cpp's and MLC-LLM's
converters): ``emb`` -> ``model.embeddings``, ``ln0/ln1/ln2`` -> ``pre_norm/attn_norm/ffn_norm``, ``att`` ->
``attn`` with ``{receptance,key,value,output}`` -> ``{r,k,v,o}_proj`` and ``ln_x`` -> ``g_norm``; each
low-rank pair ``{w,a,v,g}1 (C, D)``, ``{w,a,v,g}2 (D, C)`` and bias ``{w,a,v}0 (1, 1, C)`` becomes the
``nn.Linear`` pair of ``{w,a,v,g}_lora.lora.0`` (D, C) / ``lora.2`` (C, D) with ``lora.2.bias`` (C,) (so both
matrices are transposed); ``k_k``, ``k_a`` and ``ffn.x_k`` are (C,); ``x_*`` stay (1, 1, C); ``ln_out`` ->
``model.norm``, ``head`` -> ``lm_head``. Layer 0 has no value LoRA in that layout (it is never used there):
the official trainer's unused ``blocks.0.att.v0/v1/v2`` have no name in it (see :mod:`rwkvkit.checkpoint`
for where they go).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError


@dataclass(frozen=True)
class Layout:
    """One Hugging Face layout: what ``config.json`` says and how its tensors are named."""

    name: str  # "transformers", "rwkv-hf", "fla-hub", "rwkvkit"
    model_type: str
    architecture: str
    versions: tuple[str, ...]


LAYOUTS = {
    "4": Layout("transformers", "rwkv", "RwkvForCausalLM", ("4",)),
    "5.2": Layout("rwkv-hf", "rwkv5", "Rwkv5ForCausalLM", ("5.2",)),
    "6": Layout("rwkv-hf", "rwkv6", "Rwkv6ForCausalLM", ("6",)),
    "7": Layout("fla-hub", "rwkv7", "RWKV7ForCausalLM", ("7",)),
}
RWKVKIT_LAYOUT = Layout("rwkvkit", "rwkvkit", "RwkvkitForCausalLM", ("4", "5.2", "6", "7"))
# model_type in config.json -> (layout, version); None: read the version from the config
MODEL_TYPES: dict[str, tuple[Layout, str | None]] = {
    **{layout.model_type: (layout, version) for version, layout in LAYOUTS.items()},
    "rwkv7_fla": (LAYOUTS["7"], "7"),  # newer fla releases name their config so
    "rwkvkit": (RWKVKIT_LAYOUT, None),
}


def supported_layouts() -> str:
    """One line listing what a folder may hold."""
    rows = [f"RWKV-{v}: {lay.architecture} (model_type '{lay.model_type}')" for v, lay in LAYOUTS.items()]
    return "; ".join(rows) + "; rwkvkit.hf's RwkvkitForCausalLM (model_type 'rwkvkit')"


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------

_RWKV_HF_MIX = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value"}
_RWKV_HF_MIX |= {"time_mix_r": "time_mix_receptance", "time_mix_g": "time_mix_gate"}
_RWKV_HF_PARTS = {"ln0": "pre_ln", "att": "attention", "ffn": "feed_forward"}
_FLA_PARTS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm", "att": "attn", "ffn": "ffn"}
_FLA_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_FLA_LORA = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}
_FLA_ENDS = {"emb.weight": "model.embeddings.weight", "head.weight": "lm_head.weight"}
_FLA_ENDS |= {"ln_out.weight": "model.norm.weight", "ln_out.bias": "model.norm.bias"}
_FLA_FLAT = ("att.k_k", "att.k_a", "ffn.x_k")  # (1, 1, C) official, (C,) in fla
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\w+)\.(.+)")


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _rwkv_hf_name(key: str) -> str:
    """An official key's name in the transformers / RWKV-HF layout (RWKV-4, 5.2, 6)."""
    if key == "head.weight":
        return key
    if key.startswith("emb."):
        return "rwkv.embeddings." + key[len("emb.") :]
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        return "rwkv." + key  # ln_out.*
    layer, part, rest = match.groups()
    first, dot, tail = rest.partition(".")
    return f"rwkv.blocks.{layer}.{_RWKV_HF_PARTS.get(part, part)}.{_RWKV_HF_MIX.get(first, first)}{dot}{tail}"


def _fla_name(key: str) -> str:
    """An official RWKV-7 key's name in the fla-hub layout."""
    if key in _FLA_ENDS:
        return _FLA_ENDS[key]
    match = _BLOCK_KEY.fullmatch(key)
    if match is None or match.group(2) not in _FLA_PARTS:
        raise RwkvkitError(f"'{key}' has no name in the fla-hub RWKV-7 layout")
    layer, part, rest = match.groups()
    first, dot, tail = rest.partition(".")
    if part == "att" and re.fullmatch("[wavg][012]", first):
        first, dot, tail = f"{first[0]}_lora", ".", _FLA_LORA[first[1]]
    elif part == "att":
        first = _FLA_PROJ.get(first, first)
    return f"model.layers.{layer}.{_FLA_PARTS[part]}.{first}{dot}{tail}"


def hf_name(layout: Layout, key: str) -> str:
    """The name of an official key in ``layout``."""
    if layout.name == "rwkvkit":
        return "model." + key
    return _fla_name(key) if layout.name == "fla-hub" else _rwkv_hf_name(key)


_HF_LAYER_KEY = re.compile(r"(?:rwkv\.blocks|model\.layers)\.(\d+)\.(\w+)\.(.+)")


def official_name(layout: Layout, name: str) -> str:
    """The official key of a tensor named ``name`` in ``layout`` (RwkvkitError for a name the layout has
    not)."""
    if layout.name == "rwkvkit":
        if not name.startswith("model."):
            raise RwkvkitError(f"'{name}' is not an rwkvkit tensor name (expected 'model.<official key>')")
        return name[len("model.") :]
    if layout.name == "fla-hub":
        ends = _invert(_FLA_ENDS)
        if name in ends:
            return ends[name]
        parts, proj, lora = _invert(_FLA_PARTS), _invert(_FLA_PROJ), _invert(_FLA_LORA)
    else:
        if name == "head.weight":
            return name
        if name.startswith("rwkv.embeddings."):
            return "emb." + name[len("rwkv.embeddings.") :]
        if name.startswith("rwkv.ln_out."):
            return name[len("rwkv.") :]
        parts, proj, lora = _invert(_RWKV_HF_PARTS) | {"ln1": "ln1", "ln2": "ln2"}, _invert(_RWKV_HF_MIX), {}
    match = _HF_LAYER_KEY.fullmatch(name)
    if match is None or match.group(2) not in parts:
        raise RwkvkitError(f"'{name}' is not a tensor of the {layout.name} layout ({layout.architecture})")
    layer, part, rest = match.groups()
    first, dot, tail = rest.partition(".")
    if first.endswith("_lora") and tail in lora:
        return f"blocks.{layer}.att.{first[0]}{lora[tail]}"
    return f"blocks.{layer}.{parts[part]}.{proj.get(first, first)}{dot}{tail}"


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


def _fla_reshaped(key: str) -> str | None:
    """How an official RWKV-7 tensor changes shape in fla: 'T' transposed, 'flat' (1, 1, C) -> (C,)."""
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        return None
    part, rest = match.group(2), match.group(3)
    if part == "att" and re.fullmatch("[wavg][12]", rest):
        return "T"
    if part == "att" and re.fullmatch("[wav]0", rest) or f"{part}.{rest}" in _FLA_FLAT:
        return "flat"
    return None


def hf_tensor(layout: Layout, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """An official tensor as ``layout`` stores it."""
    change = _fla_reshaped(key) if layout.name == "fla-hub" else None
    if change == "T":
        return tensor.t().contiguous()
    if change == "flat":
        return tensor.reshape(-1)
    return tensor


def official_tensor(layout: Layout, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A ``layout`` tensor back in the official shape of ``key``."""
    change = _fla_reshaped(key) if layout.name == "fla-hub" else None
    if change == "T":
        if tensor.dim() != 2:
            raise RwkvkitError(f"'{hf_name(layout, key)}' must be 2-D, got shape {tuple(tensor.shape)}")
        return tensor.t().contiguous()
    if change == "flat":
        if tensor.dim() != 1:
            raise RwkvkitError(f"'{hf_name(layout, key)}' must be 1-D, got shape {tuple(tensor.shape)}")
        return tensor.reshape(1, 1, -1)
    return tensor


# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------


def v6_assumed_widths(n_embd: int) -> tuple[int, int]:
    """(d_mix, d_decay): the low-rank widths the RWKV-6 HF modelling code and llama.cpp's converter assume
    (they read no width from the config: 64 and 128 for the 7B's 4096 channels, else 32 and 64)."""
    return (64, 128) if n_embd == 4096 else (32, 64)


def hf_config(layout: Layout, config: ModelConfig, dtype: torch.dtype) -> dict:
    """The ``config.json`` of a model in ``layout`` (the fields its modelling code and converters read)."""
    common = {
        "architectures": [layout.architecture],
        "model_type": layout.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if layout.name == "rwkvkit":  # rwkvkit.hf's RwkvkitConfig: ModelConfig's fields at the top level
        return common | config.to_dict()
    if layout.name == "fla-hub":
        return common | {
            "attn_mode": "chunk",
            "head_dim": config.head_size,
            "num_heads": config.n_head,
            "hidden_ratio": config.dim_ffn / config.n_embd,
            "intermediate_size": config.dim_ffn,
            "decay_low_rank_dim": config.d_decay,
            "a_low_rank_dim": config.d_iclr,
            "v_low_rank_dim": config.d_value,
            "gate_low_rank_dim": config.d_gate,
            "value_dim": [config.n_embd] * config.n_layer,
            "hidden_act": "sqrelu",
            "norm_first": True,
            "norm_bias": True,
            "norm_eps": 1e-5,
            "attn": None,
            "fuse_norm": True,
            "fuse_cross_entropy": True,
            "max_position_embeddings": 2048,
            "initializer_range": 0.006,
        }
    out = common | {
        "attention_hidden_size": config.dim_att,
        "intermediate_size": config.dim_ffn,
        "layer_norm_epsilon": 1e-5,
        # transformers' RWKV-4 and the RWKV-HF code halve the residual every 6 layers in inference (fp16
        # headroom; exact in fp32 up to the layer norms' epsilon), as the published configs say
        "rescale_every": 6,
    }
    if layout.model_type == "rwkv":
        return out | {"context_length": 1024}
    return out | {"head_size": config.head_size, "head_size_divisor": 8}


def _field(hf: dict, *names: str) -> object:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return None


def check_config(layout: Layout, hf: dict, config: ModelConfig, source: str) -> None:
    """Refuse a ``config.json`` that disagrees with the tensors (RwkvkitError naming the first field)."""
    if layout.name == "rwkvkit":  # RwkvkitConfig: ModelConfig's fields at the top level
        for name, value in config.to_dict().items():
            if name in hf and hf[name] != value:
                raise RwkvkitError(
                    f"{source}: config.json says {name} {hf[name]!r}, but the tensors give {value!r}"
                )
        return
    checks = [
        (("hidden_size",), config.n_embd),
        (("num_hidden_layers", "n_layer"), config.n_layer),
        (("vocab_size",), config.vocab_size),
        (("intermediate_size",), config.dim_ffn),
    ]
    if layout.name == "fla-hub":
        checks += [(("head_dim", "head_size"), config.head_size), (("num_heads",), config.n_head)]
        checks += [(("decay_low_rank_dim",), config.d_decay), (("a_low_rank_dim",), config.d_iclr)]
        checks += [(("v_low_rank_dim",), config.d_value or None), (("gate_low_rank_dim",), config.d_gate)]
    elif layout.model_type != "rwkv":
        checks += [(("head_size",), config.head_size), (("attention_hidden_size",), config.dim_att)]
    else:
        checks += [(("attention_hidden_size",), config.dim_att)]
    for names, value in checks:
        said = _field(hf, *names)
        if said is not None and value is not None and said != value:
            raise RwkvkitError(
                f"{source}: config.json says {names[0]} {said}, but the tensors give {value} "
                f"({config.describe()})"
            )
