"""GRPO, ``rwkvkit train --objective grpo``: reinforcement learning from rewards on sampled completions.

Data: a ``.jsonl`` file of prompt records, one JSON object a line: ``{"prompt": "...", ...}`` is a user
turn rendered in the chat format chat SFT trains (``User: {prompt}\\n\\nAssistant:``, the segments of
:func:`rwkvkit.train.chat_data.render_segments`); ``{"prefix": "...", ...}`` is raw text the model
continues as is (for base models). Every other field (``answer``, ...) goes to the reward with the
completion (:mod:`rwkvkit.train.rewards`). A bad record stops the run before it starts.

One optimizer step (a pure function of (seed, step) and the weights, so a resumed run repeats its curve):

1. ``batch_size`` prompt records are drawn (with replacement) by (seed, step), split over processes;
2. each prompt gets ``group_size`` completions from the current weights through rwkvkit's batched
   :class:`~rwkvkit.infer.engine.Engine` (``submit_group``: ONE prefill of the prompt, its state copied
   for the group), at ``temperature``, at most ``max_new_tokens`` each, ending at the end-of-text id
   (which is then part of the completion); each completion's random stream is seeded by
   (seed, step, prompt slot, completion);
3. the reward scores each completion; a failure (see :mod:`rwkvkit.train.rewards`) is logged in one line
   naming the record, counted (``reward_failures``) and the completion is left out of everything below;
4. advantages per group: ``A_i = (r_i - mean_g) / (std_g + 1e-4)`` over the group's scored completions
   (std with Bessel's correction); a group with fewer than two scored completions or with equal rewards
   has ``A = 0`` (it still carries the KL term);
5. the loss, recomputed with gradients (the prompt run once, the group's completions from its state)::

       ratio_t = exp(logp_t - logp_old_t)
       L_i     = -(1/|o_i|) sum_t [ min(ratio_t A_i, clip(ratio_t, 1-eps, 1+eps) A_i) - kl_coef * k3_t ]
       k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (an unbiased KL(policy || reference))
       loss    = mean of L_i over every scored completion of the step (all processes)

   i.e. averaged per completion over its tokens, then over completions. ``logp`` are the log-probabilities
   of the sampling distribution: ``log_softmax(logits / temperature)`` over the tokenizer's vocabulary.
   Each rollout batch is used for one update, so ``logp_old`` is the policy of this step (``logp``
   detached): the ratio is 1 in value, its gradient is that of ``logp``, and the clip does not bind
   (``clip_fraction`` reports how often it does; :func:`grpo_loss_terms` takes any ``logp_old``).

Reference model (``kl_coef > 0``): for ``--tune lora`` the base model itself (peft's adapters disabled,
no extra memory); otherwise a frozen copy of the starting weights (``--init-from`` read again, or the same
initialisation by the seed), which doubles the weights' memory. ``kl_coef 0`` keeps no reference.

Several processes (torchrun): each rolls out and trains its share of the prompts and the gradients are
summed over processes once per step here (one all-reduce), not by DDP's hooks, since a step runs the
model a different number of times on each process. ``--fsdp`` is refused: the rollouts run whole
(unsharded) forwards one process at a time. No L2Wrap (an LM-loss regulariser).

Metrics per step: ``reward`` (mean), ``reward_std``, ``kl`` (mean k3, normalised as the loss),
``clip_fraction``, ``reward_failures``, ``completion_len`` (mean tokens); the bar shows reward and kl.
With ``--val-data`` (prompts too), ``val_reward``: the mean reward of ``group_size`` completions per
validation prompt sampled with a fixed seed (the same draws at every evaluation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_format import normalize_message
from rwkvkit.infer.engine import Engine, FinishEvent
from rwkvkit.infer.sampling import SamplingParams
from rwkvkit.train import distributed
from rwkvkit.train.chat_data import EOT_ID, load_jsonl_records, render_segments
from rwkvkit.train.objective import Objective, StepOutput
from rwkvkit.train.rewards import Reward
from rwkvkit.train.trainer import Trainer, build_model

log = logging.getLogger("rwkvkit.train")

ADV_EPS = 1e-4  # added to the group's reward std before dividing
VAL_STEP = -1  # the "step" of the validation draws' seeds (no training step has it)
MAX_ENGINE_BATCH = 256  # most sequences the rollout engine decodes together


# ---------------------------------------------------------------------------------------------- data


@dataclass
class PromptRecord:
    """One prompt of the prompts file."""

    where: str  # "FILE: line N", for messages
    text: str  # the prompt as the reward sees it (the record's prompt or prefix)
    tokens: list[int]  # what the model reads before its completion
    extra: dict[str, Any] = field(default_factory=dict)  # the record's other fields, for the reward


def prompt_tokens(tokenizer, text: str, chat: bool) -> list[int]:
    """The tokens of a prompt: raw text as is, or a user turn in the chat format up to ``Assistant:``
    (each segment tokenized on its own, as chat SFT data is)."""
    if not chat:
        return list(tokenizer.encode(text))
    segments = render_segments([("user", text), ("assistant", "")])[:-1]  # drop the (empty) reply
    return [t for piece, _ in segments for t in tokenizer.encode(piece)]


def load_prompts(path: str | Path, tokenizer) -> list[PromptRecord]:
    """The records of a prompts ``.jsonl`` file (see the module docstring); RwkvkitError naming the first
    bad record."""
    return load_jsonl_records(
        path, "prompts", "prompt records", lambda r, where: _prompt_record(r, where, tokenizer)
    )


def _prompt_record(record: Any, where: str, tokenizer) -> PromptRecord:
    if not isinstance(record, dict):
        raise RwkvkitError(f"{where}: a prompt record must be a JSON object with 'prompt' or 'prefix'")
    kinds = [key for key in ("prompt", "prefix") if key in record]
    if len(kinds) != 1:
        raise RwkvkitError(
            f"{where}: a prompt record needs exactly one of 'prompt' (chat) or 'prefix' (raw text)"
        )
    key = kinds[0]
    text = record[key]
    if not isinstance(text, str):
        raise RwkvkitError(f"{where}: '{key}' must be a string, got {type(text).__name__}")
    if key == "prompt":
        text = normalize_message(text)
    if not text:
        raise RwkvkitError(f"{where}: '{key}' is empty")
    if "completion" in record:
        raise RwkvkitError(f"{where}: GRPO prompts have no 'completion' (the model samples it)")
    extra = {k: v for k, v in record.items() if k != key}
    return PromptRecord(where, text, prompt_tokens(tokenizer, text, chat=key == "prompt"), extra)


def step_prompts(n_records: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The record indices of step ``step``'s global batch (drawn with replacement), by (seed, step)."""
    rng = np.random.default_rng([seed, step, 0x6790])
    return rng.integers(0, n_records, size=batch_size).tolist()


