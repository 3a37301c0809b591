"""Training runs end to end: config files, accumulation, checkpointing, a killed and resumed run,
non-finite losses, bf16, fine-tuning (full, LoRA + merge, state tuning, freezing) from the CLI,
torchrun with 2 processes (DDP and FSDP), and ``rwkvkit eval``.

Every run is tiny (a 2-layer model, a few steps) and CPU only. Written checkpoints are checked with the
reference ``rwkv`` package, which must load them and generate from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import random_state_dict
from reference import reference_logits, reference_model
from tiny_training import tiny_config

from rwkvkit import RwkvkitError, load_model
from rwkvkit.cli import main as cli_main
from rwkvkit.cli.train import add_arguments, config_from_args
from rwkvkit.train.config import TrainConfig
from rwkvkit.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "shakespeare"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A 150 KB slice of the training text, 10 KB of the validation text, and a different text."""
    d = tmp_path_factory.mktemp("corpus")
    train_text = (SHAKESPEARE / "train.txt").read_text(encoding="utf-8")
    (d / "train.txt").write_text(train_text[:150_000], encoding="utf-8")
    (d / "val.txt").write_text(
        (SHAKESPEARE / "val.txt").read_text(encoding="utf-8")[:10_000], encoding="utf-8"
    )
    (d / "other.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400, encoding="utf-8")
    return {"train": d / "train.txt", "val": d / "val.txt", "other": d / "other.txt"}


def tiny(corpus, out: Path, **overrides) -> TrainConfig:
    settings = dict(n_embd=32, ctx_len=32, steps=6, warmup_steps=2, plot_every=0)
    return tiny_config(corpus["train"], corpus["val"], out, **{**settings, **overrides})


def losses(out: Path) -> list[float]:
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in entries if e.get("loss") is not None]


def assert_same_curve(a: list[float], b: list[float], rel: float = 1e-5) -> None:
    assert len(a) == len(b) and len(a) > 0, (a, b)
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= rel * abs(y), (a, b)


def reference_generates(path: Path, version: str, prompt: list[int], n: int = 8) -> list[int]:
    """Greedy tokens from the reference package on a written .pth (it loads it and runs it)."""
    ref = reference_model(path, version)
    logits, state = reference_logits(ref, prompt)
    out = []
    for _ in range(n):
        token = int(logits[-1].argmax())
        out.append(token)
        logits, state = reference_logits(ref, [token], state)
    return out


def ours_generates(path: Path, prompt: list[int], n: int = 8) -> list[int]:
    model = load_model(path)
    out = []
    with torch.inference_mode():
        logits, state = model(torch.tensor([prompt]))
        for _ in range(n):
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits, state = model(torch.tensor([[token]]), state)
    return out


