"""GGUF export for llama.cpp: an official RWKV-6 / RWKV-7 checkpoint as a llama.cpp "rwkv6" / "rwkv7" file.

This module owns the mapping from the official BlinkDL keys to llama.cpp's tensor names and layouts, the
metadata llama.cpp reads for the two architectures, the World tokenizer block, and the choice of each
tensor's storage type. It writes with the ``gguf`` package (``pip install 'rwkvkit[gguf]'``), imported
only when an export runs, and streams: the tensor table is planned from shapes first, then each tensor
is converted and written in turn (beside the checkpoint, one converted tensor is in memory at a time).

Layouts (PyTorch order; ggml lists the same dims reversed), C = n_embd, H heads of size N:

    both   emb -> token_embd, blocks.0.ln0 -> token_embd_norm, ln_out -> output_norm, head -> output,
           ln1 -> attn_norm, ln2 -> attn_norm_2, att.{receptance,key,value,output} -> time_mix_*,
           att.ln_x -> time_mix_ln, ffn.{key,value} -> channel_mix_*; every (1, 1, C) vector squeezed to (C,)
    v6     att.time_maa_{w,k,v,r,g} stacked -> time_mix_lerp_fused (5, 1, 1, C); time_maa_x -> lerp_x;
           time_maa_w1 (C, 5D) -> time_mix_w1 (5D, C) (transposed); time_maa_w2 (5, D, C) -> (5, C, D);
           time_decay -> time_mix_decay (C,) (raw: llama.cpp applies exp(-exp(.)) in its graph);
           time_decay_w1 / w2 transposed; time_faaaa -> time_mix_first (H, N); att.gate -> time_mix_gate;
           ffn.receptance -> channel_mix_receptance; ffn.time_maa_{k,r} -> channel_mix_lerp_{k,r};
           time_mix_output and channel_mix_value of layer i
           divided by 2^(i // 6), with rescale_every_n_layers = 6 (llama.cpp halves the residual every
           6 layers to match; the HF converter does the same)
    v7     att.x_{r,w,k,v,a,g} stacked -> time_mix_lerp_fused (6, 1, 1, C); w0, a0, v0, k_k, k_a -> (C,);
           {w,a,v,g}1 (C, D) and {w,a,v,g}2 (D, C) transposed; r_k (H, N) flattened to (C,);
           layer 0's v0/v1/v2 (unused there) replaced by copies of a0/a1/a2, which llama.cpp loads with
           the iclr width; ffn.x_k -> channel_mix_lerp_k

llama.cpp runs RWKV-7 heads of a multiple of 64 values only (ggml-cpu's wkv7 kernel walks a head
GGML_F32_STEP values at a time, 64 with AVX-512 and 32 with AVX2, with no remainder, so a smaller head
reads and writes past its own values; its CUDA kernel asserts 64 or 128): other head sizes are refused
rather than written as a file llama.cpp would compute wrongly without a word. Every released RWKV-7 has
heads of 64. (Its RWKV-6 kernel has a remainder loop: any head size runs.)

Storage types follow llama.cpp's converter: 1-D tensors, norms, biases, time_mix_first, lerp_fused and
the small low-rank matrices time_mix_w1/w2 (v6 token shift, v7 decay) and time_mix_decay_w1/w2 stay f32;
every other matrix takes the requested type, and a matrix whose rows are not a whole number of 32-value
blocks falls back from q8_0 / q4_0 to f16.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from rwkvkit.checkpoint import atomic_write, load_state_dict
from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.models import check_state_dict
from rwkvkit.quant import read_quantized_metadata
from rwkvkit.tokenizer.world import DEFAULT_VOCAB_PATH, parse_vocab_file

ARCHITECTURES = {"6": "rwkv6", "7": "rwkv7"}  # rwkvkit version -> llama.cpp architecture
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, what the official models were trained with
CONTEXT_LENGTH = 1 << 20  # RWKV has no context limit; llama.cpp's converter writes this
RWKV6_RESCALE_EVERY = 6  # layers per halving of the residual stream in llama.cpp's rwkv6 graph
EOT_TOKEN = b"\n\n"  # llama.cpp's converter marks World id 261 ("\n\n") as end of turn for chat
WORLD_EOT_ID = 0  # id 0 ends a text in the World vocab: bos and eos
CHAT_TEMPLATE = "rwkv-world"  # the name llama.cpp knows the World chat format by
RWKV7_HEAD_MULTIPLE = 64  # llama.cpp's wkv7 kernels compute heads of a multiple of this many values only

# Matrices llama.cpp's converter always keeps in f32 (its graph adds or multiplies them elementwise, or
# they are small low-rank factors).
_F32_SUFFIXES = (
    "time_mix_first.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
)


class Planned(NamedTuple):
    """One GGUF tensor: its name, the source tensor in llama.cpp's layout (a view or a small copy), a
    factor applied when it is written (the v6 rescale) and the ggml type it is stored as."""

    name: str
    tensor: torch.Tensor
    scale: float
    qtype: Any  # gguf.GGMLQuantizationType


@dataclass
class ExportSummary:
    """What an export wrote: the file, its architecture, and how many tensors of each ggml type."""

    path: Path
    architecture: str
    file_type: str
    n_tensors: int
    types: dict[str, int] = field(default_factory=dict)
    n_bytes: int = 0


def import_gguf() -> Any:
    """The ``gguf`` package, or RwkvkitError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise RwkvkitError(
            "GGUF export needs the gguf package: pip install 'rwkvkit[gguf]' (or pip install gguf)"
        ) from None
    return gguf