def completion_seed(seed: int, step: int, slot: int, j: int) -> int:
    """The sampling seed of completion ``j`` of the prompt in global slot ``slot`` of step ``step``."""
    return int(np.random.default_rng([seed, step + 1, slot, j]).integers(0, 2**62))


# ---------------------------------------------------------------------------------------------- rollouts


@dataclass
class Completion:
    tokens: list[int]  # the sampled tokens trained on (then the end-of-text id, if the completion stopped)
    text: str  # what the reward sees (the generated text, no end-of-text)
    reward: float | None = None  # None: not scored (a reward failure)


@torch.no_grad()
def rollout(
    model,
    tokenizer,
    prompts: list[list[int]],
    seeds: list[list[int]],
    max_new_tokens: int,
    temperature: float,
) -> list[list[Completion]]:
    """``len(seeds[i])`` sampled completions of each prompt through the engine (one prefill per prompt,
    its state copied for the group), each from its own seeded random stream."""
    group = max(len(s) for s in seeds)
    engine = Engine(
        model,
        tokenizer,
        max_batch=max(group, min(MAX_ENGINE_BATCH, sum(len(s) for s in seeds))),
        max_waiting=len(prompts) + 1,
    )
    finished: list[list[FinishEvent | None]] = [[None] * len(s) for s in seeds]

    def collector(i: int, j: int):
        def on_event(event) -> None:
            if isinstance(event, FinishEvent):
                finished[i][j] = event

        return on_event

    was_training = model.training
    model.eval()  # no LoRA dropout in the rollouts
    try:
        for i, (tokens, group_seeds) in enumerate(zip(prompts, seeds, strict=True)):
            engine.submit_group(
                tokens,
                [SamplingParams(temperature=temperature, seed=s) for s in group_seeds],
                max_tokens=max_new_tokens,
                stop_tokens=[EOT_ID],
                on_event=[collector(i, j) for j in range(len(group_seeds))],
            )
        engine.run_until_idle()
    finally:
        model.train(was_training)
    out = []
    for events in finished:
        row = []
        for event in events:
            if event is None or event.reason not in ("stop", "length"):
                raise RwkvkitError(f"a rollout failed: {getattr(event, 'error', None) or 'no result'}")
            stopped = event.reason == "stop" and isinstance(event.stop, int)
            row.append(Completion(list(event.tokens) + ([event.stop] if stopped else []), event.text))
        out.append(row)
    return out


