"""Building, loading and saving models: the one registry of versions and the checkpoint <-> model plumbing.

``VERSIONS`` maps ``config.version`` to its module (``rwkv4.py``, ``rwkv5.py`` (5.2), ``rwkv6.py``,
``rwkv7.py``), each exporting the same names: ``Model`` (the model class), ``new_shape(n_embd,
head_size)`` (the heads and widths of a model trained from scratch, which :func:`new_config` completes)
and ``init_official_(model)``.

This module owns key and shape checks, dtype and device placement, and the loader that composes the model
with :mod:`rwkvkit.quant` (as gpt-fast's loader applies its quantization handler): a quantized file is
read by building the model on the "meta" device and letting ``quant`` install its layers. Neither the
model classes nor ``quant`` import each other; this module sits above both.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from rwkvkit.checkpoint import load_state_dict, save_state_dict
from rwkvkit.config import ModelConfig, config_from_state_dict
from rwkvkit.errors import RwkvkitError
from rwkvkit.models import rwkv4, rwkv5, rwkv6, rwkv7
from rwkvkit.models.common import RWKVModel
from rwkvkit.quant import install_quantized, read_quantized, read_quantized_metadata

VERSIONS: dict[str, ModuleType] = {"4": rwkv4, "5.2": rwkv5, "6": rwkv6, "7": rwkv7}


def version_module(version: str) -> ModuleType:
    """The module of one RWKV version (``Model``, ``new_shape``, ``init_official_``)."""
    if version not in VERSIONS:
        supported = ", ".join("RWKV-" + v for v in VERSIONS)
        raise RwkvkitError(f"RWKV-{version} is not supported (supported: {supported})")
    return VERSIONS[version]


def new_config(version: str, n_layer: int, n_embd: int, vocab_size: int, head_size: int = 64) -> ModelConfig:
    """The config of a new ``version`` model trained from scratch, with the official trainer's widths
    (``head_size`` is ignored for RWKV-4, which has no heads)."""
    shape = version_module(version).new_shape(n_embd, head_size)
    return ModelConfig(version=version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, **shape)


def build_model(
    config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> RWKVModel:
    """A model with the given config and uninitialised (zero) parameters. On ``device="meta"`` nothing
    is allocated: the loaders build so, then assign the file's tensors."""
    cls = version_module(config.version).Model
    with torch.device(device):
        model = cls(config)
    return model.to(dtype=dtype)


def new_model(
    version: str,
    n_layer: int,
    n_embd: int,
    vocab_size: int,
    head_size: int = 64,
    device: torch.device | str = "cpu",
) -> RWKVModel:
    """A new model of ``version`` initialised with the official from-scratch recipe (fp32)."""
    module = version_module(version)
    config = new_config(version, n_layer, n_embd, vocab_size, head_size)
    return module.init_official_(build_model(config, device=device))


def _checked_meta_model(state_dict: dict[str, torch.Tensor], source: str) -> RWKVModel:
    """The model ``state_dict`` describes, on the meta device, after checking that its keys and shapes
    are exactly those of that model."""
    config = config_from_state_dict(state_dict)
    model = build_model(config, device="meta")
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
    return model


def check_state_dict(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> ModelConfig:
    """The config ``state_dict`` describes, after checking that its keys and shapes are exactly those of
    that model (cheap: the model is built on the "meta" device). Raises RwkvkitError naming the problem."""
    return _checked_meta_model(state_dict, source).config


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> RWKVModel:
    """Build the model that ``state_dict`` describes and place its tensors on ``device`` as ``dtype``.

    Tensors already on the CPU in the right dtype are used as they are (no copy: a memory-mapped file
    stays mapped). Records each key's original dtype and the key order (``source_dtypes``,
    ``source_key_order``) so ``save_model`` writes the same layout back.
    """
    model = _checked_meta_model(state_dict, source)
    placed = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(placed, assign=True)
    model.source_dtypes = {k: v.dtype for k, v in state_dict.items()}
    model.source_key_order = list(state_dict)
    return model.eval()


def load_quantized(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> RWKVModel:
    """The model in a quantized file (``rwkvkit quantize``): quantized layers where the file has them,
    the rest in ``dtype``."""
    quantized = read_quantized(path)
    model = build_model(quantized.config, device="meta")
    return install_quantized(model, quantized, device=device, dtype=dtype).eval()


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> RWKVModel:
    """Load an official RWKV checkpoint (`.pth` or `.safetensors`) as a model on ``device`` in ``dtype``.

    A quantized file (``rwkvkit quantize``) loads with its quantized layers (the rest in ``dtype``).
    """
    if read_quantized_metadata(path) is not None:
        model = load_quantized(path, device=device, dtype=dtype)
    else:
        model = model_from_state_dict(load_state_dict(path), device=device, dtype=dtype, source=str(path))
    return_freed_memory()
    return model


def return_freed_memory() -> None:
    """Give the memory freed while loading (conversion and packing temporaries) back to the system.

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in its heap, where they
    count in the process's RSS: an L24-D1024 int4 model measured 1.28 GB resident after loading, 0.62 GB
    after this. Linux with glibc only (``malloc_trim``); elsewhere it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return
    trim(0)


def export_state_dict(
    model: RWKVModel, dtype: torch.dtype | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors under the official keys, in the checkpoint's original key order and dtypes.

    ``dtype`` forces one dtype for every tensor; otherwise each key keeps the dtype it was loaded with
    (or the model's dtype for a model that was not loaded from a file). ``tensors`` replaces
    ``model.state_dict()`` (e.g. weights with a LoRA update merged, or gathered from FSDP shards).
    """
    if tensors is None:
        tensors = model.state_dict()
    order = model.source_key_order or list(tensors)
    out = {}
    for key in order:
        t = tensors[key].detach()
        out[key] = t.to(dtype or model.source_dtypes.get(key, t.dtype))
    return out


def save_model(model: RWKVModel, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write the model as an official checkpoint (`.pth`, or `.safetensors` by suffix), atomically."""
    metadata = {"format": "pt", "rwkv_version": model.config.version}
    save_state_dict(export_state_dict(model, dtype), Path(path), metadata=metadata)
