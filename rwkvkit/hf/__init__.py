"""Hugging Face integration (the ``hf`` extra): rwkvkit models inside ``transformers``.

Importing this package imports nothing from ``transformers``. The model classes live in
:mod:`rwkvkit.hf.modeling`, loaded (and registered with the Auto classes) on first use of
``from rwkvkit.hf import RwkvkitForCausalLM`` or by ``import rwkvkit.hf.modeling``.
"""

from __future__ import annotations

_MODELING_NAMES = ("RwkvkitCausalLMOutput", "RwkvkitConfig", "RwkvkitForCausalLM")


def __getattr__(name: str):
    if name in _MODELING_NAMES:
        from rwkvkit.hf import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'rwkvkit.hf' has no attribute {name!r}")
