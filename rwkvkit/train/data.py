"""Training data: documents from text files, tokenized datasets, and reproducible batches.

This module owns:

* ``iter_documents``: the document strings of a ``.txt`` (the whole file is one document), ``.jsonl`` (one
  JSON object per line, its ``text_key`` field) or ``.parquet`` file (its ``text_key`` column);
* ``prepare_dataset``: documents -> tokens (a process pool), end of text (id 0) after each -> binidx uint16
  (the format lives in :mod:`rwkvkit.train.binidx`; ``BinIdxWriter`` and ``read_binidx`` are re-exported);
* ``load_token_array``: the flat token stream a training run reads, from any of the kinds above or a
  ``.npy``, memory-mapped where the data is already tokens;
* ``load_training_data``: that stream and, for chat / instruction ``.jsonl`` (:mod:`.chat_data`), its
  loss mask;
* ``sample_batch`` and ``eval_windows``: windows of that stream as int64 tensors (``sample_mask``: the
  same windows of the mask). Batches are a pure function of (seed, step): a resumed or repeated run
  sees exactly the same data.

Importing this module does not import torch.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer import load_tokenizer
from rwkvkit.train.binidx import (  # noqa: F401 (BinIdx and binidx_paths re-exported: the format's home moved)
    BINIDX_SUFFIXES,
    BinIdx,
    BinIdxWriter,
    binidx_paths,
    read_binidx,
)
from rwkvkit.train.chat_data import (
    first_record_is_chat,
    iter_jsonl,
    load_chat_jsonl,
    mask_path,
    read_mask,
    write_chat_dataset,
)

if TYPE_CHECKING:
    import torch

    from rwkvkit.tokenizer import Tokenizer

EOT_ID = 0  # end of text, appended after every document (RWKV-LM's convention; id 0 of World and byte)
DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))

# prepare_dataset sends documents to the workers in chunks of at most this many documents / characters.
_CHUNK_DOCS = 512
_CHUNK_CHARS = 1 << 20


# ---------------------------------------------------------------------------------------------- documents


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise RwkvkitError(f"no such data file: {path}")


def _check_suffix(path: Path, allowed: Sequence[str]) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        kind = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise RwkvkitError(f"{path}: unknown kind of data file ({kind}); expected {', '.join(allowed)}")
    return suffix


def iter_documents(path: str | os.PathLike[str], text_key: str = "text") -> Iterator[str]:
    """The documents of a ``.txt``, ``.jsonl`` or ``.parquet`` file, in file order.

    ``.txt``: the whole file (UTF-8) is one document. ``.jsonl``: one JSON object per line, its
    ``text_key`` field (a string); blank lines are skipped. ``.parquet``: the ``text_key`` column (a
    string column without nulls), read one record batch at a time (needs pyarrow). Any problem is a
    RwkvkitError that names the file and the line (``.txt``, ``.jsonl``) or row (``.parquet``), both
    counted from 1.
    """
    path = Path(path)
    _require_file(path)
    suffix = _check_suffix(path, DOCUMENT_SUFFIXES)
    if suffix == ".txt":
        yield _read_text_file(path)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, text_key)
    else:
        yield from _iter_parquet(path, text_key)


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RwkvkitError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _iter_jsonl(path: Path, text_key: str) -> Iterator[str]:
    for where, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise RwkvkitError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if text_key not in record:
            fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise RwkvkitError(
                f"{where}: no {text_key!r} field (fields: {fields}); choose the field with text_key "
                "(--text-key)"
            )
        text = record[text_key]
        if not isinstance(text, str):
            raise RwkvkitError(f"{where}: field {text_key!r} is {type(text).__name__}, not a string")
        yield text


def _import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise RwkvkitError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    return pyarrow, pyarrow.parquet


def _iter_parquet(path: Path, text_key: str) -> Iterator[str]:
    pa, pq = _import_pyarrow()
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise RwkvkitError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
    if text_key not in schema.names:
        columns = ", ".join(repr(c) for c in schema.names[:10]) or "none"
        raise RwkvkitError(
            f"{path}: no column {text_key!r} (columns: {columns}); choose the column with text_key "
            "(--text-key)"
        )
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise RwkvkitError(f"{path}: column {text_key!r} holds {kind}, not strings")
    row = 0  # rows read so far
    try:
        for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
            column = batch.column(0)
            if column.null_count:
                first_null = column.is_null().to_pylist().index(True)
                raise RwkvkitError(f"{path}: row {row + first_null + 1}: column {text_key!r} is null")
            yield from column.to_pylist()
            row += len(column)
    except pa.ArrowException as e:
        raise RwkvkitError(f"{path}: cannot read row {row + 1} onwards ({_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class PrepareSummary:
    """What ``prepare_dataset`` wrote."""

    documents: int
    tokens: int
    seconds: float
    bin_path: Path
    idx_path: Path
    mask_path: Path | None = None  # chat data: the loss mask beside the pair

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _resolve_tokenizer(tokenizer: str | os.PathLike[str] | Tokenizer) -> Tokenizer:
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer


def _encode_documents(tokenizer: Tokenizer, docs: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each document followed by EOT_ID, concatenated (int64), and each document's length."""
    pieces: list[list[int]] = []
    lengths = np.empty(len(docs), dtype=np.int64)  # (D,) tokens of each document, EOT_ID included
    for i, text in enumerate(docs):
        try:
            ids = tokenizer.encode(text)
        except RwkvkitError as e:
            raise RwkvkitError(f"{where}: {e}") from None
        pieces.append(ids)
        pieces.append([EOT_ID])
        lengths[i] = len(ids) + 1
    flat = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=int(lengths.sum()))  # (sum,)
    return flat, lengths


