"""Hugging Face model folders in and out: config.json + safetensors (or pytorch_model.bin) + tokenizer.

This module owns reading a Hub-style folder of any layout in :mod:`rwkvkit.hf_layouts` into the official
state dict (``read_hf_folder``: the layout detected from ``config.json``, shards from the index, ``.bin``
files read without unpickling code, every name and shape checked, the config checked against the tensors)
and writing one (``export_hf``: ``rwkvkit export M.pth --to hf -o DIR``). Neither needs transformers.

Round trip: ``.pth -> DIR -> .pth`` gives the same keys, shapes, dtypes and values, in the same order. The
order travels in the safetensors metadata (``rwkvkit_key_order``); tensors the layout has no name for (the
official trainer's unused layer-0 value LoRA of RWKV-7, absent from the fla-hub layout) travel in
``official_extras.safetensors``, a file the layout's readers do not open (transformers reads
``model*.safetensors``, llama.cpp's converter ``model*.safetensors`` too).

A folder is written into a temporary sibling and renamed into place: an error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkvkit.config import ModelConfig, config_from_state_dict
from rwkvkit.errors import RwkvkitError
from rwkvkit.hf_layouts import (
    LAYOUTS,
    MODEL_TYPES,
    Layout,
    check_config,
    hf_config,
    hf_name,
    hf_tensor,
    official_name,
    official_tensor,
    supported_layouts,
    v6_assumed_widths,
)

WEIGHTS = "model.safetensors"
EXTRAS = "official_extras.safetensors"
KEY_ORDER = "rwkvkit_key_order"
WORLD_VOCAB = "rwkv_vocab_v20230424.txt"  # the name the RWKV HF repos, fla-hub and llama.cpp's converter use
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (a Hugging Face model folder)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def folder_tokenizer(path: str | os.PathLike) -> str | None:
    """The tokenizer a Hugging Face folder ships, as ``rwkvkit.tokenizer.load_tokenizer`` takes it: its
    World vocab file or its ``tokenizer.json``; None for a file or a folder with neither."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    for name in (WORLD_VOCAB, "tokenizer.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return None


def read_config(folder: Path) -> dict:
    """The folder's ``config.json`` (RwkvkitError when missing or not a JSON object)."""
    path = folder / "config.json"
    if not path.is_file():
        raise RwkvkitError(
            f"{folder} is a folder without config.json: not a Hugging Face model folder "
            "(give a checkpoint file, or a folder with config.json and model.safetensors / pytorch_model.bin)"
        )
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RwkvkitError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise RwkvkitError(f"{path} must hold a JSON object, found {type(hf).__name__}")
    return hf


def detect_layout(folder: Path, hf: dict) -> tuple[Layout, str | None]:
    """(layout, version or None) from ``config.json``'s model_type; one line naming what was found."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        arch = ", ".join(hf.get("architectures") or []) or "none given"
        raise RwkvkitError(
            f"{folder}: config.json has model_type {model_type!r} (architectures: {arch}), which is not an "
            f"RWKV layout rwkvkit reads; supported: {supported_layouts()}"
        )
    return MODEL_TYPES[model_type]


def _weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: the shards its index names (each checked to exist), or the one file."""
    for single in (WEIGHTS, "pytorch_model.bin"):
        index = folder / f"{single}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise RwkvkitError(f"{index} is not a valid shard index ({e})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise RwkvkitError(
                    f"{folder}: {len(missing)} of {len(shards)} shard(s) missing: {missing[:3]}"
                )
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise RwkvkitError(f"{folder} has config.json but no weights (model.safetensors or pytorch_model.bin)")


def _read_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """Every tensor of the weight files (``.bin`` through torch's weights-only loader), and the official
    key order if rwkvkit wrote it."""
    from rwkvkit.checkpoint import load_state_dict, safetensors_metadata

    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        part = load_state_dict(path)
        repeated = sorted(set(part) & set(tensors))
        if repeated:
            raise RwkvkitError(f"{path} repeats tensor(s) of another shard: {repeated[:3]}")
        tensors.update(part)
    order = safetensors_metadata(files[0]).get(KEY_ORDER) if files[0].suffix == ".safetensors" else None
    return tensors, json.loads(order) if order else None


def _canonical_order(config: ModelConfig) -> list[str]:
    from rwkvkit.models.io import build_model

    return list(build_model(config, device="meta").state_dict())


def read_hf_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The official state dict of a Hugging Face folder of any supported layout (tensors in their stored
    dtypes). Raises RwkvkitError naming the problem: unknown layout, missing shards, a tensor the layout
    has not, a shape or a config field that disagrees with the tensors."""
    folder = Path(folder)
    hf = read_config(folder)
    layout, version = detect_layout(folder, hf)
    tensors, order = _read_tensors(_weight_files(folder))
    state_dict = {}
    for name, tensor in tensors.items():
        key = official_name(layout, name)
        state_dict[key] = official_tensor(layout, key, tensor)
    if (folder / EXTRAS).is_file():  # official tensors the layout has no name for, as they were
        from rwkvkit.checkpoint import load_state_dict

        state_dict.update(load_state_dict(folder / EXTRAS))
    source = f"{folder} ({layout.architecture})"
    try:
        config = config_from_state_dict(state_dict)
    except RwkvkitError as e:
        raise RwkvkitError(f"{source}: {e}") from None
    if config.version not in layout.versions or (version is not None and config.version != version):
        raise RwkvkitError(
            f"{source}: config.json says {layout.model_type} but the tensors are RWKV-{config.version}"
        )
    check_config(layout, hf, config, source)
    if order is None or set(order) != set(state_dict):
        canonical = _canonical_order(config)
        order = [k for k in canonical if k in state_dict] + [k for k in state_dict if k not in canonical]
    return {key: state_dict[key] for key in order}


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


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
        from rwkvkit.hf.tokenizer_files import write_world_tokenizer_files

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

    from rwkvkit.checkpoint import load_state_dict
    from rwkvkit.models.io import check_state_dict
    from rwkvkit.quant import read_quantized_metadata

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
