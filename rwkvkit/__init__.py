"""rwkvkit: train, fine-tune and run RWKV language models anywhere PyTorch runs.

Stable API: ``load_model``, ``save_model``, ``WorldTokenizer``, ``ByteTokenizer``, ``RWKVState``,
``RwkvkitError``. Heavier pieces (tokenizers, training) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rwkvkit.errors import RwkvkitError

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("rwkvkit.models", "load_model"),
    "save_model": ("rwkvkit.models", "save_model"),
    "build_model": ("rwkvkit.models", "build_model"),
    "ModelConfig": ("rwkvkit.config", "ModelConfig"),
    "RWKVState": ("rwkvkit.state", "RWKVState"),
    "WorldTokenizer": ("rwkvkit.tokenizer", "WorldTokenizer"),
    "ByteTokenizer": ("rwkvkit.tokenizer", "ByteTokenizer"),
}

if TYPE_CHECKING:
    from rwkvkit.config import ModelConfig
    from rwkvkit.models import build_model, load_model, save_model
    from rwkvkit.state import RWKVState
    from rwkvkit.tokenizer import ByteTokenizer, WorldTokenizer

__all__ = [
    "ByteTokenizer",
    "ModelConfig",
    "RWKVState",
    "RwkvkitError",
    "WorldTokenizer",
    "__version__",
    "build_model",
    "load_model",
    "save_model",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rwkvkit' has no attribute {name!r}")
