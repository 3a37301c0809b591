"""The Megatron "binidx" token format that BlinkDL/RWKV-LM trains from: writing it and reading it back.

``<prefix>.bin`` holds the tokens of every document back to back, ``<prefix>.idx`` the index below.
:class:`BinIdxWriter` writes a pair atomically; :func:`read_binidx` memory-maps one after checking its
index fully.

The binidx index (all little endian)::

    magic       9 bytes   b"MMIDIDX\\x00\\x00"
    version     u64       1
    dtype code  u8        1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float64, 8 uint16
    n           u64       number of sequences
    m           u64       number of doc_idx entries
    sizes       int32[n]  tokens in each sequence
    pointers    int64[n]  byte offset of each sequence in the .bin
    doc_idx     int64[m]  0, then after each document the number of sequences so far

rwkvkit writes one sequence per document (doc_idx = 0, 1, ..., n), with the sequences back to back in
the .bin, which is what RWKV-LM's own writer does. Importing this module does not import torch.
"""

from __future__ import annotations

import array
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rwkvkit.errors import RwkvkitError

BINIDX_SUFFIXES = (".bin", ".idx")
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n sequences, m doc_idx entries
# dtype code -> numpy dtype (little endian). Codes 6 and 7 are both float64 (numpy ``float`` and ``double``).
DTYPE_OF_CODE = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f8"),
    8: np.dtype("<u2"),
}
CODE_OF_DTYPE = {np.dtype("u1"): 1, np.dtype("i1"): 2, np.dtype("<i2"): 3, np.dtype("<i4"): 4}
CODE_OF_DTYPE.update({np.dtype("<i8"): 5, np.dtype("<f8"): 6, np.dtype("<u2"): 8})


def binidx_paths(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The ``.bin`` and ``.idx`` paths of a binidx prefix, given with or without either suffix."""
    name = os.fspath(prefix)
    if name.endswith(BINIDX_SUFFIXES):
        name = name[: -len(".bin")]
    return Path(name + ".bin"), Path(name + ".idx")


def _temp_file(path: Path) -> tuple[Any, str]:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return os.fdopen(fd, "wb"), tmp


class BinIdxWriter:
    """Writes a binidx pair, one sequence per document, atomically.

    Use as a context manager: ``add_document(tokens)`` for each document; on a clean exit both files are
    completed and renamed into place, on an exception both temporary files are removed and nothing is
    left behind (an existing pair of that name is not touched). Without ``with``, call ``close()`` to
    finish or ``abort()`` to discard. Token ids must fit ``dtype`` (uint16 by default).
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: Any = np.uint16) -> None:
        self.bin_path, self.idx_path = binidx_paths(prefix)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in CODE_OF_DTYPE:
            known = ", ".join(str(d) for d in CODE_OF_DTYPE)
            raise RwkvkitError(f"binidx cannot store {np.dtype(dtype)} tokens; use one of {known}")
        self._sizes = array.array("q")  # tokens per document
        self._closed = False
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin, self._bin_tmp = _temp_file(self.bin_path)

    def __enter__(self) -> BinIdxWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def documents(self) -> int:
        return len(self._sizes)

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document (a 1-D sequence of token ids) as one sequence."""
        if self._closed:
            raise RwkvkitError(f"{self.bin_path}: the writer is already closed")
        ids = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens))
        if ids.ndim != 1:
            raise RwkvkitError(f"a document must be a 1-D sequence of token ids, got shape {ids.shape}")
        if ids.size >= 2**31:
            raise RwkvkitError(f"a document of {ids.size} tokens is too long for binidx (int32 sizes)")
        if ids.size and self.dtype.kind in "iu":
            if ids.dtype.kind not in "iub":
                raise RwkvkitError(f"token ids must be integers, got {ids.dtype}")
            info = np.iinfo(self.dtype)
            low, high = int(ids.min()), int(ids.max())
            if low < info.min or high > info.max:
                bad = low if low < info.min else high
                raise RwkvkitError(
                    f"token id {bad} does not fit in {self.dtype.name} ({info.min}..{info.max}) "
                    f"in document {len(self._sizes) + 1}"
                )
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(ids.size)

    def close(self) -> None:
        """Write the index and move both files into place."""
        if self._closed:
            return
        try:
            sizes = np.frombuffer(self._sizes, dtype=np.int64) if self._sizes else np.zeros(0, np.int64)
            n = sizes.size
            pointers = np.zeros(n, dtype="<i8")  # byte offset of each sequence
            np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
            doc_idx = np.arange(n + 1, dtype="<i8")  # one sequence per document
            idx, idx_tmp = _temp_file(self.idx_path)
            self._idx_tmp = idx_tmp
            with idx:
                idx.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], n, n + 1))
                idx.write(sizes.astype("<i4").tobytes())
                idx.write(pointers.tobytes())
                idx.write(doc_idx.tobytes())
                idx.flush()
                os.fsync(idx.fileno())
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(idx_tmp, self.idx_path)
        except OSError as e:
            self.abort()
            raise RwkvkitError(f"could not write {self.bin_path}: {e.strerror or e}") from None
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything written: close and remove the temporary files."""
        self._closed = True
        self._bin.close()
        for tmp in (self._bin_tmp, getattr(self, "_idx_tmp", None)):
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)


