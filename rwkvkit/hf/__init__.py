"""rwkvkit inside Hugging Face transformers (the ``hf`` extra).

Importing this package imports nothing from ``transformers``. Its modules:
    tokenization_rwkv_world.py  the World tokenizer as a transformers tokenizer (RwkvWorldTokenizer)
    tokenizer_files.py          writes a model folder's tokenizer files (no transformers import)
    modeling.py                 RwkvkitConfig, RwkvkitForCausalLM; importing it registers them with
                                AutoConfig / AutoModel / AutoModelForCausalLM
``from rwkvkit.hf import RwkvkitForCausalLM`` (or ``RwkvkitConfig``) imports modeling.py on first use.
"""

from __future__ import annotations

_MODELING_NAMES = ("RwkvkitCausalLMOutput", "RwkvkitConfig", "RwkvkitForCausalLM")


def __getattr__(name: str):
    if name in _MODELING_NAMES:
        from rwkvkit.hf import modeling  # imports transformers: only when a model class is asked for

        return getattr(modeling, name)
    raise AttributeError(f"module 'rwkvkit.hf' has no attribute {name!r}")
