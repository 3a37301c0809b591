"""The tokenizer files of an exported Hugging Face model folder (World vocab), written without transformers.

This module owns ``write_world_tokenizer_files``: it puts into a model folder the RWKV World vocab
(``rwkv_vocab_v20230424.txt``, byte for byte, the name llama.cpp's converter reads), the remote-code
tokenizer module (``tokenization_rwkv_world.py``, copied as text), ``tokenizer_config.json`` (whose
``auto_map`` points AutoTokenizer at that module) and ``special_tokens_map.json``. It imports nothing from
transformers, so exporting works where transformers is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer.world import DEFAULT_VOCAB_PATH

__all__ = ["TOKENIZER_MODULE_PATH", "write_world_tokenizer_files"]

TOKENIZER_MODULE_PATH = Path(__file__).with_name("tokenization_rwkv_world.py")
TOKENIZER_CLASS = "RwkvWorldTokenizer"
EOT_TOKEN = "<|endoftext|>"  # id 0, end of text: bos, eos and pad
MODEL_MAX_LENGTH = 1_000_000_000  # RWKV has no context limit (same value as the tokenizer module's)


def write_world_tokenizer_files(
    folder: Path, remote_code_name: str = "tokenization_rwkv_world.py"
) -> list[str]:
    """Write the World tokenizer files into ``folder`` (created if missing); return the names written.

    ``remote_code_name``: the file name of the tokenizer module in the folder (a ``.py`` name); the
    ``auto_map`` of tokenizer_config.json refers to it, so ``AutoTokenizer.from_pretrained(folder,
    trust_remote_code=True)`` loads ``RwkvWorldTokenizer`` from it.
    """
    folder = Path(folder)
    module = Path(remote_code_name)
    if module.name != remote_code_name or module.suffix != ".py" or not module.stem.isidentifier():
        raise RwkvkitError(
            f"remote_code_name must be a .py file name whose stem is an identifier, got {remote_code_name!r}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEFAULT_VOCAB_PATH, folder / DEFAULT_VOCAB_PATH.name)
        (folder / remote_code_name).write_text(
            TOKENIZER_MODULE_PATH.read_text(encoding="utf-8"), encoding="utf-8"
        )
        special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
        config = {
            "tokenizer_class": TOKENIZER_CLASS,
            "auto_map": {"AutoTokenizer": [f"{module.stem}.{TOKENIZER_CLASS}", None]},
            **special,
            "model_max_length": MODEL_MAX_LENGTH,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": True,
        }
        _write_json(folder / "tokenizer_config.json", config)
        _write_json(folder / "special_tokens_map.json", special)
    except OSError as exc:
        raise RwkvkitError(f"cannot write the tokenizer files into {folder}: {exc.strerror or exc}") from None
    return [DEFAULT_VOCAB_PATH.name, remote_code_name, "tokenizer_config.json", "special_tokens_map.json"]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
