"""The trainer: official init values, optimizer groups, schedule, L2Wrap, data windows, and a short run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import reference_logits, reference_model
from tiny_training import tiny_config

from rwkvkit import RwkvkitError, load_model
from rwkvkit.models import build_model, new_config, new_model
from rwkvkit.models.rwkv7 import init_official_
from rwkvkit.train.data import eval_windows, sample_batch
from rwkvkit.train.metrics import MetricsLog
from rwkvkit.train.optim import L2Wrap, lr_at, param_groups
from rwkvkit.train.trainer import TrainConfig, Trainer, evaluate, train


def test_new_config_reproduces_released_lora_widths():
    c768 = new_config("7", 12, 768, 65536)
    assert (c768.d_decay, c768.d_iclr, c768.d_value, c768.d_gate) == (64, 64, 32, 128)
    c2048 = new_config("7", 24, 2048, 65536)
    assert (c2048.d_decay, c2048.d_iclr, c2048.d_value, c2048.d_gate) == (96, 96, 64, 256)
    assert c768.dim_ffn == 4 * 768 and c768.n_head == 12


def test_official_init_values_by_hand():
    L, C, N = 4, 64, 16
    model = init_official_(build_model(new_config("7", L, C, 300, N)))
    b1 = model.blocks[1].att
    r10, r01 = 1 - 1 / L, 1 / (L - 1)
    n = 5
    assert b1.x_r[0, 0, n].item() == pytest.approx(1 - (n / C) ** (0.2 * r10), rel=1e-6)
    assert b1.x_w[0, 0, n].item() == pytest.approx(1 - (n / C) ** (0.9 * r10), rel=1e-6)
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * abs(z)
    w0 = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3) + 0.5 + 2.5 * zigzag
    assert b1.w0[0, 0, n].item() == pytest.approx(w0, rel=1e-5)
    assert b1.a0[0, 0, n].item() == pytest.approx(-0.19 + 0.3 * zigzag + 0.4 * (n / (C - 1) - 0.5), rel=1e-5)
    assert b1.v0[0, 0, n].item() == pytest.approx(0.73 - 0.4 * (n / (C - 1) - 0.5), rel=1e-6)
    assert b1.k_k[0, 0, n].item() == pytest.approx(0.71 - 0.1 * (n / (C - 1) - 0.5), rel=1e-6)
    assert torch.all(b1.k_a == 1.02) and torch.all(b1.r_k == -0.04)
    assert torch.all(b1.w1 == 0) and torch.all(b1.g1 == 0)
    assert torch.all(b1.output.weight == 0) and torch.all(model.blocks[2].ffn.value.weight == 0)
    assert b1.ln_x.weight[0].item() == pytest.approx((2 / L) ** 0.7)
    assert model.emb.weight.abs().max() <= 1e-4
    # orthogonal with gain: W W^T = gain^2 I for the square receptance, 0.1^2 for att.key
    r = b1.receptance.weight
    assert torch.allclose(r @ r.T, torch.eye(C), atol=1e-4)
    k = b1.key.weight
    assert torch.allclose(k @ k.T, 0.01 * torch.eye(C), atol=1e-5)
    # head (V > C): gain 0.5 * sqrt(V / C), so W^T W = 0.25 V / C * I
    h = model.head.weight
    assert torch.allclose(h.T @ h, 0.25 * 300 / C * torch.eye(C), rtol=1e-3, atol=1e-3)
    ffn_x_k = model.blocks[1].ffn.x_k[0, 0, n].item()
    assert ffn_x_k == pytest.approx(1 - (n / C) ** (r10**4), rel=1e-6)


def test_official_init_values_of_v4_v5_v6_by_hand():
    L, C, N, n, layer = 4, 64, 16, 5, 1
    r01, r10, ddd = layer / (L - 1), 1 - layer / L, n / C
    v4 = new_model("4", L, C, 300)
    att = v4.blocks[layer].att
    assert att.time_decay[n].item() == pytest.approx(-5 + 8 * (n / (C - 1)) ** (0.7 + 1.3 * r01), rel=1e-5)
    assert att.time_first[n].item() == pytest.approx(math.log(0.3) + 0.5 * ((n + 1) % 3 - 1), rel=1e-6)
    assert att.time_mix_v[0, 0, n].item() == pytest.approx(ddd**r10 + 0.3 * r01, rel=1e-6)
    assert v4.blocks[layer].ffn.time_mix_r[0, 0, n].item() == pytest.approx(ddd**r10, rel=1e-6)
    assert torch.all(att.output.weight == 0) and torch.all(v4.blocks[layer].ffn.receptance.weight == 0)
    k = att.key.weight
    assert torch.allclose(k @ k.T, 0.01 * torch.eye(C), atol=1e-5)  # orthogonal, gain 0.1
    for version in ("5.2", "6"):
        model = new_model(version, L, C, 300, N)
        att = model.blocks[layer].att
        decay = -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01)
        assert att.time_decay.flatten()[n].item() == pytest.approx(decay, rel=1e-5)
        bonus = r01 * (1 - n / (C - 1)) + 0.1 * ((n + 1) % 3 - 1)
        assert att.time_faaaa.flatten()[n].item() == pytest.approx(bonus, rel=1e-5, abs=1e-7)
        assert att.ln_x.weight[0].item() == pytest.approx(((layer + 1) / L) ** 0.7)
        g = att.gate.weight
        assert torch.allclose(g @ g.T, 0.01 * torch.eye(C), atol=1e-5)
        assert model.config.dim_ffn == int(3.5 * C) // 32 * 32
    v6 = model
    att = v6.blocks[layer].att
    assert att.time_maa_v[0, 0, n].item() == pytest.approx(1 - (ddd**r10 + 0.3 * r01), rel=1e-6)
    assert att.time_maa_g[0, 0, n].item() == pytest.approx(1 - ddd ** (0.5 * r10), rel=1e-6)
    assert torch.all(att.time_maa_w1 == 0) and torch.all(att.time_decay_w1 == 0)
    assert 0 < att.time_maa_w2.abs().max() <= 0.01 and 0 < att.time_decay_w2.abs().max() <= 0.01
    assert (v6.config.d_mix, v6.config.d_decay) == (32, 64)


def test_param_groups_decay_only_2d_weights_and_double_lr_w0():
    model = build_model(new_config("7", 2, 64, 100, 16))
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    assert "blocks.0.att.key.weight" in decayed and "head.weight" in decayed and "emb.weight" in decayed
    assert all(n.endswith(".weight") for n in decayed)
    assert not any("ln" in n or n.endswith(("w1", "w2", "x_r")) for n in decayed)
    double = {names[id(p)] for p in groups["2x_lr"]["params"]}
    assert double == {"blocks.0.att.w0", "blocks.1.att.w0"} and groups["2x_lr"]["lr_scale"] == 2.0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 0.0, 1e-3, 1e-4, warmup_steps=10) == pytest.approx(1e-4)
    assert lr_at(9, 0.0, 1e-3, 1e-4, warmup_steps=10) == pytest.approx(1e-3)
    assert lr_at(50, 0.5, 1e-3, 1e-4, warmup_steps=10) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(100, 1.0, 1e-3, 1e-4, warmup_steps=10) == pytest.approx(1e-4)


def test_l2wrap_adds_gradient_on_the_max_logit_only():
    logits = torch.tensor([[[1.0, 3.0, -2.0], [0.5, -1.0, 0.25]]], requires_grad=True)  # (1, 2, 3)
    loss = logits.sum() * 0.0
    L2Wrap.apply(loss, logits).backward()
    factor = 1e-4 / 2
    expected = torch.tensor([[[0.0, 3.0 * factor, 0.0], [0.5 * factor, 0.0, 0.0]]])
    assert torch.allclose(logits.grad, expected)


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.int64)
    x1, y1 = sample_batch(tokens, step=7, batch_size=4, ctx_len=16, seed=3)
    x2, y2 = sample_batch(tokens, step=7, batch_size=4, ctx_len=16, seed=3)
    x3, _ = sample_batch(tokens, step=8, batch_size=4, ctx_len=16, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are the inputs shifted by one
    x, y = eval_windows(tokens, ctx_len=100)
    assert x.shape == (9, 100) and torch.equal(x.flatten(), torch.arange(900)) and y[0, 0] == 1


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(RwkvkitError, match="multiple of"):
        train(TrainConfig(n_embd=100, head_size=32, out=str(tmp_path)))
    with pytest.raises(RwkvkitError, match="no such data file"):
        train(TrainConfig(data=str(tmp_path / "nope.txt"), out=str(tmp_path)))


def test_metrics_log_appends_and_a_resume_cuts_it_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, write=True)
    log.open()
    log.record({"step": 1, "loss": 2.0})
    size = log.tell()
    log.record({"step": 2, "loss": 1.5})
    log.close()
    assert len(path.read_text().splitlines()) == 2
    resumed = MetricsLog(path, write=True)
    resumed.truncate(size)
    assert resumed.entries == [{"step": 1, "loss": 2.0}]
    assert path.read_text() == json.dumps({"step": 1, "loss": 2.0}) + "\n"
    silent = MetricsLog(tmp_path / "other.jsonl", write=False)  # ranks other than 0 write nothing
    silent.open()
    silent.record({"step": 1})
    silent.close()
    assert silent.tell() == 0 and not (tmp_path / "other.jsonl").exists()


def test_trainer_phases_one_by_one_give_the_run_of_train(tmp_path):
    (tmp_path / "train.txt").write_text("To be, or not to be, that is the question. " * 40)
    settings = dict(data=str(tmp_path / "train.txt"), n_layer=1, n_embd=32, head_size=16, ctx_len=16)
    settings.update(batch_size=2, steps=2, progress=False, plot_every=0)
    result = train(TrainConfig(**settings, out=str(tmp_path / "whole")))
    with Trainer(TrainConfig(**settings, out=str(tmp_path / "phases"))) as trainer:
        trainer.setup()
        entries = [trainer.train_step(progress=step / 2)[0] for step in range(2)]
        trainer.save(trainer.elapsed())
    assert entries[-1]["loss"] == round(result.final_loss, 6)
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in entries] == [e["loss"] for e in whole]
    a = load_model(tmp_path / "whole" / "model.pth").state_dict()
    b = load_model(tmp_path / "phases" / "model.pth").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_short_training_run_lowers_loss_and_writes_a_reference_loadable_pth(tmp_path):
    text = (
        "To be, or not to be, that is the question:\n"
        "Whether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\n"
    ) * 40
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text[:1500])
    cfg = tiny_config(
        tmp_path / "train.txt",
        tmp_path / "val.txt",
        tmp_path / "run",
        n_embd=32,
        ctx_len=64,
        steps=60,
        warmup_steps=5,
        eval_every=30,
    )
    result = train(cfg)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5  # from ~ln(256) = 5.5 to well below
    assert result.val_loss is not None and result.val_loss < 3.0
    assert [m["step"] for m in metrics if "val_loss" in m] == [30, 60]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    # the written file is an official checkpoint: the reference package runs it and agrees with us
    model = load_model(result.model_path)
    tokens = list(b"To be, or not")
    with torch.inference_mode():
        ours, _ = model(torch.tensor([tokens]))
    theirs, _ = reference_logits(reference_model(result.model_path), tokens)
    assert (ours[0] - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max().item())
    # and its validation loss is what the trainer reported
    val = torch.tensor([list(text[:1500].encode())])
    x, y = eval_windows(val[0].numpy(), 64)
    with torch.inference_mode():
        logits, _ = model(x)
    assert F.cross_entropy(logits.flatten(0, 1), y.flatten()).item() == pytest.approx(
        result.val_loss, rel=1e-4
    )


SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "shakespeare"


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_every_version_trains_on_shakespeare_and_the_reference_runs_it(tmp_path, version):
    """A tiny model of each version, from the official init, lowers the validation loss on held-out
    Shakespeare; the written .pth is official (the reference package agrees with our logits); and in
    fp16 and bf16 the model picks the same top-1 token as in fp32 on at least 95% of a text."""
    train_text = (SHAKESPEARE / "train.txt").read_text(encoding="utf-8")[:300_000]
    (tmp_path / "train.txt").write_text(train_text, encoding="utf-8")
    cfg = tiny_config(
        tmp_path / "train.txt",
        SHAKESPEARE / "val.txt",
        tmp_path / "run",
        eval_tokens=8192,
        version=version,
        n_embd=64,
        ctx_len=64,
        steps=80,
        warmup_steps=5,
        seed=1,
    )
    torch.manual_seed(cfg.seed)  # the trainer's own initialisation, evaluated before any step
    untrained = new_model(version, cfg.n_layer, cfg.n_embd, 256, cfg.head_size)
    val_tokens = np.frombuffer((SHAKESPEARE / "val.txt").read_bytes(), dtype=np.uint8).astype(np.int64)
    val = eval_windows(val_tokens[: cfg.eval_tokens + 1], cfg.ctx_len)
    initial = evaluate(untrained, *val)
    result = train(cfg)
    assert initial > 5.0  # about ln(256): the official init starts from a near-uniform prediction
    # well below the byte-unigram entropy of the corpus (3.33 nats): it has learned to use context
    assert result.val_loss < 2.8, (initial, result.val_loss)
    model = load_model(result.model_path)
    assert model.config.version == version
    tokens = list(b"ROMEO:\nWhat light")
    with torch.inference_mode():
        ours, _ = model(torch.tensor([tokens]))
    theirs, _ = reference_logits(reference_model(result.model_path, version), tokens)
    assert (ours[0] - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max().item())
    # run in fp16 and bf16, the trained model predicts what it does in fp32 (finite, same top-1)
    text = torch.tensor([list((SHAKESPEARE / "val.txt").read_bytes()[:512])])
    with torch.inference_mode():
        logits32, _ = model(text)
        for dtype in (torch.float16, torch.bfloat16):
            logits, _ = load_model(result.model_path, dtype=dtype)(text)
            assert torch.isfinite(logits).all(), dtype
            agree = (logits.argmax(-1) == logits32.argmax(-1)).float().mean().item()
            assert agree >= 0.95, (dtype, agree)