# ---------------------------------------------------------------------------------------------- config


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_config_files_and_command_line_overrides(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("n_layer: 3\nlr: 1e-3\nfreeze: ['emb.weight']\nversion: 6\nl2wrap: false\n")
    cfg = parse(["--config", str(yaml_file), "--lr", "2e-3", "--steps", "9"])
    assert (cfg.n_layer, cfg.lr, cfg.steps, cfg.freeze, cfg.version, cfg.l2wrap) == (
        3, 2e-3, 9, ["emb.weight"], "6", False
    )  # fmt: skip
    assert cfg.n_embd == TrainConfig().n_embd  # given nowhere: the default
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('n-embd = 64\ntune = "state"\nwarmup_steps = 3\n')
    cfg = parse(["--config", str(toml_file), "--no-progress"])
    assert (cfg.n_embd, cfg.tune, cfg.warmup_steps, cfg.progress) == (64, "state", 3, False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_layers: 3\n")
    with pytest.raises(RwkvkitError, match="unknown option 'n_layers'"):
        parse(["--config", str(bad)])
    bad.write_text("n_layer: three\n")
    with pytest.raises(RwkvkitError, match="'n_layer' must be a int"):
        parse(["--config", str(bad)])
    bad.write_text("n_layer: [\n")
    with pytest.raises(RwkvkitError, match="not valid YAML"):
        parse(["--config", str(bad)])


def test_train_help_explains_every_option(capsys):
    code = cli_main(["train", "--help"])
    out = capsys.readouterr().out
    assert code == 0
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out, name
    assert "--config" in out and "default:" in out


# ---------------------------------------------------------------------------------------------- the loop


def test_accumulation_and_checkpointing_do_not_change_the_curve(corpus, tmp_path):
    """batch 8 in one go == 4 accumulated micro-batches of 2 == with gradient checkpointing."""
    train(tiny(corpus, tmp_path / "plain"))
    train(tiny(corpus, tmp_path / "accumulated", micro_batch_size=2))
    train(tiny(corpus, tmp_path / "recomputed", grad_checkpoint=True))
    reference_curve = losses(tmp_path / "plain")
    assert reference_curve[-1] < reference_curve[0]
    assert_same_curve(losses(tmp_path / "accumulated"), reference_curve)
    assert_same_curve(losses(tmp_path / "recomputed"), reference_curve, rel=1e-6)


def test_a_non_finite_loss_skips_the_step_and_leaves_the_weights(corpus, tmp_path):
    calls = {"n": 0}

    def poisoned_loss(logits, targets):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss * float("nan") if calls["n"] == 3 else loss

    out = tmp_path / "run"
    result = train(tiny(corpus, out, steps=3, save_every=2, val_data=""), loss_fn=poisoned_loss)
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert entries[2]["step"] == 3 and entries[2]["skipped"] and entries[2]["loss"] is None
    assert all(math.isfinite(e["loss"]) for e in entries[:2])
    # the step-2 checkpoint was overwritten at the end: the weights did not move at step 3
    state = torch.load(out / "train_state.pt", weights_only=True)
    final = load_model(result.model_path).state_dict()
    assert state["step"] == 3
    for key, value in final.items():
        assert torch.isfinite(value).all(), key
    optimizer_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert optimizer_steps == {2}  # AdamW stepped twice, not three times


def test_bf16_autocast_trains(corpus, tmp_path):
    result = train(tiny(corpus, tmp_path / "bf16", precision="bf16", steps=8))
    curve = losses(tmp_path / "bf16")
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0] - 0.5
    assert load_model(result.model_path).emb.weight.dtype == torch.float32  # fp32 master weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_argv(corpus, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(corpus["train"]), "--val-data", str(corpus["val"]), "--out", str(out),
        "--n-layer", "2", "--n-embd", "32", "--head-size", "16", "--ctx-len", "32", "--batch-size", "8",
        "--lr", "3e-3", "--warmup-steps", "2", "--no-progress", "--plot-every", "0", *extra,
    ]  # fmt: skip


def test_a_killed_run_resumes_on_the_same_loss_curve(corpus, tmp_path):
    """SIGKILL a run mid-way (after at least one checkpoint); --resume continues exactly."""
    argv = ["--steps", "40", "--save-every", "5", "--eval-every", "10"]
    train(parse(_train_argv(corpus, tmp_path / "whole", *argv)))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rwkvkit.train", *_train_argv(corpus, out, *argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is past a checkpoint and between two others
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if len([x for x in lines if '"loss"' in x]) >= 12:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "train_state.pt").exists()
    killed_at = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert 10 <= killed_at < 40
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no torn or stray files
    train(parse(_train_argv(corpus, out, *argv, "--resume")))
    assert_same_curve(losses(out), losses(tmp_path / "whole"), rel=1e-6)
    a, b = (
        load_model(out / "model.pth").state_dict(),
        load_model(tmp_path / "whole" / "model.pth").state_dict(),
    )
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_resume_refuses_another_run(corpus, tmp_path):
    out = tmp_path / "run"
    train(parse(_train_argv(corpus, out, "--steps", "2")))
    with pytest.raises(RwkvkitError, match="n_embd"):
        train(parse(_train_argv(corpus, out, "--steps", "4", "--resume", "--n-embd", "64")))
    with pytest.raises(RwkvkitError, match="nothing to resume"):
        train(parse(_train_argv(corpus, tmp_path / "empty", "--resume")))


# ---------------------------------------------------------------------------------------------- tuning


