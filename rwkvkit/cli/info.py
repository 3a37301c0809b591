"""``rwkvkit info``: describe a checkpoint from its tensor shapes, without building the model."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

DESCRIPTION = "Describe an RWKV checkpoint from its tensor shapes, without building the model."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rwkvkit info``."""
    parser.description = DESCRIPTION
    parser.add_argument("model", metavar="PATH", help="checkpoint (.pth or .safetensors)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def checkpoint_info(path: str | os.PathLike) -> dict:
    """A description of the checkpoint at ``path`` (the dict ``rwkvkit info --json`` prints).

    Reads the state dict memory-mapped and checks its keys and shapes against the model (built on the
    "meta" device, so no weights are copied or converted). Holds every ModelConfig field.
    """
    # imported here, not at the top: they import torch, which `rwkvkit info --help` does not need
    from rwkvkit.checkpoint import load_state_dict
    from rwkvkit.models import check_state_dict, load_quantized
    from rwkvkit.native.step import decode_path
    from rwkvkit.quant import read_quantized_metadata

    quantized = read_quantized_metadata(path)
    state_dict = load_state_dict(path)
    if quantized is not None:
        config = load_quantized(path, device="cpu").config  # checks the file against its metadata
    else:
        config = check_state_dict(state_dict, source=str(path))
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in state_dict.values())
    return {
        "file": str(path),
        # a Hugging Face folder: every file in it
        "file_size": sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
        if os.path.isdir(path)
        else os.path.getsize(path),
        **config.to_dict(),
        "quantization": None
        if quantized is None
        else f"{quantized['scheme']}"
        + (f" (group size {quantized['group_size']})" if quantized["scheme"] == "int4" else ""),
        "parameters": sum(t.numel() for t in state_dict.values()),
        "tensors": len(state_dict),
        "dtypes": dict(dtypes.most_common()),
        "decode_path": decode_path(config.version),
    }


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit info``."""
    info = checkpoint_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    dtypes = ", ".join(f"{name} ({count} tensors)" for name, count in info["dtypes"].items())
    rows = [
        ("file", f"{info['file']} ({_human_bytes(info['file_size'])}, {info['file_size']:,} bytes)"),
        ("version", f"RWKV-{info['version']}"),
        ("layers", info["n_layer"]),
        ("n_embd", info["n_embd"]),
        ("heads", f"{info['n_head']} x {info['head_size']}" if info["n_head"] else "none (per channel)"),
        ("att width", info["dim_att"]),
        ("ffn width", info["dim_ffn"]),
        ("vocab", info["vocab_size"]),
    ]
    if info["version"] == "7":
        low_rank = (
            f"decay {info['d_decay']}, iclr {info['d_iclr']}, value {info['d_value']}, gate {info['d_gate']}"
        )
        rows.append(("low-rank", low_rank))
    elif info["version"] == "6":
        rows.append(("low-rank", f"mix {info['d_mix']}, decay {info['d_decay']}"))
    if info["has_time_state"]:
        rows.append(("tuned state", "yes (att.time_state: the initial state of every sequence)"))
    if info["quantization"]:
        rows.append(("quantized", info["quantization"]))
    rows += [
        ("parameters", f"{info['parameters']:,}"),
        ("dtype", dtypes),
        ("decoding", info["decode_path"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
