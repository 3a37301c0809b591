"""Hugging Face folders out (``rwkvkit export M.pth --to hf -o DIR``), in the layout the Hub uses.

This module owns writing a folder (``export_hf``): the tensors renamed and reshaped by
:mod:`rwkvkit.hf_layouts` into ``model.safetensors`` (the official key order in its metadata), the
official tensors the layout has no name for in ``official_extras.safetensors``, ``config.json`` and
``generation_config.json``, and the tokenizer files (the World tokenizer through
:mod:`rwkvkit.hf.tokenizer_files`, or a copied ``tokenizer.json``). Reading folders back is
:mod:`rwkvkit.checkpoint`'s. The folder is written into a temporary sibling and renamed into place: an
error leaves nothing behind. Needs neither transformers nor the gguf package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkvkit.checkpoint import EXTRAS, KEY_ORDER, WEIGHTS, load_state_dict
from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.hf.tokenizer_files import write_world_tokenizer_files
from rwkvkit.hf_layouts import LAYOUTS, Layout, hf_config, hf_name, hf_tensor, v6_assumed_widths
from rwkvkit.models import check_state_dict
from rwkvkit.quant import read_quantized_metadata

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class HFExportSummary:
    """What ``export_hf`` wrote."""

    layout: Layout
    config: ModelConfig
    files: list[str]
    n_tensors: int
    n_bytes: int
    warnings: list[str] = field(default_factory=list)


def _layout_warnings(config: ModelConfig) -> list[str]:
    if config.version != "6":
        return []
    assumed = v6_assumed_widths(config.n_embd)
    if (config.d_mix, config.d_decay) == assumed:
        return []
    return [
        f"this RWKV-6 has low-rank widths (token shift {config.d_mix}, decay {config.d_decay}); the RWKV "
        f"HF modelling code and llama.cpp's converter assume {assumed[0]} and {assumed[1]} for "
        f"{config.n_embd} channels and cannot load it (rwkvkit can)"
    ]


def _destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RwkvkitError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise RwkvkitError(f"{out} exists and is not empty: choose a new folder")


def _write_tokenizer(folder: Path, config: ModelConfig, tokenizer: str | None) -> list[str]:
    """The tokenizer files: the World tokenizer (the default for a 65536-token vocabulary), a copied
    ``tokenizer.json``, or none."""
    if tokenizer is None:
        tokenizer = "world" if config.vocab_size == 65536 else "none"
    if tokenizer == "none":
        return []
    if tokenizer == "world":
        return write_world_tokenizer_files(folder)
    source = Path(tokenizer)
    if source.suffix != ".json" or not source.is_file():
        raise RwkvkitError(
            f"--tokenizer must be 'world', 'none' or an existing tokenizer.json, got {tokenizer}"
        )
    shutil.copyfile(source, folder / "tokenizer.json")
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


def _layout_tensors(
    layout: Layout, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tensors under the layout's names, official tensors the layout has no name for)."""
    named, extras = {}, {}
    for key, tensor in state_dict.items():
        if layout.name == "fla-hub" and key.startswith("blocks.0.att.v") and key[-1] in "012":
            extras[key] = tensor.contiguous()
            continue
        named[hf_name(layout, key)] = hf_tensor(layout, key, tensor).contiguous()
    return named, extras


def export_hf(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    tokenizer: str | None = None,
    layout: Layout | None = None,
) -> HFExportSummary:
    """Write the checkpoint at ``model_path`` (a file or a folder) as a Hugging Face folder ``out``.

    The layout is the one its version uses on the Hub (``hf_layouts.LAYOUTS``) unless ``layout`` is given;
    ``dtype`` ("fp32", "bf16", "fp16") casts every tensor, else each keeps its dtype; ``tokenizer`` is
    "world", "none" or the path of a ``tokenizer.json`` (default: World for a 65536-token vocabulary).
    """
    from safetensors.torch import save_file

    out = Path(out)
    _destination(out)
    if read_quantized_metadata(model_path) is not None:
        raise RwkvkitError(f"{model_path} is a quantized rwkvkit file: export the unquantized checkpoint")
    state_dict = load_state_dict(model_path)
    config = check_state_dict(state_dict, source=str(model_path))
    if config.has_time_state:
        raise RwkvkitError(
            "this checkpoint carries tuned initial states (att.time_state), which no Hugging Face layout "
            "has a place for: save the state with `rwkvkit train --save-state` and export the base model"
        )
    if dtype is not None:
        state_dict = {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}
    layout = layout or LAYOUTS[config.version]
    named, extras = _layout_tensors(layout, state_dict)
    stored_dtype = next(iter(state_dict.values())).dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # a new folder's usual permissions, not mkdtemp's 0700
    try:
        metadata = {"format": "pt", "rwkv_version": config.version, KEY_ORDER: json.dumps(list(state_dict))}
        save_file(named, str(tmp / WEIGHTS), metadata=metadata)
        files = [WEIGHTS]
        if extras:
            save_file(extras, str(tmp / EXTRAS), metadata={"format": "pt"})
            files.append(EXTRAS)
        (tmp / "config.json").write_text(json.dumps(hf_config(layout, config, stored_dtype), indent=2) + "\n")
        generation = {"bos_token_id": 0, "eos_token_id": 0}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files += ["config.json", "generation_config.json", *_write_tokenizer(tmp, config, tokenizer)]
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as e:
        raise RwkvkitError(f"could not write {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    n_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    return HFExportSummary(layout, config, files, len(state_dict), n_bytes, _layout_warnings(config))