@pytest.fixture(scope="module")
def base_model(corpus, tmp_path_factory) -> Path:
    """A small RWKV-6 trained a little on Shakespeare: the base for the fine-tuning runs."""
    out = tmp_path_factory.mktemp("base")
    cfg = tiny(corpus, out, version="6", n_embd=64, steps=20, val_data="")
    return train(cfg).model_path


def test_full_fine_tune_from_the_cli(corpus, base_model, tmp_path, capsys):
    out = tmp_path / "ft"
    code = cli_main(["train", "--init-from", str(base_model), *_fine_tune_argv(corpus, out)])
    assert code == 0
    tuned = out / "model.pth"
    assert _eval_loss(tuned, corpus["other"]) < _eval_loss(base_model, corpus["other"]) - 0.5
    prompt = list(b"The quick")
    assert reference_generates(tuned, "6", prompt) == ours_generates(tuned, prompt)


def _fine_tune_argv(corpus, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(corpus["other"]), "--out", str(out), "--ctx-len", "32", "--batch-size", "8",
        "--steps", "12", "--lr", "3e-3", "--warmup-steps", "2", "--no-progress", "--plot-every", "0", *extra,
    ]  # fmt: skip


def _eval_loss(model_path: Path, text: Path, ctx_len: int = 32) -> float:
    """Mean loss over the first 4096 bytes of ``text`` cut in windows of ``ctx_len``, each from the
    initial state (as training sees them; what a tuned initial state changes)."""
    import numpy as np

    from rwkvkit.train.data import eval_windows
    from rwkvkit.train.trainer import evaluate

    tokens = np.frombuffer(text.read_bytes()[:4097], dtype=np.uint8).astype(np.int64)
    return evaluate(load_model(model_path), *eval_windows(tokens, ctx_len))


def test_lora_from_the_cli_then_merge(corpus, base_model, tmp_path):
    out = tmp_path / "lora"
    argv = _fine_tune_argv(corpus, out, "--tune", "lora", "--lora-r", "4", "--lr", "1e-2")
    assert cli_main(["train", "--init-from", str(base_model), *argv]) == 0
    merged, adapter = out / "model.pth", out / "adapter.safetensors"
    assert _eval_loss(merged, corpus["other"]) < _eval_loss(base_model, corpus["other"]) - 0.3
    base_sd, merged_sd = torch.load(base_model, weights_only=True), torch.load(merged, weights_only=True)
    assert list(merged_sd) == list(base_sd)
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert changed and all(k.endswith(".weight") and ("att." in k or "ffn." in k) for k in changed)
    assert "blocks.0.att.time_decay" not in changed and "emb.weight" not in changed
    # rwkvkit merge of the written adapter into the base gives the same official file
    again = tmp_path / "merged_again.pth"
    assert cli_main(["merge", "--base", str(base_model), "--adapter", str(adapter), "-o", str(again)]) == 0
    again_sd = torch.load(again, weights_only=True)
    assert all(torch.allclose(again_sd[k], merged_sd[k], atol=1e-6) for k in merged_sd)
    prompt = list(b"The quick")
    assert reference_generates(merged, "6", prompt) == ours_generates(merged, prompt)


def test_state_tuning_from_the_cli(corpus, tmp_path):
    # a random checkpoint with trained-like scales: its time mix is strong enough for a tuned state to
    # matter (a base trained for a few steps from the official init has att.output still near zero)
    base_model = tmp_path / "base.pth"
    torch.save(random_state_dict("6", n_layer=2, n_embd=64, head_size=16, vocab_size=256, seed=1), base_model)
    out = tmp_path / "state"
    argv = _fine_tune_argv(corpus, out, "--tune", "state", "--lr", "0.1", "--steps", "20")
    assert cli_main(["train", "--init-from", str(base_model), *argv]) == 0
    tuned = out / "model.pth"
    base_sd, tuned_sd = torch.load(base_model, weights_only=True), torch.load(tuned, weights_only=True)
    extra = set(tuned_sd) - set(base_sd)
    assert extra == {f"blocks.{i}.att.time_state" for i in range(2)}
    assert all(torch.equal(base_sd[k], tuned_sd[k]) for k in base_sd)  # every weight bit-identical
    assert _eval_loss(tuned, corpus["other"]) < _eval_loss(base_model, corpus["other"]) - 0.2
    prompt = list(b"The quick")  # the reference reads att.time_state itself for v6
    assert reference_generates(tuned, "6", prompt) == ours_generates(tuned, prompt)


