"""Chat and instruction data for supervised fine-tuning: records -> tokens and a loss mask.

A ``.jsonl`` file whose records hold ``messages`` (a list of {"role", "content"}; roles system, developer,
user, assistant, tool) or a ``prompt`` / ``completion`` pair (a user turn and the assistant's reply) is
rendered with the World chat format the server and ``rwkvkit chat`` use
(:mod:`rwkvkit.infer.chat_format`, one definition)::

    System: {system}\\n\\nUser: {message}\\n\\nAssistant: {reply}\\n\\nUser: ...\\n\\nAssistant: {reply}<EOT>

and only the assistant's tokens carry loss: each reply (its leading space included), the ``\\n\\n`` that
ends a reply before the next turn (the model's way of handing the turn back, which the server's stop
string ``\\n\\nUser:`` catches) and the end-of-text id (0) after a conversation that ends with a reply.
Each segment is tokenized on its own, so a mask boundary is always a token boundary.

The stream is the records one after another (each ending with id 0) with a uint8 mask of the same
length: ``mask[i] = 1`` when token ``i`` is a target that carries loss. A bad record (no messages, an
unknown role, an empty message, no assistant reply, an empty completion) is an error naming its line.
``rwkvkit data`` writes such files as a binidx pair (one sequence per record) with the mask beside it in
``PREFIX.mask.npy``, which training reads with the pair.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_format import ROLES, normalize_message
from rwkvkit.train.binidx import BinIdxWriter, binidx_paths

T = TypeVar("T")

EOT_ID = 0  # as rwkvkit.train.data.EOT_ID
TURN_SEPARATOR = "\n\n"
MASK_SUFFIX = ".mask.npy"


def is_chat_record(record: dict) -> bool:
    """Whether a JSON record is chat data (``messages``, or ``prompt`` + ``completion``)."""
    return "messages" in record or ("prompt" in record and "completion" in record)


def _messages(record: dict, where: str) -> list[tuple[str, str]]:
    """(role, normalised text) of a record's turns; RwkvkitError naming ``where`` for a bad record."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise RwkvkitError(f"{where}: 'messages' must be a non-empty list")
    else:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise RwkvkitError(f"{where}: 'prompt' and 'completion' must be strings")
        if not completion.strip():
            raise RwkvkitError(f"{where}: the completion is empty: nothing to train on")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RwkvkitError(f"{where}: message {i} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RwkvkitError(
                f"{where}: message {i} has the unknown role {role!r} (known: {', '.join(ROLES)})"
            )
        if not isinstance(content, str) or not normalize_message(content):
            raise RwkvkitError(f"{where}: message {i} ({role}) has no content")
        turns.append((role, normalize_message(content)))
    if not any(role == "assistant" for role, _ in turns):
        raise RwkvkitError(f"{where}: no assistant message: nothing to train on")
    return turns


