"""DPO (``--objective dpo``): the loss and its gradients against a direct implementation of the formula,
the reference cache (counted forwards), a synthetic preference set whose held-out accuracy rises, bad
records, resume, and the LoRA path.

The direct implementation below is the DPO formula written out per pair: prompt + completion run together
from scratch (no state reuse, no padding, no batching), summed log-probabilities, -log sigmoid of the
beta-scaled difference of log-ratios, averaged over the pairs.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_training import torchrun_train

from rwkvkit import RwkvkitError
from rwkvkit.models import new_model
from rwkvkit.models.common import RWKVModel
from rwkvkit.train import dpo
from rwkvkit.train.config import TrainConfig
from rwkvkit.train.trainer import Trainer, train

BETA = 0.3


def direct_logp(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """sum_t log pi(c_t | prompt, c_<t), prompt + completion run from scratch in one sequence."""
    full = torch.tensor([prompt + completion])  # (1, Tp + Tc)
    logits, _ = model(full)  # (1, Tp + Tc, V)
    rows = logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1].float()  # (Tc, V) predicting c_t
    logp = torch.log_softmax(rows, dim=-1)
    return logp[torch.arange(len(completion)), torch.tensor(completion)].sum()


def direct_loss(
    model, reference, pairs: list[tuple[list[int], list[int], list[int]]], sft_weight: float = 0.0
) -> torch.Tensor:
    """mean over pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) - sft_weight * pi_c / |c|."""
    losses = []
    for prompt, chosen, rejected in pairs:
        with torch.no_grad():
            ref_c, ref_r = direct_logp(reference, prompt, chosen), direct_logp(reference, prompt, rejected)
        pi_c, pi_r = direct_logp(model, prompt, chosen), direct_logp(model, prompt, rejected)
        dpo_term = -F.logsigmoid(BETA * ((pi_c - ref_c) - (pi_r - ref_r)))
        losses.append(dpo_term - sft_weight * pi_c / len(chosen))
    return torch.stack(losses).mean()


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * max(scale, 1e-8), (a, b)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


RECORDS = [
    {"prefix": "Hello", "chosen": " world", "rejected": " there, you"},
    {"prompt": "2+2?", "chosen": "4", "rejected": "five"},
    {"prefix": "xyz w", "chosen": "a", "rejected": "bcd"},
    {"prompt": "Name a colour.", "chosen": "Blue, the sky's.", "rejected": "No."},
]


def byte_tokens(record: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) as the module docstring says they are rendered (byte tokenizer)."""
    if "prefix" in record:
        return [list(record[k].encode()) for k in ("prefix", "chosen", "rejected")]
    prompt = list(f"User: {record['prompt']}\n\nAssistant:".encode())
    return prompt, [*(" " + record["chosen"]).encode(), 0], [*(" " + record["rejected"]).encode(), 0]


@pytest.mark.parametrize("tune, sft_weight", [("full", 0.0), ("lora", 0.0), ("full", 0.7), ("lora", 0.7)])
def test_the_loss_and_its_gradients_equal_the_direct_formula(tune, sft_weight, tmp_path):
    """A Trainer's DPO step (weights moved away from the reference after the cache was made): the loss,
    every trained parameter's gradient and the metrics equal the direct formula, with the starting weights
    (full) or the base without adapters (LoRA) as the reference, with and without the SFT term."""
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    cfg = TrainConfig(
        data=str(data), objective="dpo", dpo_beta=BETA, dpo_sft_weight=sft_weight, tune=tune, n_layer=1,
        n_embd=32, head_size=16, batch_size=4, out=str(tmp_path / "out"), progress=False, seed=3,
    )  # fmt: skip
    with Trainer(cfg) as trainer:
        trainer.setup()
        model = trainer.parts.model
        if tune == "full":
            torch.manual_seed(3)  # the starting weights, built independently
            reference = new_model("7", 1, 32, 256, 16, torch.device("cpu"))
        else:
            reference = new_model("7", 1, 32, 256, 16, torch.device("cpu"))
            reference.load_state_dict(
                {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
            )
        trained = [(n, p) for n, p in trainer.parts.trained.named_parameters() if p.requires_grad]
        with torch.no_grad():
            for k, (_, p) in enumerate(trained):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * 0.05)
        out = trainer.objective.forward_backward(trainer)
        got = {n: p.grad.clone() for n, p in trained if p.grad is not None}
        trainer.parts.trained.zero_grad()
        pairs = [byte_tokens(r) for r in RECORDS]
        expected = direct_loss(model, reference, pairs, sft_weight)
        expected.backward()
        want = {n: p.grad.clone() for n, p in trained if p.grad is not None}
        with torch.no_grad():
            rewards = [
                [BETA * (direct_logp(model, p, c) - direct_logp(reference, p, c)) for c in (ch, rj)]
                for p, ch, rj in pairs
            ]
            nll = [-direct_logp(model, p, ch).item() / len(ch) for p, ch, _ in pairs]
    assert math.isclose(out.loss, expected.item(), rel_tol=1e-5)
    assert math.isclose(out.metrics["nll_chosen"], sum(nll) / 4, rel_tol=1e-5)
    assert set(got) == set(want) and len(want) > 0
    for name in want:
        assert_close_rel(got[name], want[name])
    margins = [float(c - r) for c, r in rewards]
    assert math.isclose(out.metrics["margin"], sum(margins) / 4, rel_tol=1e-4, abs_tol=1e-6)
    assert out.metrics["accuracy"] == sum(m > 0 for m in margins) / 4
    assert math.isclose(out.metrics["reward_chosen"], sum(float(c) for c, _ in rewards) / 4, rel_tol=1e-4)
    assert math.isclose(out.metrics["reward_rejected"], sum(float(r) for _, r in rewards) / 4, rel_tol=1e-4)
    assert out.tokens == sum(len(p) + len(c) + len(r) for p, c, r in pairs)