def group_advantages(rewards: list[float | None]) -> list[float | None]:
    """(r - mean) / (std + eps) over the group's rewards that are not None (std with Bessel's correction);
    0 for all when fewer than two are scored or they are all equal; None stays None."""
    scored = [r for r in rewards if r is not None]
    if len(scored) < 2:
        return [None if r is None else 0.0 for r in rewards]
    mean = sum(scored) / len(scored)
    std = math.sqrt(sum((r - mean) ** 2 for r in scored) / (len(scored) - 1))
    if std == 0.0:
        return [None if r is None else 0.0 for r in rewards]
    return [None if r is None else (r - mean) / (std + ADV_EPS) for r in rewards]


# ---------------------------------------------------------------------------------------------- the loss


def pad_completions(completions: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions as a right-padded (G, L) LongTensor (padded with the end-of-text id) and its 0/1 mask."""
    longest = max(len(c) for c in completions)
    ids = torch.full((len(completions), longest), EOT_ID, dtype=torch.long)
    mask = torch.zeros(len(completions), longest)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1.0
    return ids.to(device), mask.to(device)


def completion_logprobs(
    model, prompt: list[int], completions: torch.Tensor, temperature: float, vocab: int, mask: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities (G, L) of each completion token of ``completions`` (G, L) after ``prompt`` under
    ``log_softmax(logits / temperature)`` over the first ``vocab`` ids: the prompt runs once and the G
    completions continue from copies of its state (gradients flow through the shared prompt).

    ``mask`` (G, L) marks each completion's tokens. An input whose next position is padding (a
    completion's last token, the padding itself) changes no output that counts, but the chunked WKV
    backward leaks rounding-level gradients (~1e-13) into it, which AdamW would turn into full-size steps
    of e.g. the end-of-text embedding; such inputs are replaced by the prompt's last token, a real input
    whose own gradient dwarfs them."""
    device = completions.device
    G, L = completions.shape
    x = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, Tp)
    prompt_logits, state = model(x)  # (1, Tp, V)
    first = prompt_logits[:, -1:].expand(G, 1, -1)  # (G, 1, V) predicts each completion's first token
    if L > 1:
        inputs = completions[:, :-1].masked_fill(mask[:, 1:] == 0, prompt[-1])  # (G, L - 1)
        rest, _ = model(inputs, state.select([0] * G))  # (G, L - 1, V)
        logits = torch.cat([first, rest], dim=1)  # (G, L, V)
    else:
        logits = first
    logp = torch.log_softmax(logits[..., :vocab].float() / temperature, dim=-1)  # (G, L, V')
    return logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1)  # (G, L)


