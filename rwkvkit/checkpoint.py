"""Official checkpoint files in and out: BlinkDL `.pth` and `.safetensors` with the same key names.

Loading is safe and lean: `.pth` files are read with ``torch.load(weights_only=True)`` (tensors and plain
containers only, so a crafted pickle cannot run code) and memory-mapped, so the weights are not read into
a second full copy in RAM. Every failure becomes a one-line ``RwkvkitError`` naming the problem.
Saving is atomic (write to a temporary file in the same folder, then rename).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from rwkvkit.errors import RwkvkitError

PREFIXES_TO_STRIP = ("_forward_module.", "module.")
SAFETENSORS_SUFFIX = ".safetensors"


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
    layouts in :mod:`rwkvkit.hf_layouts` (read by :mod:`rwkvkit.hf_folder`). Strips the
    ``_forward_module.`` prefix that some trainers add. Raises RwkvkitError on any problem.
    """
    path = Path(path)
    if not path.exists():
        raise RwkvkitError(f"no such file: {path}")
    if path.is_dir():  # a Hugging Face folder (config.json + weights) of a layout rwkvkit reads
        from rwkvkit.hf_folder import read_hf_folder

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
