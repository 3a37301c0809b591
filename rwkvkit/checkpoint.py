"""Official checkpoints in and out: BlinkDL `.pth` and `.safetensors` files, and Hugging Face folders.

Loading is safe and lean: `.pth` files are read with ``torch.load(weights_only=True)`` (tensors and plain
containers only, so a crafted pickle cannot run code) and memory-mapped, so the weights are not read into
a second full copy in RAM. Every failure becomes a one-line ``RwkvkitError`` naming the problem.
Saving is atomic (write to a temporary file in the same folder, then rename).

A Hugging Face folder (``config.json`` + ``model.safetensors``, shards with their index, or
``pytorch_model.bin``) of any layout in :mod:`rwkvkit.hf_layouts` reads as the official state dict: the
layout detected from ``config.json``, every shard checked to exist, each name and shape mapped back, the
config checked against the tensors. The official key order travels in the safetensors metadata
(``rwkvkit_key_order``, written by ``rwkvkit export --to hf``), and tensors a layout has no name for (the
official trainer's unused layer-0 value LoRA of RWKV-7) in ``official_extras.safetensors``, which the
layout's own readers do not open; so ``.pth -> folder -> .pth`` is the same file content.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from rwkvkit.config import config_from_state_dict
from rwkvkit.errors import RwkvkitError
from rwkvkit.hf_layouts import (
    MODEL_TYPES,
    Layout,
    check_config,
    official_name,
    official_tensor,
    supported_layouts,
)

PREFIXES_TO_STRIP = ("_forward_module.", "module.")
SAFETENSORS_SUFFIX = ".safetensors"
# Hugging Face folders
WEIGHTS = "model.safetensors"
EXTRAS = "official_extras.safetensors"
KEY_ORDER = "rwkvkit_key_order"
WORLD_VOCAB = "rwkv_vocab_v20230424.txt"  # the name the RWKV HF repos, fla-hub and llama.cpp's converter use


def _file_kind(path: Path) -> str:
    """The container format from the first bytes: 'zip' (torch >= 1.6), 'pickle' (legacy), 'safetensors'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) == 0:
        raise RwkvkitError(f"{path} is empty (0 bytes), not a checkpoint")
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol marker used by the legacy torch.save format
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        return "safetensors"
    raise RwkvkitError(f"{path} is not a checkpoint (neither a torch .pth nor a .safetensors file)")


def _strip_prefix(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES_TO_STRIP:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def _load_pth(path: Path, kind: str) -> dict:
    try:
        if kind == "zip":
            with zipfile.ZipFile(path):  # a truncated file has no central directory: BadZipFile
                pass
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except RwkvkitError:
        raise
    except zipfile.BadZipFile as e:
        raise RwkvkitError(f"{path} is truncated or corrupt ({e})") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next(
            (line for line in first if "Unsupported" in line or "GLOBAL" in line), first[0] if first else ""
        )
        raise RwkvkitError(
            f"refusing to load {path}: it holds objects other than tensors, which could run code "
            f"({detail.strip()})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RwkvkitError(f"{path} is truncated or corrupt ({msg})") from None


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RwkvkitError(f"{path} is truncated or corrupt ({str(e).strip().splitlines()[0]})") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{key: tensor}`` dict under the official keys (memory-mapped where
    possible).

    Accepts official `.pth` files (zip or legacy format), `.safetensors`, and Hugging Face folders of the
    layouts in :mod:`rwkvkit.hf_layouts` (read by ``read_hf_folder``). Strips the
    ``_forward_module.`` prefix that some trainers add. Raises RwkvkitError on any problem.
    """
    path = Path(path)
    if not path.exists():
        raise RwkvkitError(f"no such file: {path}")
    if path.is_dir():  # a Hugging Face folder (config.json + weights) of a layout rwkvkit reads
        return read_hf_folder(path)
    kind = _file_kind(path)
    state_dict = _load_safetensors(path) if kind == "safetensors" else _load_pth(path, kind)
    if not isinstance(state_dict, dict):
        raise RwkvkitError(f"{path} does not hold a state dict (found {type(state_dict).__name__})")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise RwkvkitError(f"{path} is not a weights file: entries {not_tensors[:3]} are not tensors")
    return _strip_prefix(state_dict)


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata in a safetensors file's header ({} when it has none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise RwkvkitError(f"{path} is truncated or corrupt ({str(e).strip().splitlines()[0]})") from None


# --------------------------------------------------------------------------------------------------
# Hugging Face folders
# --------------------------------------------------------------------------------------------------


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
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        part = load_state_dict(path)  # a file: .safetensors, or .bin through the weights-only loader
        repeated = sorted(set(part) & set(tensors))
        if repeated:
            raise RwkvkitError(f"{path} repeats tensor(s) of another shard: {repeated[:3]}")
        tensors.update(part)
    order = safetensors_metadata(files[0]).get(KEY_ORDER) if files[0].suffix == ".safetensors" else None
    return tensors, json.loads(order) if order else None


def _official_order(keys: list[str]) -> list[str]:
    """The official file order for keys read without one: emb, then block by block (each in its stored
    order), ln_out, head."""

    def rank(item: tuple[int, str]) -> tuple[int, int, int]:
        position, key = item
        if key.startswith("blocks."):
            return (1, int(key.split(".")[1]), position)
        return ({"emb.weight": 0, "head.weight": 3}.get(key, 2), 0, position)

    return [key for _, key in sorted(enumerate(keys), key=rank)]


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
        order = _official_order(list(state_dict))
    return {key: state_dict[key] for key in order}


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves a half-written file.

    The file gets the usual permissions of a new file (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        raise RwkvkitError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` as an official `.pth` (plain ``torch.save`` of a dict) or as `.safetensors`.

    The format follows the file suffix. Tensors are written contiguous and on the CPU, keys unchanged.
    """
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
