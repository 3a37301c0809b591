"""Weight-only quantization of whole models, and the quantized checkpoint format (``rwkvkit quantize``).

What is quantized: the large projection matrices, which hold nearly all the bytes a decoding step reads:
the layers the model names in ``model.quantizable_layers()`` (every ``nn.Linear`` of both mixes, att
receptance/key/value/gate/output and ffn key/value/receptance, and the head). What stays as it was: the
embedding (one row is read per token), norms, token-shift mixes, decays, bonuses and the small low-rank
matrices (w1/w2, a1/a2, ... which are tiny and sensitive).

File format: one ``.safetensors`` file. Unquantized tensors keep their official names and dtypes; a
quantized matrix ``K.weight`` is stored as ``K.qweight`` + ``K.scales`` (+ ``K.zeros`` for int4), in the
portable layout of :mod:`rwkvkit.quant.layers`. The metadata records the scheme:

    rwkvkit_format = "rwkvkit-quantized-1", scheme = "int8" | "int4", group_size, rwkv_version,
    config (the ModelConfig as JSON), quantized (JSON list of the quantized module names)

This package never imports the models: it works on any model that has ``quantizable_layers()`` and the
declared fields ``quantization`` / ``source_dtypes``. Loading is composed by the loader
(:func:`rwkvkit.models.io.load_quantized`): :func:`read_quantized` parses the file, the loader builds the
model on the "meta" device, and :func:`install_quantized` puts the quantized layers and the remaining
tensors in. So ``rwkvkit.load_model`` recognises such a file, and every command (generate, chat, serve,
eval) runs quantized models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rwkvkit.checkpoint import atomic_write
from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.quant.layers import GROUP_SIZES, SCHEMES, Int4Linear, Int8Linear, quantize_int4, quantize_int8

FORMAT = "rwkvkit-quantized-1"


def quantizable(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules that quantization replaces (the model's ``quantizable_layers``:
    the projections and the head)."""
    return model.quantizable_layers()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _check_scheme(scheme: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise RwkvkitError(f"unknown quantization {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise RwkvkitError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, group_size: int = 64) -> nn.Module:
    """Replace the model's large projections by int8 or int4 layers, in place; returns the model."""
    _check_scheme(scheme, group_size)
    for name in quantizable(model):
        weight = model.get_submodule(name).weight
        if scheme == "int8":
            layer: nn.Module = Int8Linear(*quantize_int8(weight))
        else:
            if weight.shape[1] % group_size:
                raise RwkvkitError(
                    f"{name}: input width {weight.shape[1]} is not a multiple of the group size {group_size}"
                )
            layer = Int4Linear(*quantize_int4(weight, group_size), group_size=group_size)
        _set_module(model, name, layer.to(weight.device))
    model.quantization = {"scheme": scheme, "group_size": group_size}
    return model


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a quantized model (from :func:`quantize_model`) as a ``.safetensors`` file (atomically)."""
    quant = model.quantization
    if quant is None:
        raise RwkvkitError("this model is not quantized (see rwkvkit.quant.quantize_model)")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise RwkvkitError(f"a quantized model is written as .safetensors, not {path.suffix or 'no suffix'}")
    names = quantized_names(model)
    tensors = {}
    for key, value in model.state_dict().items():
        dtype = (
            value.dtype
            if any(key.startswith(n + ".") for n in names)
            else model.source_dtypes.get(key, value.dtype)
        )
        tensors[key] = value.detach().to("cpu", dtype).contiguous()
    metadata = {
        "rwkvkit_format": FORMAT,
        "scheme": quant["scheme"],
        "group_size": str(quant["group_size"]),
        "rwkv_version": model.config.version,
        "config": json.dumps(model.config.to_dict()),
        "quantized": json.dumps(names),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_quantized_metadata(path: str | os.PathLike) -> dict | None:
    """The metadata of a quantized rwkvkit file, or None for any other file (cheap: reads the header)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    return metadata if metadata.get("rwkvkit_format") == FORMAT else None


class _PlainReader:
    """Reads single tensors of a safetensors file with ordinary reads into fresh (aligned) memory, not
    through the memory map ``load_file`` gives. The quantized weights are read so: an int4 layer packs
    its nibbles into the CPU kernel's layout and drops them, and an int8 weight at an unaligned offset
    is copied for the kernel (``_aligned``); read through the map, the originals would stay resident
    as the file's pages, a second copy in the process's RSS."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")  # noqa: SIM115  (closed by close())
        size = int.from_bytes(self.file.read(8), "little")
        self.header = json.loads(self.file.read(size))
        self.base = 8 + size

    def read_bytes(self, name: str) -> torch.Tensor | None:
        """The U8 or I8 tensor ``name`` (None if the file has no such tensor of those dtypes)."""
        info = self.header.get(name)
        dtypes = {"U8": torch.uint8, "I8": torch.int8}
        if not isinstance(info, dict) or info.get("dtype") not in dtypes:
            return None
        start, end = info["data_offsets"]
        out = torch.empty(end - start, dtype=torch.uint8)
        self.file.seek(self.base + start)
        if self.file.readinto(out.numpy()) != end - start:
            raise RwkvkitError(f"{self.file.name} is truncated (tensor {name})")
        return out.view(dtypes[info["dtype"]]).view(info["shape"])

    def close(self) -> None:
        self.file.close()


@dataclass
class QuantizedFile:
    """A quantized file as :func:`read_quantized` parsed it: what the loader builds and what
    :func:`install_quantized` puts into that model (``tensors`` memory-mapped from the file)."""

    path: Path
    config: ModelConfig
    scheme: str
    group_size: int
    names: list[str]  # the quantized layers
    tensors: dict[str, torch.Tensor]


def read_quantized(path: str | os.PathLike) -> QuantizedFile:
    """Parse a quantized file's metadata and map its tensors (nothing is converted yet)."""
    path = Path(path)
    metadata = read_quantized_metadata(path)
    if metadata is None:
        raise RwkvkitError(f"{path} is not a quantized rwkvkit model")
    try:
        config = ModelConfig(**json.loads(metadata["config"]))
        names = json.loads(metadata["quantized"])
        scheme, group_size = metadata["scheme"], int(metadata["group_size"])
        _check_scheme(scheme, group_size)
        tensors = load_file(str(path), device="cpu")
    except RwkvkitError:
        raise
    except Exception as e:  # a damaged header or file
        raise RwkvkitError(f"{path} is a damaged quantized model ({type(e).__name__}: {e})") from None
    return QuantizedFile(path, config, scheme, group_size, names, tensors)


def _install_layers(model: nn.Module, quantized: QuantizedFile, device: torch.device | str) -> None:
    """Replace each quantized layer of ``model`` by its int8/int4 layer, taking its tensors out of
    ``quantized.tensors`` (the quantized weights are read again in plain memory, see _PlainReader)."""
    take, path, group_size = quantized.tensors.pop, quantized.path, quantized.group_size
    reader = _PlainReader(path)
    try:
        for name in quantized.names:
            try:
                mapped = take(name + ".qweight")  # left untouched: read again in plain memory
                qweight = reader.read_bytes(name + ".qweight")
                qweight = mapped if qweight is None else qweight
                if quantized.scheme == "int8":
                    layer: nn.Module = Int8Linear(qweight, take(name + ".scales"))
                else:
                    layer = Int4Linear(qweight, take(name + ".scales"), take(name + ".zeros"), group_size)
            except KeyError as e:
                raise RwkvkitError(f"{path} lacks the tensor {e.args[0]} of a quantized layer") from None
            _set_module(model, name, layer.to(device))
    finally:
        reader.close()


def install_quantized(
    model: nn.Module,
    quantized: QuantizedFile,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Fill ``model`` (built on the "meta" device from ``quantized.config``) from the file: quantized
    layers where the file has them, the rest in ``dtype`` on ``device``. Sets ``model.quantization``
    and ``model.source_dtypes``; returns the model."""
    _install_layers(model, quantized, device)
    tensors = quantized.tensors
    expected = {k for k, v in model.state_dict().items() if v.device.type == "meta"}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise RwkvkitError(f"{quantized.path} does not match its recorded model ({detail})")
    model.source_dtypes = {k: v.dtype for k, v in tensors.items()}
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=False, assign=True
    )
    model.quantization = {"scheme": quantized.scheme, "group_size": quantized.group_size}
    return model


def quantized_names(model: nn.Module) -> list[str]:
    """The names of the quantized layers of a quantized model."""
    return [n for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))]