@pytest.mark.parametrize("version", ["7", "6", "5.2", "4"])
def test_one_prefill_per_pair_equals_each_sequence_alone(version):
    """pair_logprobs (the prompt once, both completions from copies of its state, right-padded) gives the
    summed log-probs of prompt + completion run as one sequence, and the same gradients (through the
    shared prefill too), for completions of unequal length and of one token."""
    torch.manual_seed(0)
    model = new_model(version, 2, 32, 256, 16, torch.device("cpu")).train()
    with torch.no_grad():  # away from the init, whose small values would hide mistakes
        for k, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * 0.05)
    pairs = [
        dpo.PreferencePair("a", [72, 101, 108], [1, 2, 3, 4, 5, 6], [7, 8]),
        dpo.PreferencePair("b", [9], [10], [11]),  # one-token prompt and completions
        dpo.PreferencePair("c", [65, 66, 67, 68, 69], [12], [13, 14, 15, 0]),
    ]
    weights = torch.tensor([[0.7, -1.3], [0.4, 2.0], [-0.9, 0.5]])
    params = list(model.parameters())
    model.zero_grad()
    got = torch.stack([dpo.pair_logprobs(model, p, 256, torch.device("cpu")) for p in pairs])  # (3, 2)
    (got * weights).sum().backward()
    got_grads = [None if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad()
    want = torch.stack(
        [torch.stack([direct_logp(model, p.prompt, c) for c in (p.chosen, p.rejected)]) for p in pairs]
    )
    (want * weights).sum().backward()
    assert_close_rel(got.detach(), want.detach())
    for p, g in zip(params, got_grads, strict=True):
        if p.grad is None:
            assert g is None or not g.any()
        else:
            assert_close_rel(g, p.grad)


def test_every_pair_is_seen_once_per_epoch():
    seen = [i for step in range(5) for i in dpo.step_pairs(10, step, 4, seed=1)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen == [i for step in range(5) for i in dpo.step_pairs(10, step, 4, seed=1)]


# ---------------------------------------------------------------------------------------------- runs


def synthetic_pairs(seed: int, n: int) -> list[dict]:
    """A preference the test builds: after a random lowercase prefix, the chosen completion ends with '!',
    the rejected one (the same letters) with '?'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prefix = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
        body = " " + "".join(rng.choice("ijklmnop") for _ in range(rng.randint(1, 3)))
        out.append({"prefix": prefix, "chosen": body + "!", "rejected": body + "?"})
    return out


def toy_run(tmp_path: Path, out: str, **settings) -> TrainConfig:
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(0, 24))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(1, 12))
    base = dict(
        data=str(data), val_data=str(val), objective="dpo", dpo_beta=0.5, n_layer=1, n_embd=32,
        head_size=16, batch_size=4, lr=1e-2, lr_final=1e-2, warmup_steps=0, out=str(tmp_path / out),
        progress=False, plot_every=0,
    )  # fmt: skip
    return TrainConfig(**{**base, **settings})


def entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_held_out_preference_accuracy_rises(tmp_path):
    """From a new byte model (policy = reference: margins 0, accuracy one half), 20 steps learn that '!'
    ends the preferred completion on held-out prefixes too."""
    result = train(toy_run(tmp_path, "toy", steps=20, eval_every=10))
    logged = entries(Path(result.model_path).parent)
    with Trainer(toy_run(tmp_path, "start", steps=1)) as trainer:
        trainer.setup()
        before = trainer.evaluate()
    assert before["val_accuracy"] == 0.5 and before["val_margin"] == 0.0
    assert math.isclose(before["val_loss"], math.log(2), rel_tol=1e-6)
    after = [e for e in logged if "val_accuracy" in e][-1]
    assert after["step"] == 20
    assert after["val_accuracy"] >= 0.9 and after["val_margin"] > 1.0, logged
    assert after["val_policy_accuracy"] > before["val_policy_accuracy"]
    assert after["val_loss"] < 0.5 * math.log(2)


def test_reference_log_probs_are_computed_once(tmp_path, monkeypatch):
    """Counted model forwards: the reference runs each pair once at setup (a prefill and a 2-row
    continuation), then each step runs only the policy (2 forwards a pair), and the final evaluation
    2 a validation pair."""
    calls = []
    original = RWKVModel.forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RWKVModel, "forward", counted)
    with Trainer(toy_run(tmp_path, "count", steps=3, eval_every=0)) as trainer:
        trainer.setup()
        assert len(calls) == 2 * (24 + 12) and not any(calls)  # the cache, without gradients
        assert trainer.objective.reference_forwards == 36
        trainer.train()
    assert len(calls) == 2 * 36 + 3 * 4 * 2 + 2 * 12
    assert trainer.objective.reference_forwards == 36


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_a_run_writes_its_outputs_and_resumes_on_the_same_curve(tune, tmp_path, monkeypatch):
    """model.pth, loss.png, metrics.jsonl with the DPO metrics and validation; a run killed after step 4
    (saved at step 3) and resumed (its reference cache computed again: the starting weights built again,
    or LoRA's base) logs the same steps and ends with the same weights as one that never stopped."""
    settings = dict(steps=6, save_every=3, eval_every=3, tune=tune)
    train(toy_run(tmp_path, "whole", **settings))
    out = tmp_path / "whole"
    logged = entries(out)
    steps = [e for e in logged if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("margin", "accuracy", "reward_chosen", "reward_rejected", "nll_chosen"):
        assert all(math.isfinite(e[key]) for e in steps), key
    assert [e["step"] for e in logged if "val_accuracy" in e] == [3, 6]
    assert (out / "model.pth").is_file() and (out / "loss.png").is_file()
    assert (out / "adapter.safetensors").is_file() == (tune == "lora")

    original = dpo.DPOObjective.forward_backward

    def dies_at_step_5(self, trainer):
        if trainer.step == 4:
            raise KeyboardInterrupt
        return original(self, trainer)

    monkeypatch.setattr(dpo.DPOObjective, "forward_backward", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(toy_run(tmp_path, "killed", **settings))
    killed = tmp_path / "killed"
    monkeypatch.setattr(dpo.DPOObjective, "forward_backward", original)
    train(toy_run(tmp_path, "killed", **settings, resume=True))
    drop = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in e.items() if k not in drop} for e in entries(killed)] == [
        {k: v for k, v in e.items() if k not in drop} for e in logged
    ]
    a = torch.load(killed / "model.pth", weights_only=True)
    b = torch.load(out / "model.pth", weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_only_the_adapters(tmp_path):
    """--tune lora: five steps change the adapters and nothing of the base model; the margin, 0 at the
    first step (adapters start at zero: policy = reference), grows."""
    with Trainer(toy_run(tmp_path, "lora", steps=5, tune="lora", lora_r=4, lora_alpha=8)) as trainer:
        trainer.setup()
        before = {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}
        trainer.train()
        after = trainer.parts.model.state_dict()
    lora = [k for k in before if "lora_" in k]
    assert lora and all(not torch.equal(before[k], after[k]) for k in lora if "lora_B" in k)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_" not in k)
    logged = [e for e in entries(tmp_path / "lora") if "accuracy" in e]
    assert logged[0]["accuracy"] == 0.5 and logged[0]["margin"] == 0.0
    assert logged[-1]["margin"] > 0.01 and logged[-1]["accuracy"] > 0.5, logged


def test_a_non_finite_step_is_skipped(tmp_path, monkeypatch):
    """A step whose loss is NaN (here: its reference log-probs poisoned) leaves the weights and the
    optimizer as they were and is logged as skipped; the next step trains."""
    with Trainer(toy_run(tmp_path, "nan", steps=2)) as trainer:
        trainer.setup()
        start = {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}
        good = trainer.objective.ref.clone()
        trainer.objective.ref[:] = math.nan
        first, _ = trainer.train_step(0.0)
        assert first == {"step": 1, "skipped": True, "loss": None, "lr": first["lr"]}
        now = trainer.parts.model.state_dict()
        assert all(torch.equal(start[k], now[k]) for k in start) and not trainer.optimizer.state
        trainer.objective.ref[:] = good
        second, _ = trainer.train_step(0.5)
    assert second["step"] == 2 and math.isfinite(second["loss"]) and second["accuracy"] == 0.5
    assert any(not torch.equal(start[k], v) for k, v in trainer.parts.model.state_dict().items())


def test_the_progress_bar_shows_the_dpo_metrics(tmp_path, capsys):
    train(toy_run(tmp_path, "bar", steps=2, progress=True))
    shown = capsys.readouterr().err
    for name in ("loss=", "margin=", "accuracy=", "reward_chosen=", "reward_rejected=", "nll_chosen="):
        assert name in shown, shown


def test_torchrun_two_processes_match_one(tmp_path):
    """2 processes (gloo, CPU): each computes half the reference cache and trains half of each step's
    pairs; the gradients summed over them give the single-process curve, validation and weights; rank 0
    alone writes metrics.jsonl."""
    # Completions with no tokens in common: with a shared body (as synthetic_pairs has) the two
    # completions' gradients cancel exactly on many weights, leaving ~1e-12 of rounding that the trainer's
    # AdamW (eps 1e-18, as RWKV-LM's) turns into +-lr steps whose signs depend on the summation order.
    rng = random.Random(2)
    pairs = [
        {
            "prefix": "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5))),
            "chosen": " " + "".join(rng.choice("ijklm") for _ in range(rng.randint(1, 3))) + "!",
            "rejected": " " + "".join(rng.choice("nopqr") for _ in range(rng.randint(1, 3))) + "?",
        }
        for _ in range(24)
    ]
    cfg = toy_run(tmp_path, "single", steps=4, eval_every=2)
    cfg.data = str(write_jsonl(tmp_path / "disjoint.jsonl", pairs))
    train(cfg)
    argv = [
        "--data", cfg.data, "--val-data", cfg.val_data, "--objective", "dpo", "--dpo-beta", "0.5",
        "--n-layer", "1", "--n-embd", "32", "--head-size", "16", "--batch-size", "4", "--lr", "1e-2",
        "--lr-final", "1e-2", "--warmup-steps", "0", "--steps", "4", "--eval-every", "2", "--no-progress",
        "--plot-every", "0", "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    done = torchrun_train(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    drop = ("tokens_per_s", "elapsed_s")
    one, two = entries(tmp_path / "single"), entries(tmp_path / "ddp")
    assert [e["step"] for e in two] == [e["step"] for e in one] and any("val_accuracy" in e for e in two)
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - set(drop):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, one, two)
    a = torch.load(tmp_path / "single" / "model.pth", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "model.pth", weights_only=True)
    # As in test_grpo: Adam turns the ~1e-7 differences of another summation order into weight
    # differences of a few 1e-6; a wrong gradient sum is off by ~lr = 1e-2 per step.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5, msg=k)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: a preference record must be a JSON object"),
        ('{"chosen": "a", "rejected": "b"}', "line 2: a preference record needs exactly one of 'prompt'"),
        ('{"prompt": "q", "rejected": "b"}', "line 2: missing 'chosen'"),
        ('{"prefix": "q", "chosen": "a"}', "line 2: missing 'rejected'"),
        ('{"prompt": "q", "chosen": 4, "rejected": "b"}', "line 2: 'chosen' must be a string, got int"),
        ('{"prompt": "q", "chosen": "a", "rejected": ""}', "line 2: 'rejected' is empty"),
        ('{"prompt": " ", "chosen": "a", "rejected": "b"}', "line 2: 'prompt' is empty"),
        (
            '{"prefix": "q", "chosen": "same", "rejected": "same"}',
            "line 2: 'chosen' and 'rejected' are the same",
        ),
    ],
)
def test_a_bad_record_stops_the_run_before_it_starts(tmp_path, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prefix": "ok", "chosen": "a", "rejected": "b"}\n' + line + "\n", encoding="utf-8")
    cfg = toy_run(tmp_path, "bad", steps=2)
    cfg.data = str(data)
    with pytest.raises(RwkvkitError, match=message) as info:
        train(cfg)
    assert "\n" not in str(info.value) and str(data) in str(info.value)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(fsdp=True), "--fsdp does not go with --objective dpo"),
        (dict(dpo_beta=0.0), "--dpo-beta must be > 0"),
        (dict(dpo_sft_weight=-1.0), "--dpo-sft-weight must be >= 0"),
        (dict(data="nowhere.jsonl"), "no such preference file"),
    ],
)
def test_bad_dpo_settings_are_one_line(tmp_path, settings, message):
    with pytest.raises(RwkvkitError, match=message) as info:
        train(toy_run(tmp_path, "bad", steps=2, **settings))
    assert "\n" not in str(info.value)
