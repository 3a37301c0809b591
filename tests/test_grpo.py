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

from rwkvkit.models import new_model
from rwkvkit.train import grpo
from rwkvkit.train.config import TrainConfig
from rwkvkit.train.grpo import (
    Completion,
    completion_logprobs,
    group_advantages,
    grpo_loss_terms,
    pad_completions,
)
from rwkvkit.train.trainer import Trainer

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
        logp = completion_logprobs(model, prompt, ids, TEMPERATURE, 256)
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
    assert out.metrics["reward_failures"] == 2
    scored = [r for row in scores for r in row if r is not None]
    assert math.isclose(out.metrics["reward"], sum(scored) / len(scored), rel_tol=1e-9)
    assert out.metrics["clip_fraction"] == 0.0 and out.metrics["kl"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert f"{data}: line 1, completion 3" in warnings[0] and "ValueError: no verdict" in warnings[0]
    assert f"{data}: line 3, completion 2" in warnings[1] and "not finite" in warnings[1]