@dataclass(frozen=True)
class BinIdx:
    """A binidx dataset, opened by ``read_binidx``.

    ``tokens`` is the whole ``.bin`` as one flat read-only ``np.memmap`` (an empty array when the file
    is empty); ``sizes`` (int32), ``pointers`` and ``doc_idx`` (int64) are the index arrays.
    """

    bin_path: Path
    idx_path: Path
    dtype: np.dtype
    tokens: np.ndarray  # (total tokens,) dtype
    sizes: np.ndarray  # (n,) int32: tokens per sequence
    pointers: np.ndarray  # (n,) int64: byte offset of each sequence in the .bin
    doc_idx: np.ndarray  # (m,) int64: the first sequence of each document, then n

    def __len__(self) -> int:
        """The number of documents."""
        return self.doc_idx.size - 1

    def sequence(self, i: int) -> np.ndarray:
        """The tokens of sequence ``i`` (a view of ``tokens``)."""
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def document(self, i: int) -> np.ndarray:
        """The tokens of document ``i``: its sequences, which lie back to back (a view of ``tokens``)."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range: {self.bin_path} holds {len(self)} documents")
        first, end = int(self.doc_idx[i]), int(self.doc_idx[i + 1])
        if first == end:
            return self.tokens[:0]
        start = int(self.pointers[first]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[first:end].sum())]


def read_binidx(prefix: str | os.PathLike[str]) -> BinIdx:
    """Open a binidx pair (``prefix`` with or without ``.bin`` / ``.idx``), checking the index fully.

    The tokens are memory-mapped, not read. RwkvkitError for a missing file, a wrong magic, version or
    dtype code, an index of the wrong length, sizes / pointers / doc_idx that do not describe the .bin
    back to back, or a .bin whose length differs from what the index describes.
    """
    bin_path, idx_path = binidx_paths(prefix)
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise RwkvkitError(f"no such binidx file: {path}")
    dtype, sizes, pointers, doc_idx = _read_index(idx_path)
    _check_layout(idx_path, dtype, sizes, pointers, doc_idx)
    total = int(sizes.sum(dtype=np.int64))
    bin_bytes = bin_path.stat().st_size
    if bin_bytes != total * dtype.itemsize:
        raise RwkvkitError(
            f"{bin_path} has {bin_bytes} bytes, but its index describes {total} {dtype.name} tokens "
            f"({total * dtype.itemsize} bytes): the two files do not belong together or one is truncated"
        )
    if total:
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(total,))
    else:
        tokens = np.zeros(0, dtype=dtype)  # a memmap cannot map an empty file
    for a in (sizes, pointers, doc_idx):
        a.flags.writeable = False
    return BinIdx(bin_path, idx_path, dtype, tokens, sizes, pointers, doc_idx)


def _read_index(idx_path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sizes, pointers, doc_idx) of an index file whose header and length check out."""
    idx_bytes = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) >= len(MAGIC) and head[: len(MAGIC)] != MAGIC:
            raise RwkvkitError(
                f"{idx_path}: not a binidx index (starts with {head[: len(MAGIC)]!r}, expected {MAGIC!r})"
            )
        if len(head) < _HEADER.size:
            raise RwkvkitError(
                f"{idx_path}: truncated index ({idx_bytes} bytes, the header alone needs {_HEADER.size})"
            )
        _, version, code, n, m = _HEADER.unpack(head)
        if version != VERSION:
            raise RwkvkitError(f"{idx_path}: binidx version {version}, only version {VERSION} is known")
        if code not in DTYPE_OF_CODE:
            raise RwkvkitError(f"{idx_path}: unknown dtype code {code} (known: 1 to 8)")
        expected = _HEADER.size + 4 * n + 8 * n + 8 * m
        if idx_bytes != expected:
            problem = "truncated index" if idx_bytes < expected else "index with trailing bytes"
            raise RwkvkitError(
                f"{idx_path}: {problem}: {idx_bytes} bytes, but {n} sequences and {m} doc_idx entries "
                f"need {expected}"
            )
        sizes = np.fromfile(f, dtype="<i4", count=n)  # (n,)
        pointers = np.fromfile(f, dtype="<i8", count=n)  # (n,)
        doc_idx = np.fromfile(f, dtype="<i8", count=m)  # (m,)
    return DTYPE_OF_CODE[code], sizes, pointers, doc_idx


def _check_layout(
    idx_path: Path, dtype: np.dtype, sizes: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray
) -> None:
    """Sizes >= 0, sequences back to back (pointers), and doc_idx rising from 0 to at most n."""
    n, m = sizes.size, doc_idx.size
    if n and sizes.min() < 0:
        i = int(np.argmax(sizes < 0))
        raise RwkvkitError(f"{idx_path}: sequence {i} has a negative size {sizes[i]}")
    offsets = np.zeros(n, dtype=np.int64)  # where each sequence must start, back to back
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=offsets[1:])
    if not np.array_equal(pointers, offsets):
        i = int(np.argmax(pointers != offsets))
        raise RwkvkitError(
            f"{idx_path}: pointer of sequence {i} is {pointers[i]}, but the sizes before it put it at "
            f"byte {offsets[i]}"
        )
    if m == 0 or doc_idx[0] != 0 or np.any(np.diff(doc_idx) < 0) or doc_idx[-1] > n:
        raise RwkvkitError(
            f"{idx_path}: doc_idx must start at 0 and rise to at most {n} (the number of sequences)"
        )