# ---------------------------------------------------------------------------------------------- tensors


def _vec(t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (1, 1, C) or (H, N) as (C,)."""
    return t.reshape(-1)


def _stacked(sd: dict[str, torch.Tensor], prefix: str, names: tuple[str, ...]) -> torch.Tensor:
    """The (1, 1, C) vectors ``prefix + name`` stacked as (len(names), 1, 1, C) (llama.cpp's lerp_fused)."""
    return torch.stack([sd[prefix + n].reshape(1, 1, -1) for n in names])


def _shared_tensors(sd: dict[str, torch.Tensor], i: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of block ``i`` that v6 and v7 name alike (projections, norms, channel-mix matrices)."""
    b, blk = f"blocks.{i}.", f"blk.{i}."
    for kind in ("weight", "bias"):
        yield f"{blk}attn_norm.{kind}", sd[f"{b}ln1.{kind}"]
        yield f"{blk}attn_norm_2.{kind}", sd[f"{b}ln2.{kind}"]
        yield f"{blk}time_mix_ln.{kind}", sd[f"{b}att.ln_x.{kind}"]
    for part in ("receptance", "key", "value", "output"):
        yield f"{blk}time_mix_{part}.weight", sd[f"{b}att.{part}.weight"]  # (C, C)
    yield f"{blk}channel_mix_key.weight", sd[f"{b}ffn.key.weight"]  # (F, C)
    yield f"{blk}channel_mix_value.weight", sd[f"{b}ffn.value.weight"]  # (C, F)


def _rwkv6_block(sd: dict[str, torch.Tensor], i: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The RWKV-6 tensors of block ``i`` that are not in :func:`_shared_tensors`."""
    b, blk = f"blocks.{i}.att.", f"blk.{i}."
    yield f"{blk}time_mix_lerp_x.weight", _vec(sd[b + "time_maa_x"])
    yield f"{blk}time_mix_lerp_fused.weight", _stacked(sd, b + "time_maa_", ("w", "k", "v", "r", "g"))
    yield f"{blk}time_mix_w1.weight", sd[b + "time_maa_w1"].t()  # (C, 5D) -> (5D, C)
    yield f"{blk}time_mix_w2.weight", sd[b + "time_maa_w2"].permute(0, 2, 1)  # (5, D, C) -> (5, C, D)
    yield f"{blk}time_mix_decay.weight", _vec(sd[b + "time_decay"])
    yield f"{blk}time_mix_decay_w1.weight", sd[b + "time_decay_w1"].t()  # (C, Dd) -> (Dd, C)
    yield f"{blk}time_mix_decay_w2.weight", sd[b + "time_decay_w2"].t()  # (Dd, C) -> (C, Dd)
    yield f"{blk}time_mix_first.weight", sd[b + "time_faaaa"]  # (H, N)
    yield f"{blk}time_mix_gate.weight", sd[b + "gate.weight"]
    f = f"blocks.{i}.ffn."
    yield f"{blk}channel_mix_lerp_k.weight", _vec(sd[f + "time_maa_k"])
    yield f"{blk}channel_mix_lerp_r.weight", _vec(sd[f + "time_maa_r"])
    yield f"{blk}channel_mix_receptance.weight", sd[f + "receptance.weight"]


def _rwkv7_block(sd: dict[str, torch.Tensor], i: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The RWKV-7 tensors of block ``i`` that are not in :func:`_shared_tensors`."""
    b, blk = f"blocks.{i}.att.", f"blk.{i}."
    yield f"{blk}time_mix_lerp_fused.weight", _stacked(sd, b + "x_", ("r", "w", "k", "v", "a", "g"))
    # layer 0 takes v as it is; llama.cpp still loads v0/v1/v2 there, shaped like a0/a1/a2
    value_lora = "a" if i == 0 else "v"
    for lora, source in (("w", "w"), ("a", "a"), ("v", value_lora), ("g", "g")):
        if lora != "g":
            yield f"{blk}time_mix_{lora}0.weight", _vec(sd[f"{b}{source}0"])
        yield f"{blk}time_mix_{lora}1.weight", sd[f"{b}{source}1"].t()  # (C, D) -> (D, C)
        yield f"{blk}time_mix_{lora}2.weight", sd[f"{b}{source}2"].t()  # (D, C) -> (C, D)
    yield f"{blk}time_mix_k_k.weight", _vec(sd[b + "k_k"])
    yield f"{blk}time_mix_k_a.weight", _vec(sd[b + "k_a"])
    yield f"{blk}time_mix_r_k.weight", _vec(sd[b + "r_k"])  # (H, N) -> (C,)
    yield f"{blk}channel_mix_lerp_k.weight", _vec(sd[f"blocks.{i}.ffn.x_k"])


def gguf_tensors(
    sd: dict[str, torch.Tensor], config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor, float]]:
    """(GGUF name, tensor in llama.cpp's layout, factor to apply) for every tensor of the file."""
    yield "token_embd.weight", sd["emb.weight"], 1.0
    yield "token_embd_norm.weight", sd["blocks.0.ln0.weight"], 1.0
    yield "token_embd_norm.bias", sd["blocks.0.ln0.bias"], 1.0
    block = _rwkv6_block if config.version == "6" else _rwkv7_block
    for i in range(config.n_layer):
        scale = 2.0 ** -(i // RWKV6_RESCALE_EVERY) if config.version == "6" else 1.0
        for name, t in _shared_tensors(sd, i):
            rescaled = name.endswith(("time_mix_output.weight", "channel_mix_value.weight"))
            yield name, t, scale if rescaled else 1.0
        for name, t in block(sd, i):
            yield name, t, 1.0
    yield "output_norm.weight", sd["ln_out.weight"], 1.0
    yield "output_norm.bias", sd["ln_out.bias"], 1.0
    yield "output.weight", sd["head.weight"], 1.0


def storage_type(name: str, shape: tuple[int, ...], file_type: str) -> Any:
    """The ggml type llama.cpp's converter stores tensor ``name`` of ``shape`` as, for ``file_type``."""
    gguf = import_gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if name.endswith(_F32_SUFFIXES):
        return Q.F32
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[file_type]
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block_size:
        return Q.F16  # the converter's fallback when gguf cannot quantize the shape
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    """Bytes of a tensor of ``shape`` stored as ``qtype``."""
    gguf = import_gguf()
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block_size) * type_size


def _encoded(item: Planned) -> np.ndarray:
    """The bytes (or f32 / f16 array) written for one planned tensor."""
    gguf = import_gguf()
    t = item.tensor.detach().to(torch.float32)
    if item.scale != 1.0:
        t = t * item.scale
    data = t.contiguous().numpy()
    return gguf.quants.quantize(data, item.qtype)


# ---------------------------------------------------------------------------------------------- metadata


def world_token_block(
    vocab_path: str | os.PathLike, vocab_size: int
) -> tuple[list[bytes], list[int], int | None]:
    """(tokens, token types, eot id) of a World-format vocab as llama.cpp's converter writes them.

    Id 0 is "<s>" (control); id i is the Python escape of the token's bytes (``repr(b)[2:-1]``, which
    llama.cpp's rwkv tokenizer unescapes); rows of the model's vocabulary past the vocab are "[PAD<i>]"
    (unused). The eot id is that of "\\n\\n", when the vocab has it.
    """
    gguf = import_gguf()
    T = gguf.TokenType
    vocab = parse_vocab_file(vocab_path)
    n = max(vocab) + 1
    gaps = sorted(set(range(1, n)) - set(vocab))
    if gaps:
        raise RwkvkitError(f"vocab file {vocab_path} has no token for id(s) {gaps[:5]}")
    if n > vocab_size:
        raise RwkvkitError(
            f"the vocab has {n} ids (with id 0) but the model's embedding has only {vocab_size} rows: "
            "llama.cpp's rwkv tokenizer needs the model's vocabulary to cover the vocab file"
        )
    tokens, types = [b"<s>"], [T.CONTROL]
    for i in range(1, n):
        tokens.append(repr(vocab[i])[2:-1].encode("utf-8"))
        types.append(T.NORMAL)
    for i in range(n, vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        types.append(T.UNUSED)
    eot = next((i for i, tok in vocab.items() if tok == EOT_TOKEN), None)
    return tokens, types, eot


def _add_model_keys(writer: Any, config: ModelConfig, name: str, file_type: str) -> None:
    """general.* and the architecture's hyperparameters, named as llama.cpp reads them."""
    gguf = import_gguf()
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[file_type]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.dim_ffn)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_wkv_head_size(config.head_size)
    writer.add_head_count(0)  # llama.cpp requires the key; RWKV does not use it
    if config.version == "6":
        writer.add_rescale_every_n_layers(RWKV6_RESCALE_EVERY)
        writer.add_time_mix_extra_dim(config.d_mix)
        writer.add_time_decay_extra_dim(config.d_decay)
    else:
        writer.add_decay_lora_rank(config.d_decay)
        writer.add_iclr_lora_rank(config.d_iclr)
        # a one-layer model without layer-0 v1 has no value width; llama.cpp reads the key anyway
        writer.add_value_residual_mix_lora_rank(config.d_value or config.d_iclr)
        writer.add_gate_lora_rank(config.d_gate)


def _add_tokenizer_keys(writer: Any, vocab_path: str | os.PathLike, vocab_size: int) -> None:
    """The tokenizer block: model "rwkv", the token list and types, bos / eos / eot, chat template."""
    tokens, types, eot = world_token_block(vocab_path, vocab_size)
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(WORLD_EOT_ID)
    writer.add_eos_token_id(WORLD_EOT_ID)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_chat_template(CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------- export


def check_exportable(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> ModelConfig:
    """The config of ``sd`` if llama.cpp can run it (RWKV-6, or RWKV-7 with heads of a multiple of 64
    values; no tuned state), else RwkvkitError."""
    config = check_state_dict(sd, source)
    if config.version not in ARCHITECTURES:
        raise RwkvkitError(
            f"{source} is RWKV-{config.version}, which cannot be exported to GGUF: llama.cpp has no "
            f"RWKV-{config.version} architecture (it runs RWKV-6 as 'rwkv6' and RWKV-7 as 'rwkv7')"
        )
    if config.has_time_state:
        raise RwkvkitError(
            f"{source} carries a tuned initial state (att.time_state), which llama.cpp's "
            f"{ARCHITECTURES[config.version]} has no tensor for; export the base checkpoint"
        )
    if config.version == "7" and config.head_size % RWKV7_HEAD_MULTIPLE:
        raise RwkvkitError(
            f"{source} is RWKV-7 with heads of {config.head_size} values: llama.cpp computes RWKV-7 "
            f"heads of a multiple of {RWKV7_HEAD_MULTIPLE} only (its CPU kernel reads past a smaller "
            "head and gives wrong logits; its CUDA kernel takes 64 or 128)"
        )
    return config


def plan_tensors(sd: dict[str, torch.Tensor], config: ModelConfig, file_type: str) -> list[Planned]:
    """Every tensor of the GGUF file, in order, with the type it is stored as."""
    if file_type not in TYPES:
        raise RwkvkitError(f"unknown GGUF type '{file_type}' (choose from {', '.join(TYPES)})")
    return [
        Planned(name, t, scale, storage_type(name, tuple(t.shape), file_type))
        for name, t, scale in gguf_tensors(sd, config)
    ]


def write_gguf(
    sd: dict[str, torch.Tensor],
    out: str | os.PathLike,
    file_type: str = "f16",
    vocab_path: str | os.PathLike | None = None,
    name: str | None = None,
    progress: bool = False,
    source: str = "checkpoint",
) -> ExportSummary:
    """Write the official RWKV-6 / RWKV-7 state dict ``sd`` as a llama.cpp GGUF file at ``out`` (atomically).

    ``vocab_path``: a World-format vocab file for the tokenizer block (default: rwkvkit's World vocab).
    ``name``: general.name (default: the output file's stem). ``progress``: a tqdm bar per tensor.
    """
    gguf = import_gguf()
    config = check_exportable(sd, source)
    arch = ARCHITECTURES[config.version]
    out = Path(out)
    plan = plan_tensors(sd, config, file_type)
    summary = ExportSummary(out, arch, file_type, len(plan))
    for item in plan:
        summary.types[item.qtype.name] = summary.types.get(item.qtype.name, 0) + 1

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_model_keys(writer, config, name or out.stem, file_type)
        _add_tokenizer_keys(writer, vocab_path or DEFAULT_VOCAB_PATH, config.vocab_size)
        for item in plan:
            shape = tuple(item.tensor.shape)
            nbytes = _nbytes(shape, item.qtype)
            writer.add_tensor_info(item.name, shape, np.dtype(np.float32), nbytes, item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in tqdm(plan, desc="writing GGUF", unit="tensor", disable=not progress, dynamic_ncols=True):
            writer.write_tensor_data(_encoded(item))
        writer.close()

    atomic_write(out, write)
    summary.n_bytes = out.stat().st_size
    return summary


def export_gguf(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    file_type: str = "f16",
    vocab_path: str | os.PathLike | None = None,
    name: str | None = None,
    progress: bool = False,
) -> ExportSummary:
    """Export the checkpoint at ``model_path`` (.pth or .safetensors, any float dtype) to GGUF at ``out``.

    rwkvkit's own quantized files are refused: their int8 / int4 weights do not map onto ggml's types.
    """
    import_gguf()  # fail on a missing package before reading a large file
    if read_quantized_metadata(model_path) is not None:
        raise RwkvkitError(
            f"{model_path} is an rwkvkit-quantized file; export the original fp32 / bf16 checkpoint "
            "(--type q8_0 / q4_0 quantize for llama.cpp)"
        )
    sd = load_state_dict(model_path)
    return write_gguf(sd, out, file_type, vocab_path, name, progress, source=str(model_path))
