"""Small helpers shared by the tokenizers: reading a tokenizer file, turning ids into a list.

This module owns ``read_text_file`` (a UTF-8 file read whole, with every read or decoding failure a
one-line RwkvkitError naming the file) and ``as_id_list`` (ids from a list, a tensor, an array or any
iterable). It imports nothing heavy, so every tokenizer module can sit on top of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from rwkvkit.errors import RwkvkitError


def read_text_file(path: str | os.PathLike[str], what: str) -> str:
    """The text of a UTF-8 file, read whole; ``what`` ("vocab file", "tokenizer file") names it in errors.

    RwkvkitError for a file that cannot be read (missing, a directory, no permission) or is not UTF-8.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RwkvkitError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RwkvkitError(f"{what} {path} is not valid UTF-8 ({exc})") from None


def as_id_list(ids: Iterable[int]) -> list[int]:
    """A list of ids from a list/tuple, a torch tensor or numpy array (via ``tolist``), or any iterable."""
    if isinstance(ids, list):
        return ids
    tolist = getattr(ids, "tolist", None)
    if tolist is not None:
        out = tolist()
        return out if isinstance(out, list) else [out]
    return list(ids)
