"""The RWKV models: one module per version and the shared pieces they are built from.

    common.py   RWKVModel (the model loop, state handling), Block, precision
    layers.py   the building blocks the version files share (token shift, channel mixes, matrix-state
                time mix, the mixes' WKV calls)
    init.py     the official init recipes' shared helpers
    rwkv4.py .. rwkv7.py   one version each: time mix, channel mix, Model, new_shape, init_official_
    io.py       the registry of versions, building, loading and saving (the public functions below)

This file only re-exports :mod:`rwkvkit.models.io`'s public functions, so ``rwkvkit.models.load_model``
and friends keep their import path.
"""

from __future__ import annotations

from rwkvkit.models.common import RWKVModel
from rwkvkit.models.io import (
    VERSIONS,
    build_model,
    check_state_dict,
    export_state_dict,
    load_model,
    load_quantized,
    model_from_state_dict,
    new_config,
    new_model,
    return_freed_memory,
    save_model,
    version_module,
)

__all__ = [
    "VERSIONS",
    "RWKVModel",
    "build_model",
    "check_state_dict",
    "export_state_dict",
    "load_model",
    "load_quantized",
    "model_from_state_dict",
    "new_config",
    "new_model",
    "return_freed_memory",
    "save_model",
    "version_module",
]
