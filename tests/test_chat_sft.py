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
from tiny_training import tiny_config

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_format import format_conversation
from rwkvkit.tokenizer import load_tokenizer
from rwkvkit.train.chat_data import encode_record, load_chat_jsonl
from rwkvkit.train.data import load_training_data, sample_batch, sample_mask
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
