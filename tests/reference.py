"""Access to the reference implementation, the ``rwkv`` pip package (0.8.32), for parity tests.

The package picks its RWKV-7 or RWKV-4/5/6 class from environment variables at import time, so each
flavour is loaded here as its own module object from the package's ``model.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from functools import cache
from pathlib import Path

import torch


@cache
def _reference_module(v7: bool):
    import rwkv

    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    if v7:
        os.environ["RWKV_V7_ON"] = "1"
    else:
        os.environ.pop("RWKV_V7_ON", None)
    path = Path(rwkv.__file__).parent / "model.py"
    spec = importlib.util.spec_from_file_location(f"_rwkv_reference_model_v7_{v7}", path)
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    os.environ.pop("RWKV_V7_ON", None)
    return module


def reference_model(pth_path: str | os.PathLike, version: str = "7"):
    """The reference package's model for a `.pth` file, strategy 'cpu fp32'."""
    module = _reference_module(v7=(version == "7"))
    name = str(pth_path)[: -len(".pth")]
    cls = module.RWKV_x070 if version == "7" else module.RWKV
    with contextlib.redirect_stdout(io.StringIO()):
        return cls(name, strategy="cpu fp32")


def reference_logits(model, tokens: list[int], state=None) -> tuple[torch.Tensor, list]:
    """Logits at every position (T, V) and the reference state after ``tokens``."""
    if len(tokens) == 1:
        out, state = model.forward(tokens, state)
        return out.float().view(1, -1), state
    out, state = model.forward(tokens, state, full_output=True)
    return out.float(), state