def _chunks(inputs: Sequence[Path], text_key: str) -> Iterator[tuple[str, list[str]]]:
    """(where, documents) in input order, at most _CHUNK_DOCS documents or ~_CHUNK_CHARS characters each."""
    for path in inputs:
        docs: list[str] = []
        chars = 0
        first = 1  # number of the first document of the chunk in this file
        for text in iter_documents(path, text_key):
            docs.append(text)
            chars += len(text)
            if len(docs) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
                yield f"{path}: documents {first}-{first + len(docs) - 1}", docs
                first += len(docs)
                docs, chars = [], 0
        if docs:
            yield f"{path}: documents {first}-{first + len(docs) - 1}", docs


# The tokenizer of a pool worker (set by _init_worker), or the error that loading it raised.
_worker_tokenizer: Any = None
_worker_error: BaseException | None = None


def _init_worker(spec: Any) -> None:
    # Never raise here: a pool whose initializer fails restarts its workers forever.
    global _worker_tokenizer, _worker_error
    try:
        _worker_tokenizer = _resolve_tokenizer(spec)
    except BaseException as e:  # reported by the first task
        _worker_error = e


def _worker_encode(where: str, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if _worker_error is not None:
        raise _worker_error
    return _encode_documents(_worker_tokenizer, docs, where)


def _encoded_chunks(
    chunks: Iterator[tuple[str, list[str]]], tokenizer: Tokenizer, pool: Any, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, lengths) for each chunk, in input order: in this process, or in ``pool`` when given."""
    if pool is None:
        for where, docs in chunks:
            yield _encode_documents(tokenizer, docs, where)
        return
    pending: deque = deque()  # AsyncResults in input order, at most 2 per worker so that memory stays small
    for where, docs in chunks:
        pending.append(pool.apply_async(_worker_encode, (where, docs)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def prepare_dataset(
    inputs: Sequence[str | os.PathLike[str]],
    output_prefix: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | Tokenizer = "world",
    workers: int = DEFAULT_WORKERS,
    text_key: str = "text",
    progress: bool = True,
) -> PrepareSummary:
    """Tokenize the documents of ``inputs`` into the binidx pair ``output_prefix``.bin / .idx (uint16).

    ``tokenizer``: "world", "byte", a tokenizer.json or World vocab path (see ``load_tokenizer``), or a
    tokenizer object (picklable if ``workers`` > 1 under a spawn start method). Every document becomes
    its token ids followed by EOT_ID (0), one binidx sequence per document, in input order.
    ``workers`` processes encode in parallel (1: in this process); the output does not depend on it.
    The files appear only when everything succeeded.
    """
    if not inputs:
        raise RwkvkitError("no input files given")
    if workers < 1:
        raise RwkvkitError(f"workers must be >= 1, got {workers}")
    paths = [Path(p) for p in inputs]
    for path in paths:
        _require_file(path)
        _check_suffix(path, DOCUMENT_SUFFIXES)
    tok = _resolve_tokenizer(tokenizer)
    if tok.vocab_size > 65536:
        raise RwkvkitError(
            f"the tokenizer has {tok.vocab_size} ids, but binidx uint16 tokens hold at most 65536 "
            "(ids 0..65535)"
        )
    spec = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else tok
    chat = [p.suffix.lower() == ".jsonl" and first_record_is_chat(p) for p in paths]
    if any(chat):
        if not all(chat):
            plain = paths[chat.index(False)]
            raise RwkvkitError(f"{plain} is not chat data, but other inputs are: write them apart")
        return _prepare_chat_dataset(paths, output_prefix, tok, progress)

    start = time.perf_counter()
    n_tokens = 0
    # The pool starts before the progress bar (and its thread), so that forking sees one thread only.
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(spec,))
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, dynamic_ncols=True)
    try:
        with BinIdxWriter(output_prefix, np.uint16) as writer:
            chunks = _chunks(paths, text_key)
            for flat, lengths in _encoded_chunks(chunks, tok, pool, workers):
                offset = 0
                for length in lengths.tolist():
                    writer.add_document(flat[offset : offset + length])
                    offset += length
                n_tokens += offset
                bar.update(lengths.size)
                bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
            if writer.documents == 0:
                raise RwkvkitError(f"no documents found in {', '.join(str(p) for p in paths)}")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    mask_path(output_prefix).unlink(missing_ok=True)  # a chat dataset's mask left at this prefix earlier
    return PrepareSummary(
        documents=writer.documents,
        tokens=n_tokens,
        seconds=time.perf_counter() - start,
        bin_path=writer.bin_path,
        idx_path=writer.idx_path,
    )


def _prepare_chat_dataset(
    paths: list[Path], output_prefix: str | os.PathLike[str], tokenizer: Tokenizer, progress: bool
) -> PrepareSummary:
    """:func:`prepare_dataset` of chat ``.jsonl`` files: one sequence per record and the loss mask beside
    the pair (:func:`rwkvkit.train.chat_data.write_chat_dataset`)."""
    start = time.perf_counter()
    records, tokens, written_mask = write_chat_dataset(paths, output_prefix, tokenizer, progress)
    bin_path, idx_path = binidx_paths(output_prefix)
    return PrepareSummary(records, tokens, time.perf_counter() - start, bin_path, idx_path, written_mask)


# ---------------------------------------------------------------------------------------------- token stream


def load_text_tokens(path: str | Path, tokenizer) -> np.ndarray:
    """Tokenize a UTF-8 text file into a 1-D int64 array."""
    path = Path(path)
    if not path.is_file():
        raise RwkvkitError(f"no such data file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RwkvkitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if tokens.size < 2:
        raise RwkvkitError(f"{path} holds too little text to train on ({tokens.size} tokens)")
    return tokens


def _is_binidx_prefix(path: Path) -> bool:
    bin_path, idx_path = binidx_paths(path)
    return bin_path.is_file() and idx_path.is_file()


def load_token_array(
    path: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | Tokenizer | None = None,
    text_key: str = "text",
) -> np.ndarray:
    """The flat training token stream (1-D) of a data file.

    * ``.txt``: the text tokenized in memory, with no end-of-text token (int64; ``load_text_tokens``);
    * ``.jsonl`` / ``.parquet``: each document tokenized and followed by EOT_ID (0), concatenated
      (uint16 when the vocab has at most 65536 ids, else int64) -- the same stream ``prepare_dataset``
      writes;
    * a binidx prefix or its ``.bin`` / ``.idx`` path: the memory-mapped tokens (``read_binidx``);
    * ``.npy``: a 1-D integer array, memory-mapped.

    ``tokenizer`` (an object or a name for ``load_tokenizer``) is needed only for the text kinds, and
    ``text_key`` (the JSON field or parquet column of the text) only for ``.jsonl`` / ``.parquet``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DOCUMENT_SUFFIXES:
        _require_file(path)
        if tokenizer is None:
            raise RwkvkitError(f"{path} is text: a tokenizer is needed to turn it into tokens")
        tok = _resolve_tokenizer(tokenizer)
        if suffix == ".txt":
            return load_text_tokens(path, tok)
        parts = [_encode_documents(tok, docs, where)[0] for where, docs in _chunks([path], text_key)]
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.int64
        tokens = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    elif suffix == ".npy":
        _require_file(path)
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise RwkvkitError(f"{path}: not a readable .npy array ({_first_line(e)})") from None
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise RwkvkitError(
                f"{path}: expected a 1-D integer token array, got shape {tokens.shape} {tokens.dtype}"
            )
    elif suffix in BINIDX_SUFFIXES or _is_binidx_prefix(path):
        tokens = read_binidx(path).tokens
    elif not path.exists():
        raise RwkvkitError(f"no such data file or binidx prefix: {path}")
    else:
        known = ", ".join(DOCUMENT_SUFFIXES + (".npy",) + BINIDX_SUFFIXES)
        kind = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise RwkvkitError(f"{path}: unknown kind of data file ({kind}); expected {known} or a binidx prefix")
    if tokens.size < 2:
        raise RwkvkitError(f"{path} holds too little data to train on ({tokens.size} tokens)")
    return tokens


def load_training_data(
    path: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | Tokenizer | None = None,
    text_key: str = "text",
) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens, loss mask or None): a chat / instruction ``.jsonl`` (records with ``messages`` or
    ``prompt`` + ``completion``) gives its mask (:func:`rwkvkit.train.chat_data.load_chat_jsonl`); any
    binidx prefix with a ``PREFIX.mask.npy`` beside it (chat data written by ``rwkvkit data``) gives that
    mask; any other data is :func:`load_token_array` with no mask (every token carries loss)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl" and path.is_file() and first_record_is_chat(path):
        if tokenizer is None:
            raise RwkvkitError(f"{path} is text: a tokenizer is needed to turn it into tokens")
        tokens, mask = load_chat_jsonl(path, _resolve_tokenizer(tokenizer))
        if tokens.size < 2 or not mask[1:].any():
            raise RwkvkitError(f"{path} holds too little data to train on ({tokens.size} tokens)")
        return tokens, mask
    tokens = load_token_array(path, tokenizer, text_key)
    if path.suffix.lower() in BINIDX_SUFFIXES or _is_binidx_prefix(path):
        mask = read_mask(path, tokens.size)  # written by rwkvkit data for chat data
        if mask is not None and not mask[1:].any():
            raise RwkvkitError(f"{mask_path(path)} marks no token to train on")
        return tokens, mask
    return tokens, None