def test_frozen_parameters_stay_bit_identical(corpus, base_model, tmp_path):
    out = tmp_path / "frozen"
    argv = _fine_tune_argv(corpus, out, "--freeze", "blocks.0.*", "--freeze", "emb.weight", "--steps", "4")
    assert cli_main(["train", "--init-from", str(base_model), *argv]) == 0
    base_sd, tuned_sd = (
        torch.load(base_model, weights_only=True),
        torch.load(out / "model.pth", weights_only=True),
    )
    frozen = [key for key in base_sd if key.startswith("blocks.0.") or key == "emb.weight"]
    assert len(frozen) > 10 and all(torch.equal(base_sd[key], tuned_sd[key]) for key in frozen)
    assert not torch.equal(base_sd["blocks.1.att.key.weight"], tuned_sd["blocks.1.att.key.weight"])


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(corpus, tmp_path, mode):
    """2 processes (gloo, CPU) on the same global batch follow the single-process loss curve; rank 0
    alone writes the outputs."""
    argv = ["--steps", "6", "--eval-every", "3", "--save-every", "3"]
    train(parse(_train_argv(corpus, tmp_path / "single", *argv)))
    out = tmp_path / mode
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "rwkvkit.train", *_train_argv(corpus, out, *argv, *(["--fsdp"] if mode == "fsdp" else [])),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_curve(losses(out), losses(tmp_path / "single"))
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4, 5, 6]  # written once, not twice
    assert done.stdout.count("model: ") == 1
    a = torch.load(out / "model.pth", weights_only=True)
    b = torch.load(tmp_path / "single" / "model.pth", weights_only=True)
    assert list(a) == list(b) and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    prompt = list(b"ROMEO")
    assert reference_generates(out / "model.pth", "7", prompt) == ours_generates(out / "model.pth", prompt)


# ---------------------------------------------------------------------------------------------- eval


def test_eval_command_against_the_reference(tmp_path, capsys):
    sd = random_state_dict("5.2", n_layer=2, n_embd=64, vocab_size=256, seed=3)
    path = tmp_path / "m.pth"
    torch.save(sd, path)
    text = "To be, or not to be: that is the question. 生存还是毁灭"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    code = cli_main(["eval", str(path), "--text", str(tmp_path / "t.txt"), "--tokenizer", "byte", "--json",
                     "--chunk-len", "7"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    ids = [0, *text.encode("utf-8")]  # the end-of-text id first, then every byte is scored
    logits, _ = reference_logits(reference_model(path, "5.2"), ids[:-1])
    nats = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    n_bytes = len(text.encode("utf-8"))
    assert result["tokens"] == n_bytes and result["bytes"] == n_bytes
    assert result["loss"] == pytest.approx(nats / n_bytes, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nats / n_bytes), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    code = cli_main(["eval", str(path), "--text", str(tmp_path / "missing.txt"), "--tokenizer", "byte"])
    assert code == 2 and "no such text file" in capsys.readouterr().err


def test_training_on_a_binidx_dataset_from_rwkvkit_data(corpus, tmp_path):
    """rwkvkit data -> .bin/.idx -> rwkvkit train on the prefix; .jsonl trains directly too."""
    jsonl = tmp_path / "docs.jsonl"
    text = corpus["train"].read_text(encoding="utf-8")
    jsonl.write_text("".join(json.dumps({"text": text[i : i + 5000]}) + "\n" for i in range(0, 60_000, 5000)))
    prefix = tmp_path / "docs"
    assert cli_main(["data", str(jsonl), "-o", str(prefix), "--tokenizer", "byte", "--workers", "1"]) == 0
    for data in (prefix, jsonl):
        out = tmp_path / f"run-{data.suffix or 'binidx'}"
        result = train(tiny(corpus, out, data=str(data), val_data="", steps=4))
        curve = losses(out)
        assert len(curve) == 4 and curve[-1] < curve[0] and result.model_path.exists()
