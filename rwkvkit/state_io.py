"""State files: an RWKVState saved to and loaded from `.safetensors`, tied to the model that made it.

A state is only meaningful for the exact weights that produced it, so a state file records the model's
identity and :func:`load_state` refuses a file made by another model. The file holds three tensors,
``att_shift`` (L, B, C), ``wkv`` (L, B, H, N, N) or (L, B, 3, C) for RWKV-4, always fp32, and
``ffn_shift`` (L, B, C), and string metadata:

- ``format`` = "rwkvkit-state" and ``format_version`` = "1": what the file is;
- ``config``: the model's full ModelConfig as JSON;
- ``dtype``: the model's dtype (a state from the bf16 copy of a model is refused by its fp32 copy: the
  weights, and so the states, differ);
- ``fingerprint``: :func:`model_fingerprint` of the model;
- ``checksum``: sha256 of the three tensors' bytes, so a file damaged inside the tensor data is refused.

Writing is atomic (``rwkvkit.checkpoint.atomic_write``). Every failure is a one-line RwkvkitError.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from rwkvkit.checkpoint import atomic_write
from rwkvkit.errors import RwkvkitError
from rwkvkit.state import RWKVState

STATE_FORMAT = "rwkvkit-state"
STATE_FORMAT_VERSION = "1"
STATE_TENSORS = ("att_shift", "wkv", "ffn_shift")
FINGERPRINT_SAMPLES = 1024  # elements sampled from every tensor of the model (see model_fingerprint)
_FINGERPRINT_ATTR = "_rwkvkit_fingerprint"  # (validity key, fingerprint) cached on the model object


# ------------------------------------------------------------------------------------------ fingerprint


def _weights_key(model: nn.Module) -> tuple:
    """What identifies the model's tensors as objects (not their values): name, storage, dtype, shape."""
    return tuple(
        (name, t.data_ptr(), str(t.device), t.dtype, tuple(t.shape)) for name, t in model.state_dict().items()
    )


def _sample_indices(numel: int) -> torch.Tensor:
    """Up to FINGERPRINT_SAMPLES evenly spaced flat positions in [0, numel), first and last included.

    Integer arithmetic on the CPU, so the positions are the same on every device."""
    k = min(numel, FINGERPRINT_SAMPLES)
    if k == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.arange(k, dtype=torch.long) * (numel - 1) // (k - 1)