def render_segments(turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The conversation's text as (segment, carries loss) pieces, in order (see the module docstring)."""
    segments: list[tuple[str, bool]] = []
    after_reply = False
    for i, (role, text) in enumerate(turns):
        if i > 0:
            segments.append((TURN_SEPARATOR, after_reply))
        if role == "assistant":
            segments += [("Assistant:", False), (" " + text, True)]
        else:
            segments.append((f"{ROLES[role]}: {text}", False))
        after_reply = role == "assistant"
    return segments


def encode_record(tokenizer, record: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int64, mask uint8) of one record, ending with the end-of-text id."""
    turns = _messages(record, where)
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in render_segments(turns):
        piece = tokenizer.encode(text)
        ids += piece
        mask += [int(trained)] * len(piece)
    ids.append(EOT_ID)
    mask.append(int(turns[-1][0] == "assistant"))
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def load_jsonl_records(path: str | Path, kind: str, plural: str, parse: Callable[[Any, str], T]) -> list[T]:
    """Every record of a ``.jsonl`` file of ``kind`` ("preference", "prompts") through
    ``parse(record, "FILE: line N")``; RwkvkitError for a missing file, the first bad record (from
    ``parse`` or :func:`iter_jsonl`) or a file without records (``plural``: what it lacks)."""
    path = Path(path)
    if not path.is_file():
        raise RwkvkitError(f"no such {kind} file: {path}")
    records = [parse(record, where) for where, record in iter_jsonl(path)]
    if not records:
        raise RwkvkitError(f"{path}: no {plural}")
    return records


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-blank line of a ``.jsonl`` file, ``where`` being "PATH: line N" and
    ``value`` the line's parsed JSON (any type: the caller checks it); a line that is not UTF-8 (a BOM
    allowed on line 1) or not JSON is an RwkvkitError naming it. Every ``.jsonl`` reader of training
    data (documents, chat records, GRPO prompts, DPO pairs) reads its lines through this."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}: line {line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise RwkvkitError(f"{where}: not UTF-8 text ({e.reason} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RwkvkitError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield where, record


def iter_chat_records(path: str | Path, tokenizer) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(where, token ids, mask) of each record of a chat ``.jsonl`` file, in order (every record must be
    chat data; a bad one is an error naming its line)."""
    path = Path(path)
    if not path.is_file():
        raise RwkvkitError(f"no such data file: {path}")
    for where, record in iter_jsonl(path):
        if not isinstance(record, dict) or not is_chat_record(record):
            raise RwkvkitError(f"{where}: not a chat record (expected 'messages' or 'prompt' + 'completion')")
        tokens, mask = encode_record(tokenizer, record, where)
        yield where, tokens, mask


def load_chat_jsonl(path: str | Path, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The token stream and loss mask of a chat ``.jsonl`` file (every record must be chat data)."""
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for _, tokens, mask in iter_chat_records(path, tokenizer):
        ids.append(tokens)
        masks.append(mask)
    if not ids:
        raise RwkvkitError(f"{path}: no records")
    return np.concatenate(ids), np.concatenate(masks)


# ---------------------------------------------------------------------------------------------- binidx + mask


def mask_path(prefix: str | os.PathLike[str]) -> Path:
    """The loss-mask file that goes with a binidx prefix: ``PREFIX.mask.npy`` (uint8, one per token)."""
    bin_path, _ = binidx_paths(prefix)
    return bin_path.with_name(bin_path.name[: -len(".bin")] + MASK_SUFFIX)


def write_chat_dataset(
    paths: list[Path], output_prefix: str | os.PathLike[str], tokenizer, progress: bool = True
) -> tuple[int, int, Path]:
    """Tokenize chat ``.jsonl`` files into a binidx pair (one sequence per record, ending with id 0) and
    its loss mask ``PREFIX.mask.npy``; returns (records, tokens, mask path). All three files appear only
    when everything succeeded."""
    target = mask_path(output_prefix)
    masks: list[np.ndarray] = []
    bar = tqdm(desc="tokenizing", unit="record", disable=not progress, dynamic_ncols=True)
    try:
        with BinIdxWriter(output_prefix, np.uint16) as writer:
            for path in paths:
                for _, tokens, mask in iter_chat_records(path, tokenizer):
                    writer.add_document(tokens)
                    masks.append(mask)
                    bar.update(1)
            if not masks:
                raise RwkvkitError(f"no records found in {', '.join(str(p) for p in paths)}")
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, np.concatenate(masks), allow_pickle=False)
                os.replace(tmp, target)  # before the binidx pair appears: a pair never lacks its mask
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    finally:
        bar.close()
    return writer.documents, sum(m.size for m in masks), target


def read_mask(prefix: str | os.PathLike[str], n_tokens: int) -> np.ndarray | None:
    """The loss mask beside a binidx prefix (memory-mapped), None when it has none; checked against the
    number of tokens of the binidx."""
    path = mask_path(prefix)
    if not path.is_file():
        return None
    try:
        mask = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise RwkvkitError(f"{path}: not a readable loss mask ({' '.join(str(e).split())})") from None
    if mask.ndim != 1 or mask.dtype != np.uint8 or mask.size != n_tokens:
        raise RwkvkitError(
            f"{path}: a loss mask of {mask.size} {mask.dtype} entries, but the binidx holds {n_tokens} "
            "tokens: it was written for other data (write both again with rwkvkit data)"
        )
    return mask


def first_record_is_chat(path: str | Path) -> bool:
    """Whether a ``.jsonl`` file's first non-empty line is a chat record (which way to read the file)."""
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8-sig", errors="replace").strip()
            if line:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and is_chat_record(record)
    return False