# ---------------------------------------------------------------------------------------------- batches


def _int64_tensor(a: np.ndarray) -> torch.Tensor:
    """``a`` as an int64 tensor: shared memory for a writable int64 array, else a converted copy."""
    import torch  # here, not at the top: `rwkvkit data` (prepare_dataset) runs without importing torch

    if a.dtype != np.int64 or not a.flags.writeable:
        a = np.array(a, dtype=np.int64)
    return torch.from_numpy(a)


def sample_batch(
    tokens: np.ndarray,
    step: int,
    batch_size: int,
    ctx_len: int,
    seed: int,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``ctx_len + 1`` tokens, chosen by (seed, step). Returns inputs and targets (B, T).

    ``tokens`` may be any 1-D integer array, a read-only uint16 memmap included; the result is int64.
    ``rows`` picks rows of the same global batch (for one rank of a distributed run): the result equals
    ``sample_batch(...)[rows]`` without reading the other rows.
    """
    starts = _window_starts(tokens.size, step, batch_size, ctx_len, seed, rows)
    windows = np.empty((starts.size, ctx_len + 1), dtype=np.int64)  # (B, T + 1)
    for i, s in enumerate(starts.tolist()):
        windows[i] = tokens[s : s + ctx_len + 1]
    batch = _int64_tensor(windows)
    return batch[:, :-1], batch[:, 1:]


def _window_starts(size: int, step: int, batch_size: int, ctx_len: int, seed: int, rows: slice | None):
    """Where this step's windows start, a function of (seed, step) only."""
    if size <= ctx_len + 1:
        raise RwkvkitError(f"data has {size} tokens, fewer than ctx_len + 2 = {ctx_len + 2}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, size - ctx_len - 1, size=batch_size)  # (B,) the global batch
    return starts if rows is None else starts[rows]


def sample_mask(
    mask: np.ndarray, step: int, batch_size: int, ctx_len: int, seed: int, rows: slice | None = None
) -> torch.Tensor:
    """The loss mask of :func:`sample_batch`'s targets for the same arguments: (B, T) float32."""
    import torch  # here, not at the top: `rwkvkit data` runs without importing torch

    starts = _window_starts(mask.size, step, batch_size, ctx_len, seed, rows)
    windows = np.stack([mask[s + 1 : s + ctx_len + 1] for s in starts.tolist()])  # (B, T) of targets
    return torch.from_numpy(windows.astype(np.float32))


def eval_windows(tokens: np.ndarray, ctx_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping windows of ``ctx_len`` (inputs, targets), covering the array once. (W, T) int64"""
    n = (tokens.size - 1) // ctx_len
    if n == 0:
        raise RwkvkitError(
            f"validation data has {tokens.size} tokens, fewer than ctx_len + 1 = {ctx_len + 1}"
        )
    x = _int64_tensor(np.asarray(tokens[: n * ctx_len]).reshape(n, ctx_len))
    y = _int64_tensor(np.asarray(tokens[1 : n * ctx_len + 1]).reshape(n, ctx_len))
    return x, y