def grpo_loss_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per completion: (the loss L_i (G,), its mean k3 KL (G,), its clipped tokens (G,)) for log-probs
    (G, L), advantages (G,) and the token mask (G, L) (see the module docstring for the formula).
    ``ref_logp`` None: no KL term (and the KL reported is 0)."""
    ratio = torch.exp(logp - old_logp)  # (G, L)
    adv = advantages.unsqueeze(1)  # (G, 1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)  # (G, L)
    if ref_logp is not None:
        diff = ref_logp - logp
        k3 = torch.exp(diff) - diff - 1  # (G, L)
    else:
        k3 = torch.zeros_like(logp)
    per_token = -(surrogate - kl_coef * k3)  # (G, L)
    lengths = mask.sum(dim=1)  # (G,)
    loss = (per_token * mask).sum(dim=1) / lengths  # (G,)
    kl = (k3.detach() * mask).sum(dim=1) / lengths  # (G,)
    outside = ((ratio.detach() < 1 - clip_eps) | (ratio.detach() > 1 + clip_eps)).float()
    clipped = (outside * mask).sum(dim=1)  # (G,)
    return loss, kl, clipped


# ---------------------------------------------------------------------------------------------- the objective


class GRPOObjective(Objective):
    """``--objective grpo`` (see the module docstring)."""

    name = "grpo"
    bar_metrics = ("reward", "kl")

    def load_data(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        if cfg.fsdp:
            raise RwkvkitError(
                "--fsdp does not go with --objective grpo: the rollouts run unsharded forwards on each "
                "process alone (use DDP, the default)"
            )
        if cfg.group_size < 2:
            raise RwkvkitError(
                f"--group-size must be at least 2 (advantages compare a group), got {cfg.group_size}"
            )
        if cfg.max_new_tokens < 1:
            raise RwkvkitError(f"--max-new-tokens must be positive, got {cfg.max_new_tokens}")
        if not cfg.temperature > 0:
            raise RwkvkitError(f"--temperature must be > 0 for GRPO's sampled groups, got {cfg.temperature}")
        if not cfg.kl_coef >= 0 or not cfg.clip_eps > 0:
            raise RwkvkitError("--kl-coef must be >= 0 and --clip-eps > 0")
        self.reward = Reward(cfg.reward)
        self.records = load_prompts(cfg.data, trainer.tokenizer)
        self.val_records = load_prompts(cfg.val_data, trainer.tokenizer) if cfg.val_data else []
        self.has_validation = bool(self.val_records)
        self.vocab = min(int(trainer.tokenizer.vocab_size), trainer.vocab_size)

    def setup(self, trainer: Trainer) -> None:
        """The reference model (for kl_coef > 0): LoRA's base, or the starting weights built again."""
        cfg = trainer.cfg
        self.reference = None
        if cfg.kl_coef == 0 or cfg.tune == "lora":
            return
        with torch.random.fork_rng(devices=[]):  # the run's RNG state (restored on resume) stays as it is
            torch.manual_seed(cfg.seed)  # as Trainer._build: the same starting weights
            reference = build_model(cfg, trainer.vocab_size, trainer.world.device)
        self.reference = reference.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------ a step

    def _score(self, records: list[PromptRecord], groups: list[list[Completion]], step: int) -> int:
        """Score every completion in place; returns the failures (each logged in one line)."""
        failures = 0
        for record, group in zip(records, groups, strict=True):
            for j, completion in enumerate(group):
                completion.reward, problem = self.reward.score(record.text, completion.text, record.extra)
                if completion.reward is None:
                    failures += 1
                    log.warning("step %d: %s, completion %d: %s; skipped", step, record.where, j, problem)
        return failures

    def _ref_logprobs(
        self, trainer: Trainer, prompt: list[int], ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        cfg = trainer.cfg
        if cfg.kl_coef == 0:
            return None
        with torch.no_grad(), trainer.autocast:
            if self.reference is not None:
                return completion_logprobs(self.reference, prompt, ids, cfg.temperature, self.vocab, mask)
            with trainer.parts.trained.disable_adapter():  # LoRA: the base model is the reference
                return completion_logprobs(
                    trainer.parts.model, prompt, ids, cfg.temperature, self.vocab, mask
                )

    def forward_backward(self, trainer: Trainer) -> StepOutput:
        cfg, world, step = trainer.cfg, trainer.world, trainer.step
        slots = range(world.rank * trainer.local_rows, (world.rank + 1) * trainer.local_rows)
        chosen = step_prompts(len(self.records), step, cfg.batch_size, cfg.seed)
        records = [self.records[chosen[s]] for s in slots]
        seeds = [[completion_seed(cfg.seed, step, s, j) for j in range(cfg.group_size)] for s in slots]
        groups = rollout(
            trainer.parts.model,
            trainer.tokenizer,
            [r.tokens for r in records],
            seeds,
            cfg.max_new_tokens,
            cfg.temperature,
        )
        failures = self._score(records, groups, step + 1)
        rewards = [c.reward for g in groups for c in g if c.reward is not None]
        counts = [len(rewards), sum(rewards), sum(r * r for r in rewards), failures]
        first = distributed.sum_values(counts, world)
        scored, reward_sum, reward_sq, failures = first
        weight = 1.0 / scored if scored else float("nan")  # nothing scored: the step is skipped
        totals = torch.zeros(5, dtype=torch.float64)  # loss, kl, clipped tokens, completion tokens, tokens
        for record, group in zip(records, groups, strict=True):
            kept = [
                (c, a)
                for c, a in zip(group, group_advantages([c.reward for c in group]), strict=True)
                if a is not None
            ]
            if not kept:
                continue
            ids, mask = pad_completions([c.tokens for c, _ in kept], world.device)  # (G, L) each
            advantages = torch.tensor([a for _, a in kept], device=world.device)  # (G,)
            ref_logp = self._ref_logprobs(trainer, record.tokens, ids, mask)
            with trainer.autocast:
                logp = completion_logprobs(
                    trainer.parts.model, record.tokens, ids, cfg.temperature, self.vocab, mask
                )
            loss, kl, clipped = grpo_loss_terms(
                logp, logp.detach(), ref_logp, advantages, mask, cfg.clip_eps, cfg.kl_coef
            )
            if scored:
                (loss.sum() * weight).backward()
            n_tokens = float(mask.sum())
            totals += torch.tensor(
                [
                    float(loss.detach().sum()),
                    float(kl.sum()),
                    float(clipped.sum()),
                    n_tokens,
                    n_tokens + len(record.tokens),
                ],
                dtype=torch.float64,
            )
        distributed.all_reduce_gradients(trainer.parts.trained, world, mean=False)
        loss_sum, kl_sum, clipped, completion_tokens, tokens = distributed.sum_values(totals.tolist(), world)
        mean = reward_sum / scored if scored else float("nan")
        var = max(reward_sq / scored - mean * mean, 0.0) if scored else float("nan")
        metrics = {
            "reward": mean,
            "reward_std": math.sqrt(var),
            "reward_failures": failures,
            "completion_len": completion_tokens / scored if scored else float("nan"),
            "clip_fraction": clipped / completion_tokens if completion_tokens else 0.0,
        }
        if cfg.kl_coef > 0:
            metrics["kl"] = kl_sum / scored if scored else float("nan")
        return StepOutput(loss_sum * weight, int(tokens), metrics)

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """``val_reward``: the mean reward of ``group_size`` completions per validation prompt, drawn with
        seeds that do not change between evaluations (failures are left out)."""
        if not self.val_records:
            return {}
        cfg, world = trainer.cfg, trainer.world
        slots = range(world.rank, len(self.val_records), world.world_size)
        records = [self.val_records[s] for s in slots]
        seeds = [[completion_seed(cfg.seed, VAL_STEP, s, j) for j in range(cfg.group_size)] for s in slots]
        total, count = 0.0, 0
        if records:
            groups = rollout(
                trainer.parts.model, trainer.tokenizer, [r.tokens for r in records], seeds,
                cfg.max_new_tokens, cfg.temperature,
            )  # fmt: skip
            for record, group in zip(records, groups, strict=True):
                for completion in group:
                    value, _ = self.reward.score(record.text, completion.text, record.extra)
                    if value is not None:
                        total, count = total + value, count + 1
        total, count = distributed.sum_values([total, count], world)
        return {"val_reward": total / count} if count else {}
