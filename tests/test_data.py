"""The training-data pipeline: documents from .txt / .jsonl / .parquet, binidx files, token streams, batches.

Binidx files are checked against a reader and a writer written here from the format description (the
Megatron MMIDIDX layout RWKV-LM uses), not against rwkvkit's own code; tokenized datasets are checked
against the tokenizers' ``encode`` of each document followed by the end-of-text id 0.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvkit.cli import main
from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer import ByteTokenizer, WorldTokenizer
from rwkvkit.train import data
from rwkvkit.train.data import (
    BinIdxWriter,
    eval_windows,
    iter_documents,
    load_token_array,
    prepare_dataset,
    read_binidx,
    sample_batch,
)

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "人工智能正在改变世界。RWKV 是一种 RNN。",
    "emoji 🤖🎉 and a flag 🇯🇵, e\u0301 combining, tab\tend",
    "",
    "  leading spaces and trailing newline\n\n",
]
CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f8", 8: "<u2"}


# ---------------------------------------------------------------------------------------------- the spec


def spec_read(prefix: Path) -> dict:
    """An independent binidx reader from the format: struct for the header, frombuffer for the arrays."""
    idx = Path(str(prefix) + ".idx").read_bytes()
    magic = idx[:9]
    version, code, n, m = struct.unpack("<QBQQ", idx[9:34])
    offset = 34
    sizes = np.frombuffer(idx, dtype="<i4", count=n, offset=offset)
    offset += 4 * n
    pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=offset)
    offset += 8 * n
    doc_idx = np.frombuffer(idx, dtype="<i8", count=m, offset=offset)
    offset += 8 * m
    assert offset == len(idx)
    tokens = np.frombuffer(Path(str(prefix) + ".bin").read_bytes(), dtype=CODES[code])
    return dict(magic=magic, version=version, code=code, sizes=sizes, pointers=pointers, doc_idx=doc_idx,
                tokens=tokens)  # fmt: skip


def spec_write(prefix: Path, documents: list[list[list[int]]], code: int) -> None:
    """An independent binidx writer: each document is a list of sequences, each a list of ids."""
    dtype = np.dtype(CODES[code])
    sizes, pointers, doc_idx, blob, offset = [], [], [0], b"", 0
    for doc in documents:
        for seq in doc:
            raw = np.array(seq, dtype=dtype).tobytes()
            sizes.append(len(seq))
            pointers.append(offset)
            blob += raw
            offset += len(raw)
        doc_idx.append(len(sizes))
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(sizes), len(doc_idx))
    body = struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(pointers)}q", *pointers)
    body += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    Path(str(prefix) + ".idx").write_bytes(header + body)
    Path(str(prefix) + ".bin").write_bytes(blob)


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return WorldTokenizer()


def expected_stream(docs: list[str], tokenizer) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += tokenizer.encode(doc) + [0]
    return out


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    lines = [json.dumps({"id": i, key: d}, ensure_ascii=i % 2 == 0) for i, d in enumerate(docs)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], key: str = "text", row_group_size: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), key: docs})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# ---------------------------------------------------------------------------------------------- binidx


def test_binidx_written_by_rwkvkit_follows_the_format(tmp_path):
    docs = [[1, 2, 3], [], [65535, 0], [7] * 5]
    with BinIdxWriter(tmp_path / "ds") as w:
        for d in docs:
            w.add_document(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temp files left
    f = spec_read(tmp_path / "ds")
    assert f["magic"] == b"MMIDIDX\x00\x00" and f["version"] == 1 and f["code"] == 8
    assert f["sizes"].tolist() == [3, 0, 2, 5]
    assert f["pointers"].tolist() == [0, 6, 6, 10]  # byte offsets of uint16 tokens
    assert f["doc_idx"].tolist() == [0, 1, 2, 3, 4]
    assert f["tokens"].tolist() == [1, 2, 3, 65535, 0, 7, 7, 7, 7, 7]


def test_binidx_writer_other_dtype_and_suffix(tmp_path):
    with BinIdxWriter(tmp_path / "ds.bin", dtype=np.int32) as w:  # the suffix is dropped
        w.add_document(np.array([-5, 100_000]))
        w.add_document(range(3))
    f = spec_read(tmp_path / "ds")
    assert (
        f["code"] == 4 and f["pointers"].tolist() == [0, 8] and f["tokens"].tolist() == [-5, 100_000, 0, 1, 2]
    )


@pytest.mark.parametrize("code", [8, 4, 1])
def test_read_binidx_reads_an_independent_writer(tmp_path, code):
    documents = [[[5, 6, 7]], [[1], [2, 3]], [[]], [[200, 0]], [[9] * 40, [10] * 3, [11]]]
    spec_write(tmp_path / "ext", documents, code)
    for name in ("ext", "ext.bin", "ext.idx"):
        ds = read_binidx(tmp_path / name)
        assert isinstance(ds.tokens, np.memmap) and not ds.tokens.flags.writeable
        assert ds.dtype == np.dtype(CODES[code]) and len(ds) == len(documents)
        for i, doc in enumerate(documents):
            assert ds.document(i).tolist() == [t for seq in doc for t in seq]
        assert ds.sizes.tolist() == [len(s) for doc in documents for s in doc]
        assert ds.doc_idx.tolist() == [0, 1, 3, 4, 5, 8]
        assert ds.sequence(2).tolist() == [2, 3]


def test_read_binidx_of_an_empty_dataset(tmp_path):
    spec_write(tmp_path / "empty", [], 8)
    ds = read_binidx(tmp_path / "empty")
    assert len(ds) == 0 and ds.tokens.size == 0


# ---------------------------------------------------------------------------------------------- documents


def test_iter_documents_of_each_kind(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text(DOCS[1] + "\n" + DOCS[2], encoding="utf-8")
    assert list(iter_documents(txt)) == [DOCS[1] + "\n" + DOCS[2]]
    assert list(iter_documents(write_jsonl(tmp_path / "a.jsonl", DOCS))) == DOCS
    assert list(iter_documents(write_parquet(tmp_path / "a.parquet", DOCS))) == DOCS
    jsonl = write_jsonl(tmp_path / "b.jsonl", DOCS, key="content")
    assert list(iter_documents(jsonl, text_key="content")) == DOCS


def test_prepare_dataset_equals_world_encode_of_each_document(tmp_path, world):
    txt = tmp_path / "one.txt"
    txt.write_text(DOCS[0] + DOCS[1], encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "two.jsonl", DOCS)
    parquet = write_parquet(tmp_path / "three.parquet", DOCS[::-1])
    out = tmp_path / "out" / "ds"
    summary = prepare_dataset([txt, jsonl, parquet], out, tokenizer="world", workers=1, progress=False)

    all_docs = [DOCS[0] + DOCS[1]] + DOCS + DOCS[::-1]
    expected = expected_stream(all_docs, world)
    f = spec_read(out)
    assert f["code"] == 8 and f["tokens"].tolist() == expected
    assert f["sizes"].tolist() == [len(world.encode(d)) + 1 for d in all_docs]
    assert f["doc_idx"].tolist() == list(range(len(all_docs) + 1))
    assert summary.documents == len(all_docs) and summary.tokens == len(expected)
    assert summary.bin_path == out.with_suffix(".bin") and summary.seconds >= 0
    ds = read_binidx(out)
    assert world.decode(ds.document(2).tolist()) == DOCS[1]  # Chinese text survives the round trip
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds.bin", "ds.idx"]


def test_two_workers_give_the_same_files_as_one(tmp_path, monkeypatch, world):
    monkeypatch.setattr(data, "_CHUNK_DOCS", 7)  # many small chunks, so that workers interleave
    docs = [f"{i} {DOCS[i % len(DOCS)]} {'x' * (i % 13)}" for i in range(150)]
    jsonl = write_jsonl(tmp_path / "many.jsonl", docs)
    parquet = write_parquet(tmp_path / "many.parquet", docs[:40], row_group_size=9)
    one = prepare_dataset([jsonl, parquet], tmp_path / "w1", workers=1, progress=False)
    two = prepare_dataset([jsonl, parquet], tmp_path / "w2", workers=2, progress=False)
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    assert (tmp_path / "w1.idx").read_bytes() == (tmp_path / "w2.idx").read_bytes()
    assert one.documents == two.documents == 190 and one.tokens == two.tokens
    assert spec_read(tmp_path / "w2")["tokens"].tolist() == expected_stream(docs + docs[:40], world)


def test_prepare_dataset_with_the_byte_tokenizer(tmp_path):
    jsonl = write_jsonl(tmp_path / "b.jsonl", DOCS)
    prepare_dataset([jsonl], tmp_path / "bytes", tokenizer="byte", workers=2, progress=False)
    expected = [b for d in DOCS for b in list(d.encode("utf-8")) + [0]]
    assert spec_read(tmp_path / "bytes")["tokens"].tolist() == expected
    assert expected == expected_stream(DOCS, ByteTokenizer())


# ---------------------------------------------------------------------------------------------- token arrays


def test_load_token_array_of_each_kind(tmp_path, world):
    txt = tmp_path / "t.txt"
    txt.write_text(DOCS[0] + DOCS[2], encoding="utf-8")
    t = load_token_array(txt, world)
    assert t.dtype == np.int64 and t.tolist() == world.encode(DOCS[0] + DOCS[2])  # no end of text

    jsonl = write_jsonl(tmp_path / "t.jsonl", DOCS)
    parquet = write_parquet(tmp_path / "t.parquet", DOCS)
    expected = expected_stream(DOCS, world)
    assert load_token_array(jsonl, world).tolist() == expected
    assert load_token_array(parquet, "world").tolist() == expected

    prepare_dataset([jsonl], tmp_path / "p", workers=1, progress=False)
    for name in ("p", "p.bin", "p.idx"):
        a = load_token_array(tmp_path / name, world)
        assert isinstance(a, np.memmap) and a.dtype == np.uint16 and a.tolist() == expected
    assert load_token_array(tmp_path / "p").tolist() == expected  # binidx needs no tokenizer

    np.save(tmp_path / "n.npy", np.array(expected, dtype=np.uint16))
    a = load_token_array(tmp_path / "n.npy")
    assert isinstance(a, np.memmap) and a.tolist() == expected


def test_sample_batch_rows_and_uint16_memmaps(tmp_path):
    values = (np.arange(5000) * 7919) % 65536  # covers the whole uint16 range
    spec_write(tmp_path / "m", [[values.tolist()]], 8)
    tokens = read_binidx(tmp_path / "m").tokens
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16

    x, y = sample_batch(tokens, step=3, batch_size=8, ctx_len=32, seed=5)
    x64, y64 = sample_batch(values.astype(np.int64), step=3, batch_size=8, ctx_len=32, seed=5)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 32)
    assert torch.equal(x, x64) and torch.equal(y, y64)
    assert int(x.max()) > 32767  # uint16 values above int16's range stay positive
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row in x:  # every row is a window of the data
        start = int(np.flatnonzero(values == int(row[0]))[0])
        assert row.tolist() == values[start : start + 32].tolist()

    for rows in (slice(0, 8), slice(2, 5), slice(6, 8), slice(0, 8, 3), slice(5, None)):
        xr, yr = sample_batch(tokens, step=3, batch_size=8, ctx_len=32, seed=5, rows=rows)
        assert torch.equal(xr, x[rows]) and torch.equal(yr, y[rows])

    xe, ye = eval_windows(tokens, ctx_len=1000)
    assert xe.dtype == torch.int64 and xe.shape == (4, 1000)
    assert (
        xe.flatten().tolist() == values[:4000].tolist() and ye.flatten().tolist() == values[1:4001].tolist()
    )


# ---------------------------------------------------------------------------------------------- errors


class HugeVocab:
    name = "huge"
    vocab_size = 70_000
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [69_999] * len(text)


def test_document_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n', encoding="utf-8")
    with pytest.raises(RwkvkitError, match=r"bad\.jsonl: line 3: not valid JSON"):
        list(iter_documents(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "a"}\n\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(RwkvkitError, match=r"missing\.jsonl: line 3: no 'text' field \(fields: 'body'\)"):
        list(iter_documents(missing))
    number = tmp_path / "number.jsonl"
    number.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(RwkvkitError, match="line 1: field 'text' is int, not a string"):
        list(iter_documents(number))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\nok\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(RwkvkitError, match=r"latin\.txt: line 3: not UTF-8"):
        list(iter_documents(latin))
    parquet = write_parquet(tmp_path / "p.parquet", DOCS, key="body")
    with pytest.raises(RwkvkitError, match=r"p\.parquet: no column 'text' \(columns: 'id', 'body'\)"):
        list(iter_documents(parquet))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", None]}), tmp_path / "null.parquet", row_group_size=2)
    with pytest.raises(RwkvkitError, match="row 3: column 'text' is null"):
        list(iter_documents(tmp_path / "null.parquet"))
    other = tmp_path / "data.csv"
    other.write_text("text\nhello\n")
    with pytest.raises(RwkvkitError, match=r"data\.csv: unknown kind of data file \(suffix '\.csv'\)"):
        list(iter_documents(other))
    with pytest.raises(RwkvkitError, match="no such data file"):
        list(iter_documents(tmp_path / "nope.jsonl"))


def test_broken_binidx_files_are_refused(tmp_path):
    spec_write(tmp_path / "ok", [[[1, 2, 3]], [[4, 5]]], 8)
    idx = (tmp_path / "ok.idx").read_bytes()
    binary = (tmp_path / "ok.bin").read_bytes()

    def pair(name: str, idx_bytes: bytes, bin_bytes: bytes) -> Path:
        (tmp_path / f"{name}.idx").write_bytes(idx_bytes)
        (tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        return tmp_path / name

    with pytest.raises(RwkvkitError, match="truncated index"):
        read_binidx(pair("short", idx[:-8], binary))
    with pytest.raises(RwkvkitError, match="truncated index"):
        read_binidx(pair("header", idx[:20], binary))
    with pytest.raises(RwkvkitError, match="not a binidx index"):
        read_binidx(pair("magic", b"NOTMAGIC!" + idx[9:], binary))
    with pytest.raises(RwkvkitError, match="version 2"):
        read_binidx(pair("version", idx[:9] + struct.pack("<Q", 2) + idx[17:], binary))
    with pytest.raises(RwkvkitError, match="unknown dtype code 9"):
        read_binidx(pair("code", idx[:17] + b"\x09" + idx[18:], binary))
    with pytest.raises(
        RwkvkitError, match=r"has 8 bytes, but its index describes 5 uint16 tokens \(10 bytes\)"
    ):
        read_binidx(pair("binlen", idx, binary[:-2]))
    with pytest.raises(RwkvkitError, match="pointer of sequence 1"):
        bad_pointer = idx[: 34 + 8 + 8] + struct.pack("<q", 4) + idx[34 + 8 + 16 :]
        read_binidx(pair("pointer", bad_pointer, binary))
    with pytest.raises(RwkvkitError, match="no such binidx file"):
        read_binidx(tmp_path / "absent")
    with pytest.raises(RwkvkitError, match="no such data file or binidx prefix"):
        load_token_array(tmp_path / "absent")


def test_failures_leave_no_files_behind(tmp_path):
    out = tmp_path / "out"
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"txt": "oops"}\n', encoding="utf-8")
    for workers in (1, 2):
        with pytest.raises(RwkvkitError, match=r"bad\.jsonl: line 3: no 'text' field"):
            prepare_dataset([good, bad], out / "ds", tokenizer="byte", workers=workers, progress=False)
        assert list(out.iterdir()) == []

    with pytest.raises(RwkvkitError, match="70000 ids, but binidx uint16 tokens hold at most 65536"):
        prepare_dataset([good], out / "ds", tokenizer=HugeVocab(), workers=1, progress=False)
    assert list(out.iterdir()) == []

    with pytest.raises(RwkvkitError, match="token id 70000 does not fit in uint16"):
        with BinIdxWriter(out / "ds") as w:
            w.add_document([1, 2])
            w.add_document([70_000])
    assert list(out.iterdir()) == []

    (tmp_path / "x.csv.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(RwkvkitError, match=r"x\.csv\.gz: unknown kind of data file \(suffix '\.gz'\)"):
        prepare_dataset([good, tmp_path / "x.csv.gz"], out / "ds", progress=False)
    with pytest.raises(ValueError, match="boom"):
        with BinIdxWriter(out / "ds") as w:
            w.add_document([1, 2])
            raise ValueError("boom")
    assert list(out.iterdir()) == []

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(RwkvkitError, match="no documents found"):
        prepare_dataset([empty], out / "ds", tokenizer="byte", workers=1, progress=False)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_data_writes_the_files(tmp_path, capsys, world):
    jsonl = write_jsonl(tmp_path / "c.jsonl", DOCS)
    parquet = write_parquet(tmp_path / "c.parquet", DOCS, key="body")
    args = ["data", str(jsonl), "-o", str(tmp_path / "out" / "cli"), "--workers", "2", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{len(DOCS)} documents, {len(expected_stream(DOCS, world))} tokens")
    assert "tokens/s" in out and "cli.bin" in out and "cli.idx" in out and "\n" not in out
    assert spec_read(tmp_path / "out" / "cli")["tokens"].tolist() == expected_stream(DOCS, world)

    args = ["data", str(parquet), "-o", str(tmp_path / "b"), "--tokenizer", "byte", "--text-key", "body"]
    assert main(args + ["--workers", "1", "--no-progress"]) == 0
    assert spec_read(tmp_path / "b")["tokens"].tolist() == expected_stream(DOCS, ByteTokenizer())


def test_cli_data_errors(tmp_path, capsys):
    assert main(["data", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such data file") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    assert main(["data", "-o", str(tmp_path / "x")]) == 2  # no input: a usage error
    assert main(["data", "--help"]) == 0
    assert "--text-key" in capsys.readouterr().out
