"""Chat / instruction data with loss masks (rwkvkit.train.chat_data) and training on it.

The mask is checked against the World chat format's own prompt builder and the record's replies (what
the marked tokens decode to); the training loss against cross-entropy over exactly the marked targets,
picked out by index in the test; accumulation against one batch; bad records by their messages.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_one_line_error, run_cli
from tiny_training import tiny_config

from rwkvkit.errors import RwkvkitError
from rwkvkit.evaluate import evaluate_chat
from rwkvkit.infer.chat_format import format_conversation
from rwkvkit.models import load_model, new_model, save_model
from rwkvkit.tokenizer import load_tokenizer
from rwkvkit.train.binidx import read_binidx
from rwkvkit.train.chat_data import encode_record, load_chat_jsonl
from rwkvkit.train.data import load_training_data, prepare_dataset, sample_batch, sample_mask
from rwkvkit.train.trainer import Trainer, train

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, 中文 please 🙂"},
        {"role": "assistant", "content": "红色。"},
    ]
}


def test_mask_marks_exactly_the_replies():
    tok = load_tokenizer("world")
    ids, mask = encode_record(tok, CONVERSATION, "record")
    assert ids[-1] == 0 and mask[-1] == 1 and len(ids) == len(mask)
    # everything before the last reply is the server's prompt for that point of the conversation
    turns = [(m["role"], m["content"]) for m in CONVERSATION["messages"]]
    text = tok.decode_bytes([int(t) for t in ids[:-1]]).decode("utf-8")
    prompt = format_conversation(turns[:-1])
    assert text == prompt + " 红色。"
    # the marked tokens are the replies (leading space included), the turn break after a reply, the EOT
    marked = tok.decode_bytes([int(t) for t, m in zip(ids, mask, strict=True) if m and t != 0]).decode(
        "utf-8"
    )
    assert marked == " Blue.\n\n 红色。"
    assert (
        tok.decode_bytes([int(t) for t, m in zip(ids, mask, strict=True) if not m])
        .decode()
        .endswith("Assistant:")
    )


def test_prompt_completion_pairs_are_a_user_and_an_assistant_turn():
    tok = load_tokenizer("world")
    ids, mask = encode_record(tok, {"prompt": "2+2?", "completion": "4"}, "r")
    same, same_mask = encode_record(
        tok, {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}, "r"
    )
    assert ids.tolist() == same.tolist() and mask.tolist() == same_mask.tolist()


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"messages": []}, "non-empty list"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]},
            "unknown role",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            "no content",
        ),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "no content"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"prompt": "hi", "completion": ""}, "completion is empty"),
    ],
)
def test_bad_records_name_their_line_and_problem(tmp_path, record, problem):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(RwkvkitError, match=rf"chat.jsonl: line 2: .*{problem}"):
        load_chat_jsonl(path, load_tokenizer("world"))


@pytest.fixture
def chat_file(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]
    lines = []
    for _ in range(120):
        question = " ".join(rng.choice(words, 3))
        answer = question.split()[0].upper() + "!"
        lines.append(json.dumps({"prompt": f"Shout the first word: {question}", "completion": answer}))
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_masked_loss_is_the_cross_entropy_of_the_marked_targets(chat_file, tmp_path):
    cfg = tiny_config(chat_file, "", tmp_path / "run", n_embd=32, ctx_len=48, steps=1, tokenizer="world")
    with Trainer(cfg) as trainer:
        trainer.setup()
        model = trainer.parts.module
        loss = trainer.forward_backward()
        x, y = sample_batch(trainer.tokens, 0, cfg.batch_size, cfg.ctx_len, cfg.seed)
        m = sample_mask(trainer.mask, 0, cfg.batch_size, cfg.ctx_len, cfg.seed)
        with torch.no_grad():
            logits, _ = model(x)
        rows, cols = torch.nonzero(m, as_tuple=True)
        expected = F.cross_entropy(logits[rows, cols].float(), y[rows, cols])
    assert 0 < m.sum() < m.numel()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    tokens, mask = load_training_data(chat_file, "world")
    assert mask is not None and tokens.shape == mask.shape


def test_accumulation_keeps_the_chat_loss_curve(chat_file, tmp_path):
    def curve(out, **kw):
        cfg = tiny_config(
            chat_file, "", out, n_embd=32, ctx_len=48, steps=4, warmup_steps=1, tokenizer="world", **kw
        )
        train(cfg)
        entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [e["loss"] for e in entries if e.get("loss") is not None]

    whole = curve(tmp_path / "whole")
    accumulated = curve(tmp_path / "acc", micro_batch_size=2)
    assert len(whole) == 4 and all(math.isfinite(v) for v in whole)
    assert accumulated == pytest.approx(whole, rel=1e-5)


# ---------------------------------------------------------------------------------------------- rwkvkit data


def test_rwkvkit_data_writes_the_mask_beside_the_binidx_and_train_reads_it(chat_file, tmp_path):
    prefix = tmp_path / "chat"
    summary = prepare_dataset([chat_file], prefix, tokenizer="byte", progress=False)
    assert summary.mask_path == tmp_path / "chat.mask.npy" and summary.documents == 120
    tokens, mask = load_training_data(prefix, "byte")
    expected_tokens, expected_mask = load_chat_jsonl(chat_file, load_tokenizer("byte"))
    assert np.array_equal(np.asarray(tokens), expected_tokens)
    assert mask is not None and np.array_equal(np.asarray(mask), expected_mask)
    assert len(read_binidx(prefix)) == 120  # one sequence per record
    # the same masked loss from the binidx as from the .jsonl
    losses = []
    for data in (chat_file, prefix):
        cfg = tiny_config(data, "", tmp_path / f"run{len(losses)}", n_embd=32, ctx_len=48, steps=1)
        with Trainer(cfg) as trainer:
            trainer.setup()
            losses.append(trainer.forward_backward())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_a_mask_of_other_data_is_refused_and_a_plain_rewrite_removes_it(chat_file, tmp_path):
    prefix = tmp_path / "chat"
    prepare_dataset([chat_file], prefix, tokenizer="byte", progress=False)
    np.save(tmp_path / "chat.mask.npy", np.ones(5, dtype=np.uint8))
    with pytest.raises(RwkvkitError, match="chat.mask.npy: a loss mask of 5 .* written for other data"):
        load_training_data(prefix, "byte")
    text = tmp_path / "plain.txt"
    text.write_text("plain text, no chat here. " * 20)
    summary = prepare_dataset([text], prefix, tokenizer="byte", progress=False)
    assert summary.mask_path is None and not (tmp_path / "chat.mask.npy").exists()
    assert load_training_data(prefix, "byte")[1] is None


def test_chat_and_plain_inputs_are_not_mixed(chat_file, tmp_path):
    text = tmp_path / "plain.jsonl"
    text.write_text(json.dumps({"text": "a document"}) + "\n")
    with pytest.raises(RwkvkitError, match="plain.jsonl is not chat data"):
        prepare_dataset([chat_file, text], tmp_path / "mixed", tokenizer="byte", progress=False)
    assert not list(tmp_path.glob("mixed*"))


# ---------------------------------------------------------------------------------------------- rwkvkit eval


def test_eval_of_chat_data_is_the_masked_loss_of_each_record(chat_file):
    torch.manual_seed(0)
    model = new_model("7", 2, 32, 256, 16).eval()
    tok = load_tokenizer("byte")
    result = evaluate_chat(model, tok, chat_file, chunk_len=7, batch_size=5)
    # by hand: each record after id 0, one forward, cross-entropy of the marked targets
    nats, count = 0.0, 0
    for line in chat_file.read_text().splitlines():
        ids, mask = encode_record(tok, json.loads(line), "r")
        x = torch.tensor([[0, *ids[:-1].tolist()]])
        with torch.no_grad():
            logits, _ = model(x)
        ce = F.cross_entropy(logits[0].double(), torch.from_numpy(ids), reduction="none")
        nats += float(ce[torch.from_numpy(mask.astype(bool))].sum())
        count += int(mask.sum())
    assert result.records == 120 and result.tokens == count
    assert result.loss == pytest.approx(nats / count, rel=1e-5)


def test_rwkvkit_eval_reports_the_masked_loss(chat_file, tmp_path, capsys):
    torch.manual_seed(0)
    model_path = tmp_path / "m.pth"
    save_model(new_model("7", 2, 32, 256, 16), model_path)
    code, out, _ = run_cli(capsys, "eval", model_path, "--text", chat_file, "--tokenizer", "byte", "--json")
    assert code == 0
    report = json.loads(out)
    expected = evaluate_chat(load_model(model_path), load_tokenizer("byte"), chat_file)
    assert report["masked"] and report["loss"] == pytest.approx(expected.loss, rel=1e-6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        chat_file.read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "hi", "completion": ""})
    )
    code, _, err = run_cli(capsys, "eval", model_path, "--text", bad, "--tokenizer", "byte")
    assert_one_line_error(code, err, "bad.jsonl: line 2", "completion is empty")
