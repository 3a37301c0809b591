"""A model's one-token decode step through the native library, one C call per token for all layers.

Each version has a module here (``v4.py``, ``v5.py`` for 5.2, ``v6.py``, ``v7.py``) with
``build(model, lib) -> NativeStep | None`` (None where some layer has no native kernel) and a C function
in ``src/step_v*.cpp``. :func:`native_step_for` picks the module from the model's version.

Contract of :meth:`NativeStep.step`: tokens (B,) int64 and the model's state (RWKVState); returns
(logits (B, V) fp32, the new RWKVState), equal to the torch path's one-token forward (tests compare
logits and every piece of the state after many steps). The old state is not modified.
"""

from __future__ import annotations

import ctypes
import importlib

import torch

MAX_ROWS = 64  # batches up to this many rows decode natively; larger ones stay on torch


class NativeStep:
    """Base of a version's native step: holds the library, the packed weights and the C model struct."""

    def __init__(self, lib: ctypes.CDLL, keep: list):
        self.lib = lib
        self.keep = keep  # the PackedMatrix / tensors / ctypes structs the C side points into

    def step(self, tokens: torch.Tensor, state):  # -> (logits, RWKVState)
        raise NotImplementedError


VERSION_MODULES = {"4": "v4", "5.2": "v5", "6": "v6", "7": "v7"}


def native_step_for(model) -> NativeStep | None:
    """The native step of ``model`` (fp32 / bf16 / int8 / int4 on the CPU), or None where there is none:
    the library is off, the version has no native step yet, or a layer has no native kernel."""
    from rwkvkit.native import load  # the package's loader (this module is imported by it lazily)

    lib = load()
    name = VERSION_MODULES.get(model.config.version)
    if lib is None or name is None or model.device.type != "cpu":
        return None
    try:
        module = importlib.import_module(f"rwkvkit.native.{name}")
    except ModuleNotFoundError:
        return None
    return module.build(model, lib)
