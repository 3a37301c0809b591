"""Model registry: build a model from a config, load one from a checkpoint file, save it back.

One module per RWKV version (``rwkv7.py``); this file maps ``config.version`` to the class and owns
the checkpoint <-> module plumbing (key and shape checks, dtype and device placement).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rwkvkit.checkpoint import load_state_dict, save_state_dict
from rwkvkit.config import ModelConfig, config_from_state_dict
from rwkvkit.errors import RwkvkitError
from rwkvkit.models.rwkv7 import RWKV7

MODEL_CLASSES: dict[str, type[nn.Module]] = {"7": RWKV7}


def build_model(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A model with the given config and uninitialised (zero) parameters."""
    cls = MODEL_CLASSES.get(config.version)
    if cls is None:
        raise RwkvkitError(f"RWKV-{config.version} is not supported (supported: {', '.join(MODEL_CLASSES)})")
    with torch.device(device):
        model = cls(config)
    return model.to(dtype=dtype)


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
):
    """Build the model that ``state_dict`` describes and place its tensors on ``device`` as ``dtype``.

    Tensors already on the CPU in the right dtype are used as they are (no copy: a memory-mapped file
    stays mapped). Remembers each key's original dtype and the key order so ``save_model`` writes the
    same layout back.
    """
    config = config_from_state_dict(state_dict)
    cls = MODEL_CLASSES[config.version]
    with torch.device("meta"):
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise RwkvkitError(f"{source} is missing {len(missing)} RWKV-{config.version} key(s): {missing[:4]}")
    if unexpected:
        raise RwkvkitError(
            f"{source} has {len(unexpected)} key(s) this RWKV-{config.version} model does not use "
            f"(an unsupported variant?): {unexpected[:4]}"
        )
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise RwkvkitError(
                f"{source}: '{key}' has shape {tuple(state_dict[key].shape)}, expected {shape} "
                f"for {config.describe()}"
            )
    placed = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(placed, assign=True)
    model.source_dtypes = {k: v.dtype for k, v in state_dict.items()}
    model.source_key_order = list(state_dict)
    return model.eval()


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """Load an official RWKV checkpoint (`.pth` or `.safetensors`) as a model on ``device`` in ``dtype``."""
    return model_from_state_dict(load_state_dict(path), device=device, dtype=dtype, source=str(path))


def export_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the official keys, in the checkpoint's original key order and dtypes.

    ``dtype`` forces one dtype for every tensor; otherwise each key keeps the dtype it was loaded with
    (or the model's dtype for a model that was not loaded from a file).
    """
    tensors = model.state_dict()
    order = getattr(model, "source_key_order", None) or list(tensors)
    source_dtypes = getattr(model, "source_dtypes", {})
    out = {}
    for key in order:
        t = tensors[key].detach()
        out[key] = t.to(dtype or source_dtypes.get(key, t.dtype))
    return out


def save_model(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write the model as an official checkpoint (`.pth`, or `.safetensors` by suffix), atomically."""
    metadata = {"format": "pt", "rwkv_version": model.config.version}
    save_state_dict(export_state_dict(model, dtype), Path(path), metadata=metadata)