@torch.no_grad()
def _compute_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256(b"rwkvkit-fingerprint-v1\n")
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"\n{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        sample = flat[_sample_indices(flat.numel()).to(flat.device)]
        # float64 holds every fp16 / bf16 / fp32 value exactly, so the bytes are those of the weights
        digest.update(sample.to(device="cpu", dtype=torch.float64).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A sha256 hex string that identifies the model's weights, cheap to compute for any model size.

    It covers the config, the dtype, and the name and shape of every tensor in ``model.state_dict()``
    (parameters and buffers, including a tuned ``att.time_state``), plus the values of up to 1024
    evenly spaced elements of each tensor (all of a small tensor). A change that touches many elements
    (training, fine-tuning, a merged LoRA, another dtype) changes it; a change confined to elements that
    are not sampled (e.g. one edited row of ``emb.weight``) may not. Independent of the device.

    Cached on the model object and recomputed when a tensor is replaced, moved or cast (its storage,
    device, dtype or shape changes). Weights modified in place after the first call (an optimizer step,
    ``load_state_dict`` into the existing tensors) keep the cached value: that is the caller's business;
    delete ``model._rwkvkit_fingerprint`` to force a recomputation.
    """
    key = _weights_key(model)
    cached = getattr(model, _FINGERPRINT_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    fingerprint = _compute_fingerprint(model)
    setattr(model, _FINGERPRINT_ATTR, (key, fingerprint))
    return fingerprint


# ------------------------------------------------------------------------------------------- save / load


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the bytes of the state tensors (CPU, contiguous), in STATE_TENSORS order."""
    digest = hashlib.sha256()
    for name in STATE_TENSORS:
        digest.update(tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _config_json(model: nn.Module) -> str:
    return json.dumps(model.config.to_dict(), sort_keys=True)


def save_state(state: RWKVState, path: str | os.PathLike, model: nn.Module) -> None:
    """Write ``state`` (any batch size B) of ``model`` to ``path`` as `.safetensors`, atomically.

    The shifts keep their dtype, the WKV state is written as fp32; the metadata records the model's
    identity (config, dtype, :func:`model_fingerprint`) for :func:`load_state` to check.
    """
    from safetensors.torch import save_file

    if not isinstance(state, RWKVState):
        raise RwkvkitError(f"save_state needs an RWKVState, got {type(state).__name__}")
    state.check_compatible(model.config, state.batch_size)
    if tuple(state.ffn_shift.shape) != tuple(state.att_shift.shape):
        raise RwkvkitError(
            f"state ffn_shift {tuple(state.ffn_shift.shape)} does not match att_shift "
            f"{tuple(state.att_shift.shape)}"
        )
    tensors = {
        "att_shift": state.att_shift.detach().to("cpu").contiguous(),
        "wkv": state.wkv.detach().to(device="cpu", dtype=torch.float32).contiguous(),
        "ffn_shift": state.ffn_shift.detach().to("cpu").contiguous(),
    }
    metadata = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "config": _config_json(model),
        "dtype": str(model.dtype),
        "fingerprint": model_fingerprint(model),
        "checksum": _checksum(tensors),
    }
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors on the CPU) of a safetensors file; RwkvkitError if it is not one or is damaged."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise RwkvkitError(f"no such file: {path}")
    if path.is_dir():
        raise RwkvkitError(f"{path} is a directory, not a state file")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":  # safetensors: u64 header length, then JSON
        raise RwkvkitError(f"{path} is not an rwkvkit state file (not a .safetensors file)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RwkvkitError(f"{path} is truncated or corrupt ({detail})") from None
    return metadata, tensors


def _config_difference(saved: dict, current: dict) -> str:
    """'n_layer 2 != 3, n_embd ...': the fields that differ (saved value first)."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k} {saved.get(k)!r} != {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    return ", ".join(diffs[:4])


def load_state(path: str | os.PathLike, model: nn.Module) -> RWKVState:
    """Read a state written by :func:`save_state` for ``model``: on the model's device, the shifts in
    the model's dtype, the WKV state fp32.

    Raises RwkvkitError for a missing file, a file that is not a state file, a truncated or corrupt
    one, and a state of another model: another config, another dtype, or the same shapes with other
    weights (the fingerprint differs).
    """
    path = Path(path)
    metadata, tensors = _read_file(path)
    saved_config = _saved_config(path, metadata)
    _check_same_model(path, metadata, saved_config, model)
    state = _state_from_tensors(path, metadata, tensors)
    state.check_compatible(model.config, state.batch_size)
    if state.wkv.dtype != torch.float32:
        raise RwkvkitError(f"{path} is a damaged state file: wkv is {state.wkv.dtype}, expected float32")
    if not (state.att_shift.is_floating_point() and state.ffn_shift.is_floating_point()):
        raise RwkvkitError(f"{path} is a damaged state file: the shifts are not floating point")
    return state.to(device=model.device, dtype=model.dtype)


def _saved_config(path: Path, metadata: dict[str, str]) -> dict:
    """The config a state file records, once its metadata is checked to be that of a state file."""
    if metadata.get("format") != STATE_FORMAT:
        raise RwkvkitError(
            f"{path} is not an rwkvkit state file (no '{STATE_FORMAT}' format in its metadata)"
        )
    if metadata.get("format_version") != STATE_FORMAT_VERSION:
        raise RwkvkitError(
            f"{path} is a state file of format version {metadata.get('format_version')!r}; "
            f"this rwkvkit reads version {STATE_FORMAT_VERSION}"
        )
    missing = [k for k in ("config", "dtype", "fingerprint", "checksum") if k not in metadata]
    if missing:
        raise RwkvkitError(f"{path} is a damaged state file: its metadata lacks {missing}")
    try:
        return json.loads(metadata["config"])
    except json.JSONDecodeError:
        raise RwkvkitError(f"{path} is a damaged state file: its config metadata is not JSON") from None


def _check_same_model(path: Path, metadata: dict[str, str], saved_config: dict, model: nn.Module) -> None:
    """RwkvkitError unless the file was made by this model: same config, dtype and weight fingerprint."""
    current_config = model.config.to_dict()
    if saved_config != current_config:
        raise RwkvkitError(
            f"{path} is a state of another model ({_config_difference(saved_config, current_config)}; "
            f"this model is {model.config.describe()})"
        )
    if metadata["dtype"] != str(model.dtype):
        raise RwkvkitError(
            f"{path} is a state of this model's weights in {metadata['dtype']}, but the model is "
            f"{model.dtype}: load the model in that dtype"
        )
    if metadata["fingerprint"] != model_fingerprint(model):
        raise RwkvkitError(
            f"{path} is a state of another model with the same shapes (its weight fingerprint differs)"
        )


def _state_from_tensors(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> RWKVState:
    """The RWKVState of the file's tensors, once their names, checksum and shift shapes are checked."""
    if sorted(tensors) != sorted(STATE_TENSORS):
        raise RwkvkitError(
            f"{path} is a damaged state file: tensors {sorted(tensors)}, expected {list(STATE_TENSORS)}"
        )
    if _checksum(tensors) != metadata["checksum"]:
        raise RwkvkitError(f"{path} is corrupt: its tensor data does not match the checksum")
    state = RWKVState(tensors["att_shift"], tensors["wkv"], tensors["ffn_shift"])
    if state.att_shift.dim() != 3 or tuple(state.ffn_shift.shape) != tuple(state.att_shift.shape):
        raise RwkvkitError(
            f"{path} is a damaged state file: att_shift {tuple(state.att_shift.shape)}, "
            f"ffn_shift {tuple(state.ffn_shift.shape)}"
        )
    return state
