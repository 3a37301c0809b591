"""Infinite-context training (``--seq-len``, rwkvkit.train.infctx).

The trainer's step over sequences run in windows is checked against references written here: the
whole sequence in one forward (loss and every gradient, with the L2Wrap term as its own formula) when
the gradient flows through every window, and truncated back-propagation through time (the state
detached between groups of windows) otherwise; validation against the whole-sequence forward; a run
end to end (outputs, a run interrupted and resumed on the same curve); bad settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from asserts import assert_matches
from checkpoints import random_state_dict
from tiny_training import torchrun_train

from rwkvkit.errors import RwkvkitError
from rwkvkit.train import infctx
from rwkvkit.train.config import TrainConfig
from rwkvkit.train.data import eval_windows, sample_batch, sample_mask
from rwkvkit.train.trainer import Trainer, train

SEQ, CTX, ROWS = 64, 16, 2  # 4 windows per sequence


def token_file(tmp_path: Path, n: int = 4000, seed: int = 0) -> Path:
    """A .npy stream of byte-vocabulary ids with some structure (a repeating pattern plus noise)."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(1, 256, size=37)
    stream = np.where(rng.random(n) < 0.3, rng.integers(1, 256, size=n), np.resize(pattern, n))
    path = tmp_path / f"tokens{seed}.npy"
    np.save(path, stream.astype(np.int64))
    return path


def random_model(tmp_path: Path, version: str = "7") -> str:
    """A checkpoint with random weights (the official init barely uses the carried state at first)."""
    shape = dict(
        n_layer=2, n_embd=32, vocab_size=256, seed=3, **({} if version == "4" else {"head_size": 16})
    )
    path = tmp_path / f"random{version}.pth"
    torch.save(random_state_dict(version, **shape), path)
    return str(path)


