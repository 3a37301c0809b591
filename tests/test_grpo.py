"""GRPO (``--objective grpo``): the loss and its gradients against a direct implementation of the formula,
rewards (functions, files, verifier scripts, failures), a toy verifiable task whose reward rises, a run's
outputs and its resume, and bad prompt files.

The direct implementation below is the textbook formula written out per completion: the prompt and the
completion run together from scratch (no state reuse, no padding), advantages from numpy, the clipped
ratio and the k3 KL per token in plain torch ops.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_training import torchrun_train

from rwkvkit import RwkvkitError
from rwkvkit.models import new_model
from rwkvkit.tokenizer import load_tokenizer
from rwkvkit.train import grpo
from rwkvkit.train.config import TrainConfig
from rwkvkit.train.grpo import (
    Completion,
    completion_logprobs,
    group_advantages,
    grpo_loss_terms,
    pad_completions,
)
from rwkvkit.train.rewards import Reward
from rwkvkit.train.trainer import Trainer, train

TEMPERATURE, CLIP, BETA = 0.8, 0.2, 0.1


def direct_token_logprobs(
    model, prompt: list[int], completion: list[int], temperature: float
) -> torch.Tensor:
    """log pi(c_t | prompt, c_<t) for each completion token, prompt + completion run from scratch."""
    full = torch.tensor([prompt + completion])  # (1, Tp + Tc)
    logits, _ = model(full)  # (1, Tp + Tc, V)
    rows = logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1]  # (Tc, V) predicting c_t
    logp = torch.log_softmax(rows.float() / temperature, dim=-1)
    return logp[torch.arange(len(completion)), torch.tensor(completion)]  # (Tc,)


def direct_advantages(rewards: list[float | None]) -> list[float | None]:
    scored = np.array([r for r in rewards if r is not None], dtype=np.float64)
    if scored.size < 2 or scored.std() == 0:
        return [None if r is None else 0.0 for r in rewards]
    mean, std = scored.mean(), scored.std(ddof=1)
    return [None if r is None else (r - mean) / (std + 1e-4) for r in rewards]


def direct_loss(model, prompts, completions, rewards, old=None, ref=None, ref_model=None) -> torch.Tensor:
    """Mean over scored completions of -(1/|o|) sum_t [min(rho A, clip(rho) A) - beta k3]."""
    per_completion = []
    for i, prompt in enumerate(prompts):
        for j, (c, a) in enumerate(zip(completions[i], direct_advantages(rewards[i]), strict=True)):
            if a is None:
                continue
            lp = direct_token_logprobs(model, prompt, c, TEMPERATURE)
            lp_old = lp.detach() if old is None else old[i][j]
            if ref is not None:
                lp_ref = ref[i][j]
            else:
                with torch.no_grad():
                    lp_ref = direct_token_logprobs(ref_model, prompt, c, TEMPERATURE)
            terms = []
            for t in range(len(c)):
                rho = torch.exp(lp[t] - lp_old[t])
                clipped = torch.clamp(rho, 1 - CLIP, 1 + CLIP)
                surrogate = torch.min(rho * a, clipped * a)
                k3 = torch.exp(lp_ref[t] - lp[t]) - (lp_ref[t] - lp[t]) - 1
                terms.append(surrogate - BETA * k3)
            per_completion.append(-torch.stack(terms).mean())
    return torch.stack(per_completion).mean()


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * max(scale, 1e-8), (a, b)


PROMPTS = [[72, 101, 108, 108, 111], [65, 66], [10, 20, 30, 40, 50, 60, 70]]
COMPLETIONS = [
    [[1, 2, 3], [4, 5], [6, 7, 8, 9, 0], [11]],
    [[12, 13, 14, 15], [16, 0], [17, 18, 19], [20]],  # equal rewards: advantage 0, KL only
    [[21], [22, 23, 24, 25, 26, 0], [27, 28], [29, 30, 31]],
]
REWARDS = [[1.0, 0.0, 0.5, None], [0.3, 0.3, 0.3, 0.3], [2.0, -1.0, None, 0.25]]


def perturbed(model, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.mark.parametrize("version", ["7", "6"])
def test_the_loss_and_its_gradients_equal_the_direct_formula(version):
    """Arbitrary old and reference log-probs (some ratios outside the clip range): the loss from state
    reuse + padding + grpo_loss_terms, normalised as forward_backward does, equals the direct one, and so
    does every parameter's gradient."""
    torch.manual_seed(0)
    model = perturbed(new_model(version, 2, 32, 256, 16, torch.device("cpu")).train(), 0.05, 1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        current = [
            [direct_token_logprobs(model, p, c, TEMPERATURE) for c in cs]
            for p, cs in zip(PROMPTS, COMPLETIONS, strict=True)
        ]
    old = [[lp + 0.3 * torch.randn(lp.shape, generator=g) for lp in row] for row in current]
    ref = [[lp + 0.5 * torch.randn(lp.shape, generator=g) for lp in row] for row in current]

    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    expected = direct_loss(model, PROMPTS, COMPLETIONS, REWARDS, old=old, ref=ref)
    expected.backward()
    want = [None if p.grad is None else p.grad.clone() for p in params]

    model.zero_grad()
    scored = sum(r is not None for row in REWARDS for r in row)
    total, clipped_tokens = 0.0, 0.0
    for i, prompt in enumerate(PROMPTS):
        kept = [j for j, a in enumerate(group_advantages(REWARDS[i])) if a is not None]
        adv = torch.tensor([group_advantages(REWARDS[i])[j] for j in kept])
        ids, mask = pad_completions([COMPLETIONS[i][j] for j in kept], torch.device("cpu"))
        old_t = torch.zeros(ids.shape)
        ref_t = torch.zeros(ids.shape)
        for row, j in enumerate(kept):
            old_t[row, : len(old[i][j])] = old[i][j]
            ref_t[row, : len(ref[i][j])] = ref[i][j]
        logp = completion_logprobs(model, prompt, ids, TEMPERATURE, 256, mask)
        loss, _, clipped = grpo_loss_terms(logp, old_t, ref_t, adv, mask, CLIP, BETA)
        (loss.sum() / scored).backward()
        total += float(loss.detach().sum()) / scored
        clipped_tokens += float(clipped.sum())
    assert clipped_tokens > 0  # the clip binds somewhere: its branch is tested too
    assert math.isclose(total, expected.item(), rel_tol=1e-5)
    for p, w in zip(params, want, strict=True):
        if w is None:
            assert p.grad is None or not p.grad.any()
        else:
            assert_close_rel(p.grad, w)


# ---------------------------------------------------------------------------------------------- a trainer


def write_prompts(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def lookup_reward_file(tmp_path: Path) -> Path:
    """A reward module: the reward of a completion is looked up in a table; two completions fail."""
    path = tmp_path / "lookup_reward.py"
    path.write_text(
        "import json, math\n"
        "TABLE = json.load(open(__file__[:-3] + '.json'))\n"
        "def reward(prompt, completion, **extra):\n"
        "    value = TABLE[prompt + '|' + completion]\n"
        "    if value == 'raise':\n"
        "        raise ValueError('no verdict')\n"
        "    return math.nan if value == 'nan' else value\n",
        encoding="utf-8",
    )
    return path


def fixed_rollouts(records_text: list[str], texts: dict[str, list[str]]):
    """A stand-in for grpo.rollout: each prompt's group is the fixed completions in ``texts``."""

    def fake(model, tokenizer, prompts, seeds, max_new_tokens, temperature):
        out = []
        for tokens in prompts:
            prompt_text = bytes(tokens).decode()
            out.append([Completion(list(t.encode()), t) for t in texts[prompt_text][: len(seeds[0])]])
        return out

    return fake


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_forward_backward_equals_the_direct_formula(tune, tmp_path, monkeypatch, caplog):
    """A Trainer's GRPO step on fixed completions (rollouts replaced): the loss, the gradient of every
    trained parameter and the metrics equal the direct formula with the reference model (the starting
    weights for full tuning, the base without adapters for LoRA); failures are skipped, counted and
    logged in one line naming the record."""
    prefixes = ["Hello", "AB", "xyz w"]
    data = write_prompts(tmp_path / "p.jsonl", [{"prefix": p} for p in prefixes])
    texts = {
        p: ["".join(chr(97 + (i * 7 + j * 3 + k) % 26) for k in range(1 + (i + j) % 4)) for j in range(4)]
        for i, p in enumerate(prefixes)
    }
    rewards = [[1.0, 0.0, 0.5, "raise"], [0.3, 0.3, 0.3, 0.3], [2.0, -1.0, "nan", 0.25]]
    table = {
        f"{p}|{t}": r
        for p, row_t, row_r in zip(prefixes, texts.values(), rewards, strict=True)
        for t, r in zip(row_t, row_r, strict=True)
    }
    reward_file = lookup_reward_file(tmp_path)
    reward_file.with_suffix(".json").write_text(json.dumps(table))
    cfg = TrainConfig(
        data=str(data), objective="grpo", reward=f"{reward_file}:reward", tune=tune, n_layer=2, n_embd=32,
        head_size=16, batch_size=3, group_size=4, temperature=TEMPERATURE, clip_eps=CLIP, kl_coef=BETA,
        out=str(tmp_path / "out"), progress=False, seed=3,
    )  # fmt: skip
    monkeypatch.setattr(grpo, "rollout", fixed_rollouts(prefixes, texts))
    monkeypatch.setattr(grpo, "step_prompts", lambda n, step, batch, seed: [0, 1, 2])
    with Trainer(cfg) as trainer:
        trainer.setup()
        model = trainer.parts.model
        reference = new_model("7", 2, 32, 256, 16, torch.device("cpu"))
        reference.load_state_dict(
            {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        )
        trained = [(n, p) for n, p in trainer.parts.trained.named_parameters() if p.requires_grad]
        with torch.no_grad():  # training has moved the policy away from the reference
            for k, (_, p) in enumerate(trained):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * 0.05)
        with caplog.at_level(logging.WARNING, logger="rwkvkit.train"):
            out = trainer.objective.forward_backward(trainer)
        got = {n: p.grad.clone() for n, p in trained if p.grad is not None}
        trainer.parts.trained.zero_grad()
        prompts = [list(p.encode()) for p in prefixes]
        completions = [[list(t.encode()) for t in texts[p]] for p in prefixes]
        scores = [[r if isinstance(r, float) else None for r in row] for row in rewards]
        expected = direct_loss(model, prompts, completions, scores, ref_model=reference)
        expected.backward()
        want = {n: p.grad.clone() for n, p in trained if p.grad is not None}
    assert math.isclose(out.loss, expected.item(), rel_tol=1e-5)
    assert set(got) == set(want) and len(want) > 0
    for name in want:
        assert_close_rel(got[name], want[name])
    if tune == "full":  # the end-of-text id is no input (only the padding could have leaked into it)
        assert not got["emb.weight"][0].any()
    assert out.metrics["reward_failures"] == 2
    scored = [r for row in scores for r in row if r is not None]
    assert math.isclose(out.metrics["reward"], sum(scored) / len(scored), rel_tol=1e-9)
    assert out.metrics["clip_fraction"] == 0.0 and out.metrics["kl"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert f"{data}: line 1, completion 3" in warnings[0] and "ValueError: no verdict" in warnings[0]
    assert f"{data}: line 3, completion 2" in warnings[1] and "not finite" in warnings[1]


# ---------------------------------------------------------------------------------------------- rewards


def test_rewards_from_a_module_a_file_and_a_verifier_script(tmp_path, monkeypatch):
    (tmp_path / "toy_rewards.py").write_text(
        "def count_a(prompt, completion, **extra):\n"
        "    return completion.count('a') + (10 if extra.get('answer') == completion else 0)\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    verifier = tmp_path / "verify.py"
    verifier.write_text(
        "import json, sys\n"
        "r = json.load(sys.stdin)\n"
        "print(float(r['completion'] == r['answer']) + len(r['prompt']))\n",
        encoding="utf-8",
    )
    by_name = Reward("toy_rewards:count_a")
    by_path = Reward(f"{tmp_path / 'toy_rewards.py'}:count_a")
    script = Reward(str(verifier))
    assert by_name.score("p", "banana", {}) == (3.0, None)
    assert by_path.score("p", "aa", {"answer": "aa"}) == (12.0, None)
    assert script.score("four", "42", {"answer": "42"}) == (5.0, None)
    assert script.score("four", "41", {"answer": "42"}) == (4.0, None)


def test_reward_failures_are_reported_not_scored(tmp_path):
    module = tmp_path / "bad_rewards.py"
    module.write_text(
        "import math\n"
        "def raises(prompt, completion):\n    raise KeyError('answer')\n"
        "def nan(prompt, completion):\n    return math.nan\n"
        "def text(prompt, completion):\n    return 'good'\n"
        "def flag(prompt, completion):\n    return completion == 'x'\n",
        encoding="utf-8",
    )
    problems = {name: Reward(f"{module}:{name}").score("p", "x", {}) for name in ("raises", "nan", "text")}
    assert problems["raises"][0] is None and "raised KeyError" in problems["raises"][1]
    assert problems["nan"][0] is None and "not finite" in problems["nan"][1]
    assert problems["text"][0] is None and "not a number" in problems["text"][1]
    assert Reward(f"{module}:flag").score("p", "x", {}) == (1.0, None)  # a bool counts as 0 / 1
    assert Reward(f"{module}:raises").score("p", "x", {"answer": 1})[0] is None  # unexpected field: fails
    failing = tmp_path / "failing.py"
    failing.write_text("import sys\nsys.exit('cannot verify')\n", encoding="utf-8")
    value, problem = Reward(str(failing)).score("p", "x", {})
    assert value is None and "status 1" in problem and "cannot verify" in problem
    chatty = tmp_path / "chatty.py"
    chatty.write_text("print('yes')\n", encoding="utf-8")
    value, problem = Reward(str(chatty)).score("p", "x", {})
    assert value is None and "'yes', not a number" in problem


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "needs --reward"),
        ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
        ("nowhere/rewards.py:f", "no such file"),
        ("just_a_word", "expected module:function"),
        ("math:no_function_here", "has no function no_function_here"),
    ],
)
def test_a_bad_reward_spec_is_one_line(spec, message):
    with pytest.raises(RwkvkitError, match=message) as info:
        Reward(spec)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- runs

TOY_REWARD = (
    "def fraction_of_e(prompt, completion):\n"
    "    return sum(c == 'e' for c in completion) / max(len(completion), 1)\n"
)


def toy_run(tmp_path: Path, out: str, **settings) -> TrainConfig:
    """The toy verifiable task: a new 1-layer byte model; the reward is the fraction of 'e' bytes."""
    prefixes = ["The ", "And ", "What ", "KING: ", "O ", "Then "]
    data = write_prompts(tmp_path / "prompts.jsonl", [{"prefix": p} for p in prefixes])
    val = write_prompts(tmp_path / "val.jsonl", [{"prefix": "Now "}, {"prefix": "She "}])
    reward = tmp_path / "toy_reward.py"
    reward.write_text(TOY_REWARD, encoding="utf-8")
    base = dict(
        data=str(data), val_data=str(val), objective="grpo", reward=f"{reward}:fraction_of_e", n_layer=1,
        n_embd=32, head_size=16, batch_size=4, group_size=8, max_new_tokens=8, lr=1e-2, lr_final=1e-2,
        warmup_steps=0, kl_coef=0.0, out=str(tmp_path / out), progress=False, plot_every=0,
    )  # fmt: skip
    return TrainConfig(**{**base, **settings})


def entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_mean_reward_rises_on_a_toy_task(tmp_path):
    """From a random byte model (about 1 byte in 256 is an 'e'), 40 GRPO steps make most bytes 'e'."""
    result = train(toy_run(tmp_path, "toy", steps=40))
    rewards = [e["reward"] for e in entries(Path(result.model_path).parent) if "reward" in e]
    assert len(rewards) == 40
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.1 and last > first + 0.4, rewards
    # the end-of-text id is never an input: its embedding only decays (AdamW's weight decay, 0.1 * lr)
    torch.manual_seed(0)
    start = new_model("7", 1, 32, 256, 16, torch.device("cpu")).emb.weight[0]
    end = torch.load(result.model_path, weights_only=True)["emb.weight"][0]
    assert torch.allclose(end, start * (1 - 0.1 * 1e-2) ** 40, rtol=1e-5, atol=0)


def test_a_run_writes_its_outputs_and_resumes_on_the_same_curve(tmp_path, monkeypatch):
    """model.pth, metrics.jsonl with the GRPO metrics, val_reward; a run that dies after step 4 (saved at
    step 3) and is resumed logs the same steps and ends with the same weights as one that never stopped."""
    settings = dict(steps=6, save_every=3, eval_every=3, kl_coef=0.05, plot_every=3)
    whole = train(toy_run(tmp_path, "whole", **settings))
    out = tmp_path / "whole"
    logged = entries(out)
    steps = [e for e in logged if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("reward", "reward_std", "kl", "clip_fraction", "reward_failures", "completion_len"):
        assert all(math.isfinite(e[key]) for e in steps), key
    assert [e["step"] for e in logged if "val_reward" in e] == [3, 6]
    assert (out / "model.pth").is_file() and (out / "loss.png").is_file()
    assert Path(whole.model_path) == out / "model.pth"

    original = grpo.GRPOObjective.forward_backward

    def dies_at_step_5(self, trainer):
        if trainer.step == 4:
            raise KeyboardInterrupt  # as a kill: nothing after step 4 is written
        return original(self, trainer)

    monkeypatch.setattr(grpo.GRPOObjective, "forward_backward", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(toy_run(tmp_path, "killed", **settings))
    killed = tmp_path / "killed"
    assert [e["step"] for e in entries(killed) if "loss" in e] == [1, 2, 3, 4]
    monkeypatch.setattr(grpo.GRPOObjective, "forward_backward", original)
    train(toy_run(tmp_path, "killed", **settings, resume=True))
    drop = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in e.items() if k not in drop} for e in entries(killed)] == [
        {k: v for k, v in e.items() if k not in drop} for e in logged
    ]
    a = torch.load(killed / "model.pth", weights_only=True)
    b = torch.load(out / "model.pth", weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_step_is_skipped(tmp_path):
    """A step whose loss is NaN (here: the reference model's weights poisoned, so the KL term is NaN)
    leaves the weights and the optimizer as they were and is logged as skipped; the next step trains."""
    with Trainer(toy_run(tmp_path, "nan", steps=2, kl_coef=0.1)) as trainer:
        trainer.setup()
        start = {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}
        head = trainer.objective.reference.head.weight
        good = head.clone()
        head.data.fill_(math.nan)
        first, _ = trainer.train_step(0.0)
        assert first == {"step": 1, "skipped": True, "loss": None, "lr": first["lr"]}
        now = trainer.parts.model.state_dict()
        assert all(torch.equal(start[k], now[k]) for k in start) and not trainer.optimizer.state
        head.data.copy_(good)
        second, _ = trainer.train_step(0.5)
    assert second["step"] == 2 and math.isfinite(second["loss"]) and math.isfinite(second["kl"])
    assert any(not torch.equal(start[k], v) for k, v in trainer.parts.model.state_dict().items())


def test_torchrun_two_processes_match_one(tmp_path):
    """2 processes (gloo, CPU) each roll out and train half the prompts; the gradients summed over them
    give the single-process curve and weights; rank 0 alone writes metrics.jsonl."""
    cfg = toy_run(tmp_path, "single", steps=4, kl_coef=0.05, val_data="")
    train(cfg)
    argv = [
        "--data", cfg.data, "--objective", "grpo", "--reward", cfg.reward, "--n-layer", "1", "--n-embd", "32",
        "--head-size", "16", "--batch-size", "4", "--group-size", "8", "--max-new-tokens", "8",
        "--lr", "1e-2", "--lr-final", "1e-2", "--warmup-steps", "0", "--kl-coef", "0.05", "--steps", "4",
        "--no-progress", "--plot-every", "0", "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    done = torchrun_train(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    drop = ("tokens_per_s", "elapsed_s")
    one, two = entries(tmp_path / "single"), entries(tmp_path / "ddp")
    assert [e["step"] for e in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        for key in a.keys() - set(drop):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    a = torch.load(tmp_path / "single" / "model.pth", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "model.pth", weights_only=True)
    # Two processes sum their gradients in another order than one process does (and pytest's process may
    # run more threads than the workers), and Adam turns those ~1e-7 relative differences into weight
    # differences of a few 1e-6 after 4 steps at lr 1e-2 (seen: 3.6e-6 with 2 threads). A wrong gradient
    # sum moves weights by ~lr = 1e-2 per step, far outside this tolerance.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5, msg=k)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: a prompt record must be a JSON object"),
        ('{"answer": "4"}', "line 2: a prompt record needs exactly one of 'prompt'"),
        ('{"prompt": "a", "prefix": "b"}', "line 2: a prompt record needs exactly one of 'prompt'"),
        ('{"prompt": 42}', "line 2: 'prompt' must be a string"),
        ('{"prompt": "  "}', "line 2: 'prompt' is empty"),
        ('{"prefix": ""}', "line 2: 'prefix' is empty"),
        ('{"prompt": "2+2?", "completion": "4"}', "line 2: GRPO prompts have no 'completion'"),
    ],
)
def test_a_bad_prompt_record_stops_the_run_before_it_starts(tmp_path, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    cfg = toy_run(tmp_path, "bad", steps=2)
    cfg.data = str(data)
    with pytest.raises(RwkvkitError, match=message) as info:
        train(cfg)
    assert "\n" not in str(info.value) and str(data) in str(info.value)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(group_size=1), "--group-size must be at least 2"),
        (dict(temperature=0.0), "--temperature must be > 0"),
        (dict(max_new_tokens=0), "--max-new-tokens must be positive"),
        (dict(clip_eps=0.0), "--clip-eps > 0"),
        (dict(fsdp=True), "--fsdp does not go with --objective grpo"),
        (dict(reward=""), "needs --reward"),
        (dict(data="nowhere.jsonl"), "no such prompts file"),
    ],
)
def test_bad_grpo_settings_are_one_line(tmp_path, settings, message):
    with pytest.raises(RwkvkitError, match=message) as info:
        train(toy_run(tmp_path, "bad", steps=2, **settings))
    assert "\n" not in str(info.value)


def test_chat_prompts_are_rendered_as_sft_renders_them():
    tokenizer = load_tokenizer("byte")
    assert bytes(grpo.prompt_tokens(tokenizer, "2+2?", chat=True)) == b"User: 2+2?\n\nAssistant:"
    assert bytes(grpo.prompt_tokens(tokenizer, "Once", chat=False)) == b"Once"