def chat_file(tmp_path: Path) -> Path:
    """Chat records (only the replies carry loss), long enough for several sequences."""
    rng = np.random.default_rng(1)
    words = ["red", "blue", "green", "a cat", "the sea", "seven", "Rome", "yes", "no"]
    with (tmp_path / "chat.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(60):
            q, a = rng.choice(words, 2)
            record = {
                "messages": [{"role": "user", "content": f"Say {q}."}, {"role": "assistant", "content": a}]
            }
            f.write(json.dumps(record) + "\n")
    return tmp_path / "chat.jsonl"


def config(tmp_path: Path, data: Path, **settings) -> TrainConfig:
    base = dict(
        data=str(data), init_from=random_model(tmp_path, settings.pop("version", "7")), n_layer=2,
        n_embd=32, head_size=16, ctx_len=CTX, seq_len=SEQ, batch_size=ROWS, steps=1,
        out=str(tmp_path / "run"), progress=False, plot_every=0,
    )  # fmt: skip
    return TrainConfig(**{**base, **settings})


def trainer_step(cfg: TrainConfig) -> tuple[float, dict[str, torch.Tensor], Trainer]:
    """The trainer's loss and gradients of step 0 (the weights are not changed by it)."""
    trainer = Trainer(cfg)
    trainer.setup()
    loss = trainer.forward_backward()
    grads = {n: p.grad.clone() for n, p in trainer.parts.model.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss, grads, trainer


def l2wrap_term(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """A term whose gradient is L2Wrap's: ``scale`` times each position's largest logit, at that logit
    (the gradient of scale / 2 * max^2)."""
    return 0.5 * scale * (logits.max(dim=-1).values ** 2).sum()


def reference_loss(model, x, y, mask, windows_per_group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, objective) of sequences x, y (B, S) written directly: the mean next-token cross-entropy
    (over the marked targets with ``mask``) and L2Wrap at 1e-4 / (B * S). ``windows_per_group`` None: the
    whole sequence in one forward; k: windows of CTX, the state detached every k windows."""
    B, S = x.shape
    if windows_per_group is None:
        logits, _ = model(x)
        pieces = [(logits, y, mask)]
    else:
        pieces, state = [], None
        for j in range(S // CTX):
            if state is not None and j % windows_per_group == 0:
                state = state.detach()
            w = slice(j * CTX, (j + 1) * CTX)
            logits, state = model(x[:, w], state)
            pieces.append((logits, y[:, w], None if mask is None else mask[:, w]))
    ce_sum = torch.zeros(())
    l2 = torch.zeros(())
    for logits, targets, m in pieces:
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        ce_sum = ce_sum + (ce if m is None else ce * m.flatten()).sum()
        l2 = l2 + l2wrap_term(logits, 1e-4 / (B * S))
    loss = ce_sum / (B * S if mask is None else mask.sum())
    return loss, loss + l2


def reference_grads(trainer: Trainer, windows_per_group: int | None) -> tuple[float, dict[str, torch.Tensor]]:
    cfg, model = trainer.cfg, trainer.parts.model
    x, y = sample_batch(trainer.tokens, 0, cfg.batch_size, cfg.seq_len, cfg.seed)
    mask = (
        None if trainer.mask is None else sample_mask(trainer.mask, 0, cfg.batch_size, cfg.seq_len, cfg.seed)
    )
    loss, objective = reference_loss(model, x, y, mask, windows_per_group)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(objective, [p for _, p in named], allow_unused=True)
    return loss.item(), {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}


def assert_same_grads(ours: dict, ref: dict, what: str, rel: float = 1e-5) -> None:
    assert ours.keys() == ref.keys(), (sorted(ours.keys() ^ ref.keys()), what)
    for name in ref:
        assert_matches(ours[name], ref[name], f"{what} {name}", rel)


# ---------------------------------------------------------------------------------------------- the step


@pytest.mark.parametrize(
    "version, settings",
    [
        ("7", {}),
        ("7", {"grad_checkpoint": True, "micro_batch_size": 1}),
        ("7", {"tune": "lora"}),
        ("6", {}),
        ("5.2", {}),
        ("4", {}),
    ],
)
def test_gradient_through_every_window_is_the_whole_sequence_gradient(tmp_path, version, settings):
    """state_grad_windows >= windows: loss and every gradient equal the whole sequence in one forward."""
    torch.manual_seed(0)
    cfg = config(tmp_path, token_file(tmp_path), version=version, state_grad_windows=4, **settings)
    loss, grads, trainer = trainer_step(cfg)
    ref_loss, ref_grads = reference_grads(trainer, None)
    assert grads and abs(loss - ref_loss) <= 1e-6 * ref_loss
    assert_same_grads(grads, ref_grads, f"v{version}")
    if settings.get("tune") == "lora":
        assert all("lora_" in name for name in grads)
    trainer.close()


def test_bf16_autocast_runs_the_windows(tmp_path):
    """--precision bf16: the windows run under autocast; loss and gradients near the fp32 step's."""
    data = token_file(tmp_path)
    loss32, grads32, trainer = trainer_step(config(tmp_path, data, state_grad_windows=2))
    trainer.close()
    loss16, grads16, trainer = trainer_step(config(tmp_path, data, state_grad_windows=2, precision="bf16"))
    trainer.close()
    assert loss16 != loss32 and abs(loss16 - loss32) <= 2e-2 * loss32  # autocast ran, and is close
    for name, g in grads32.items():
        assert (grads16[name] - g).norm() <= 0.1 * g.norm() + 1e-6, name


def test_chat_masks_through_every_window(tmp_path):
    """Chat data: the loss is the mean over the marked targets of the whole sequences."""
    cfg = config(tmp_path, chat_file(tmp_path), state_grad_windows=8, tokenizer="byte")
    loss, grads, trainer = trainer_step(cfg)
    assert trainer.mask is not None
    ref_loss, ref_grads = reference_grads(trainer, None)
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    assert_same_grads(grads, ref_grads, "chat")
    trainer.close()


@pytest.mark.parametrize("k, tune", [(1, "full"), (3, "full"), (2, "state")])
def test_truncated_gradients_equal_truncated_backprop(tmp_path, k, tune):
    """state_grad_windows k: the gradients of truncated BPTT (state detached every k windows; a group of
    3 leaves a last group of 1); the loss is the whole sequence's in any case. State tuning: only the
    first group reaches the initial state."""
    cfg = config(tmp_path, token_file(tmp_path), state_grad_windows=k, tune=tune)
    loss, grads, trainer = trainer_step(cfg)
    ref_loss, ref_grads = reference_grads(trainer, k)
    with torch.no_grad():
        whole_loss, _ = reference_loss(
            trainer.parts.model, *sample_batch(trainer.tokens, 0, ROWS, SEQ, 0), None, None
        )
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss and abs(loss - whole_loss.item()) <= 1e-5 * loss
    assert_same_grads(grads, ref_grads, f"k={k} {tune}")
    if tune == "state":
        assert set(grads) == {"blocks.0.att.time_state", "blocks.1.att.time_state"}
    else:  # truncation changes the gradient (else the test could not tell the two apart)
        _, full = reference_grads(trainer, None)
        assert (grads["emb.weight"] - full["emb.weight"]).norm() > 1e-3 * full["emb.weight"].norm()
    trainer.close()


def test_validation_carries_the_state(tmp_path):
    """evaluate_sequences equals the whole-sequence forward, and differs from windows each run alone."""
    trainer = Trainer(config(tmp_path, token_file(tmp_path)))
    trainer.setup()
    model = trainer.parts.model
    x, y = eval_windows(trainer.tokens[:1000], SEQ)  # (15, 64)
    ours = infctx.evaluate_sequences(model, x, y, CTX, batch_size=4)
    with torch.no_grad():
        logits, _ = model(x)
        whole = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        alone = F.cross_entropy(model(x.reshape(-1, CTX))[0].flatten(0, 1), y.flatten()).item()
    assert abs(ours - whole) <= 1e-6 * whole and abs(ours - alone) > 1e-4
    trainer.close()


# ---------------------------------------------------------------------------------------------- runs


def entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_its_outputs_and_resumes_on_the_same_curve(tmp_path, monkeypatch):
    """model.pth, metrics.jsonl with val_loss over whole sequences; a run that dies in step 5 (saved at
    step 3) and is resumed logs the same steps and ends with the same weights as one that never stopped."""
    data, val = token_file(tmp_path, seed=0), token_file(tmp_path, n=600, seed=1)
    settings = dict(steps=6, save_every=3, eval_every=3, val_data=str(val), state_grad_windows=2, lr=3e-3)
    settings.update(init_from="", warmup_steps=0)  # a new model, trained from its official init
    whole = train(config(tmp_path, data, **settings, out=str(tmp_path / "whole")))
    out = tmp_path / "whole"
    logged = entries(out)
    steps = [e for e in logged if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(e["loss"]) for e in steps) and steps[-1]["tokens"] == 6 * ROWS * SEQ
    assert [e["step"] for e in logged if "val_loss" in e] == [3, 6]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (out / "model.pth").is_file() and Path(whole.model_path) == out / "model.pth"
    assert whole.val_loss is not None and whole.val_loss == pytest.approx(logged[-1]["val_loss"], abs=1e-6)

    original = infctx.forward_backward

    def dies_in_step_5(trainer):
        if trainer.step == 4:
            raise KeyboardInterrupt  # as a kill: nothing after step 4 is written
        return original(trainer)

    monkeypatch.setattr(infctx, "forward_backward", dies_in_step_5)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, data, **settings, out=str(killed)))
    assert [e["step"] for e in entries(killed) if "loss" in e] == [1, 2, 3, 4]
    monkeypatch.setattr(infctx, "forward_backward", original)
    train(config(tmp_path, data, **settings, out=str(killed), resume=True))
    drop = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in e.items() if k not in drop} for e in entries(killed)] == [
        {k: v for k, v in e.items() if k not in drop} for e in logged
    ]
    a = torch.load(killed / "model.pth", weights_only=True)
    b = torch.load(out / "model.pth", weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, mode):
    """2 processes (gloo, CPU) each run half the sequences; the averaged gradients give the
    single-process curve and weights (DDP: the unwrapped model, gradients averaged once per step;
    FSDP2: its own reduction at every window's backward); rank 0 alone writes metrics.jsonl."""
    data, val = token_file(tmp_path, seed=0), token_file(tmp_path, n=300, seed=1)
    settings = dict(steps=3, batch_size=4, state_grad_windows=2, lr=3e-3, val_data=str(val), eval_every=3)
    train(config(tmp_path, data, **settings, out=str(tmp_path / "single")))
    argv = [
        "--data", str(data), "--val-data", str(val), "--init-from", str(tmp_path / "random7.pth"),
        "--ctx-len", str(CTX), "--seq-len", str(SEQ), "--state-grad-windows", "2", "--batch-size", "4",
        "--steps", "3", "--lr", "3e-3", "--eval-every", "3", "--no-progress", "--plot-every", "0",
        "--out", str(tmp_path / mode), *(["--fsdp"] if mode == "fsdp" else []),
    ]  # fmt: skip
    done = torchrun_train(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = entries(tmp_path / "single"), entries(tmp_path / mode)
    assert [e["step"] for e in two if "loss" in e] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "val_loss", "tokens"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
    a = torch.load(tmp_path / "single" / "model.pth", weights_only=True)
    b = torch.load(tmp_path / mode / "model.pth", weights_only=True)
    assert list(a) == list(b) and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(seq_len=40), "--seq-len 40 must be a multiple of --ctx-len 16"),
        (dict(state_grad_windows=0), "--state-grad-windows >= 1"),
        (dict(seq_len=-16), "--seq-len must be >= 0"),
        (dict(pack=True), "choose one"),
        (dict(objective="dpo"), "--seq-len go with --objective lm, not dpo"),
        (dict(seq_len=4096), "--data .* has 4000 tokens, fewer than --seq-len \\+ 2 = 4098"),
        (dict(val_data="VAL"), "--val-data .* has 50 tokens, fewer than --seq-len \\+ 1 = 65"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, settings, message):
    if settings.get("val_data") == "VAL":
        settings["val_data"] = str(token_file(tmp_path, n=50, seed=2))
    with pytest.raises(RwkvkitError, match=message) as info:
        train(config(tmp_path, token_file(tmp_path), **settings))
    assert "\n" not in str(info.value)
