"""DPO, ``rwkvkit train --objective dpo``: preference tuning on pairs of completions of one prompt.

Data: a ``.jsonl`` file of preference pairs, one JSON object a line, with ``chosen`` and ``rejected`` (the
better and the worse completion, strings) and one of ``prompt`` or ``prefix``:

- ``{"prompt": "...", "chosen": "...", "rejected": "..."}``: a user turn in the chat format chat SFT
  trains (``User: {prompt}\\n\\nAssistant:``) and each completion as SFT renders a reply
  (``" " + reply``, then the end-of-text id);
- ``{"prefix": "...", "chosen": "...", "rejected": "..."}``: raw text (base models); each completion is
  its text as is, no end-of-text id.

A bad record (not JSON, not an object, a missing or non-string field, an empty completion, ``chosen``
equal to ``rejected``) is one line naming ``FILE: line N`` and the problem; the run does not start.
Completions are not cut to ``--ctx-len`` (the whole pair is one forward).

The loss of pair i, with ``logp`` the summed log-probability of a completion's tokens after the prompt::

    reward_chosen_i   = beta * (logp_policy(chosen_i)   - logp_ref(chosen_i))
    reward_rejected_i = beta * (logp_policy(rejected_i) - logp_ref(rejected_i))
    margin_i          = reward_chosen_i - reward_rejected_i
    loss              = mean over the step's pairs (all processes) of
                        -log sigmoid(margin_i) + sft_weight * nll_chosen_i
    nll_chosen_i      = -logp_policy(chosen_i) / len(chosen_i)     (mean per token)

``--dpo-sft-weight`` (default 0: plain DPO) adds the language-model loss on the chosen completion, as
TRL's ``rpo_alpha``: plain DPO can raise the margin while lowering the likelihood of both completions,
and on the demo model that cost language-model quality (benchmarks/RESULTS.md).

Per pair the prompt runs ONCE (its last logit predicts each completion's first token) and the two
completions continue from copies of its state as a 2-row batch (right-padded, masked): the gradient flows
through the shared prefill. The step's ``batch_size`` pairs are a pure function of (seed, step): the
global pair index ``step * batch_size + k`` runs through one seeded permutation of the pairs per epoch,
split over processes.

Reference model: its log-probabilities of every pair (training and validation) are computed ONCE, at
setup, without gradients, and kept in memory (two floats a pair); a resumed run computes them again,
deterministically, from the same starting weights. For ``--tune lora`` the reference is the base model
itself (peft's adapters disabled); otherwise the starting weights are built again (``--init-from`` read
again, or the same initialisation by the seed), used for the cache and dropped, so no second model stays
in memory during training. Under several processes each computes its share of the cache and one
all-reduce gives everyone all of it.

Each pair is its own forward and backward (its graph freed before the next), so memory is that of one
pair and ``--micro-batch-size`` changes nothing. Several processes (torchrun): each trains its share of
the step's pairs, calling the model outside DDP (two forwards a pair, one backward), and the gradients
are summed over processes once per step (one all-reduce), as GRPO does. ``--fsdp`` is refused: the
reference cache is made from a whole copy of the starting weights on each process, and the step sums
gradients of replicated parameters; a sharded version would need the cache made from the sharded
policy before the first step and stored with the checkpoint. No L2Wrap (an LM-loss regulariser).

Metrics per step: ``margin``, ``accuracy`` (the fraction of pairs with margin > 0, a tie counting one
half), ``reward_chosen``, ``reward_rejected``, ``nll_chosen`` (means over the step's pairs), all on the
progress bar. With ``--val-data`` (pairs too): ``val_loss``, ``val_margin``, ``val_accuracy``,
``val_nll_chosen`` (as above), and ``val_policy_accuracy``, the fraction of pairs whose chosen completion
the model alone gives the higher log-probability (no reference; not 0.5 at the start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_format import normalize_message
from rwkvkit.train import distributed
from rwkvkit.train.chat_data import EOT_ID, load_jsonl_records
from rwkvkit.train.grpo import completion_logprobs, pad_completions, prompt_tokens
from rwkvkit.train.objective import Objective, StepOutput
from rwkvkit.train.trainer import Trainer, build_model

log = logging.getLogger("rwkvkit.train")


# ---------------------------------------------------------------------------------------------- data


@dataclass
class PreferencePair:
    """One record of a preference file, tokenized."""

    where: str  # "FILE: line N", for messages
    prompt: list[int]  # what the model reads before either completion
    chosen: list[int]  # the preferred completion's tokens
    rejected: list[int]  # the other completion's tokens


def load_pairs(path: str | Path, tokenizer) -> list[PreferencePair]:
    """The pairs of a preference ``.jsonl`` file (see the module docstring); RwkvkitError naming the first
    bad record."""
    return load_jsonl_records(
        path, "preference", "preference pairs", lambda r, where: _pair(r, where, tokenizer)
    )


def _pair(record: Any, where: str, tokenizer) -> PreferencePair:
    if not isinstance(record, dict):
        raise RwkvkitError(
            f"{where}: a preference record must be a JSON object with prompt, chosen, rejected"
        )
    kinds = [key for key in ("prompt", "prefix") if key in record]
    if len(kinds) != 1:
        raise RwkvkitError(f"{where}: a preference record needs exactly one of 'prompt' (chat) or 'prefix'")
    chat = kinds[0] == "prompt"
    texts = {}
    for key in (kinds[0], "chosen", "rejected"):
        if key not in record:
            raise RwkvkitError(f"{where}: missing '{key}'")
        text = record[key]
        if not isinstance(text, str):
            raise RwkvkitError(f"{where}: '{key}' must be a string, got {type(text).__name__}")
        text = normalize_message(text) if chat else text
        if not text.strip():
            raise RwkvkitError(f"{where}: '{key}' is empty")
        texts[key] = text
    if texts["chosen"] == texts["rejected"]:
        raise RwkvkitError(f"{where}: 'chosen' and 'rejected' are the same text: no preference to learn")
    chosen, rejected = (completion_tokens(tokenizer, texts[k], chat) for k in ("chosen", "rejected"))
    return PreferencePair(where, prompt_tokens(tokenizer, texts[kinds[0]], chat), chosen, rejected)


def completion_tokens(tokenizer, text: str, chat: bool) -> list[int]:
    """A completion's tokens: a chat reply as SFT renders it (" " + text, then end-of-text), raw text as
    is."""
    if chat:
        return [*tokenizer.encode(" " + text), EOT_ID]
    return list(tokenizer.encode(text))


def step_pairs(n_pairs: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The pair indices of step ``step``'s global batch: global index ``step * batch_size + k`` through
    the seeded permutation of its epoch (every pair once per epoch)."""
    out: list[int] = []
    orders: dict[int, np.ndarray] = {}
    for index in range(step * batch_size, (step + 1) * batch_size):
        epoch, position = divmod(index, n_pairs)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch, 0xD90]).permutation(n_pairs)
        out.append(int(orders[epoch][position]))
    return out


# ---------------------------------------------------------------------------------------------- the loss


def pair_logprobs(model, pair: PreferencePair, vocab: int, device: torch.device) -> torch.Tensor:
    """Summed log-probabilities (2,) of (chosen, rejected) after the prompt: one prefill of the prompt,
    the two completions from copies of its state (gradients flow through the prefill)."""
    ids, mask = pad_completions([pair.chosen, pair.rejected], device)  # (2, L) each
    logp = completion_logprobs(model, pair.prompt, ids, 1.0, vocab, mask)  # (2, L)
    return (logp * mask).sum(dim=1)  # (2,)


def dpo_loss_terms(
    policy: torch.Tensor,
    reference: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (N,), reward_chosen (N,), reward_rejected (N,), nll_chosen (N,)) from summed log-probs
    (N, 2) of the policy and the reference, columns (chosen, rejected), and the chosen completions'
    token counts (N,)."""
    rewards = beta * (policy - reference)  # (N, 2)
    margin = rewards[:, 0] - rewards[:, 1]  # (N,)
    nll_chosen = -policy[:, 0] / chosen_lengths  # (N,)
    loss = -F.logsigmoid(margin)
    if sft_weight:
        loss = loss + sft_weight * nll_chosen
    return loss, rewards[:, 0].detach(), rewards[:, 1].detach(), nll_chosen.detach()


def accuracy_of(margins: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where the margin is > 0, 0.5 for a tie, 0 below."""
    return (margins > 0).double() + 0.5 * (margins == 0).double()


# ---------------------------------------------------------------------------------------------- the objective


class DPOObjective(Objective):
    """``--objective dpo`` (see the module docstring)."""

    name = "dpo"
    bar_metrics = ("margin", "accuracy", "reward_chosen", "reward_rejected", "nll_chosen")

    def load_data(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        if cfg.fsdp:
            raise RwkvkitError(
                "--fsdp does not go with --objective dpo: the reference log-probabilities come from a whole "
                "copy of the starting weights on each process and a step sums replicated gradients (use "
                "DDP, the default)"
            )
        if not cfg.dpo_beta > 0:
            raise RwkvkitError(f"--dpo-beta must be > 0, got {cfg.dpo_beta}")
        if not cfg.dpo_sft_weight >= 0:
            raise RwkvkitError(f"--dpo-sft-weight must be >= 0, got {cfg.dpo_sft_weight}")
        self.pairs = load_pairs(cfg.data, trainer.tokenizer)
        self.val_pairs = load_pairs(cfg.val_data, trainer.tokenizer) if cfg.val_data else []
        self.has_validation = bool(self.val_pairs)
        self.vocab = min(int(trainer.tokenizer.vocab_size), trainer.vocab_size)
        self.reference_forwards = 0  # pairs the reference model has run (counted for the tests)

    def setup(self, trainer: Trainer) -> None:
        """The reference log-probabilities of every pair, computed once (see the module docstring)."""
        cfg = trainer.cfg
        if cfg.tune == "lora":
            model = trainer.parts.model
            with trainer.parts.trained.disable_adapter():
                self.ref, self.val_ref = self._reference(trainer, model)
            return
        with torch.random.fork_rng(devices=[]):  # the run's RNG state (restored on resume) stays as it is
            torch.manual_seed(cfg.seed)  # as Trainer._build: the same starting weights
            reference = build_model(cfg, trainer.vocab_size, trainer.world.device)
        self.ref, self.val_ref = self._reference(trainer, reference.eval().requires_grad_(False))
        del reference

    @torch.no_grad()
    def _reference(self, trainer: Trainer, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (N, 2) of the training and the validation pairs (float64, on the CPU)."""
        world = trainer.world
        was_training = model.training
        model.eval()
        try:
            out = []
            for pairs in (self.pairs, self.val_pairs):
                table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=world.device)
                for i in range(world.rank, len(pairs), world.world_size):
                    with trainer.autocast:
                        table[i] = pair_logprobs(model, pairs[i], self.vocab, world.device).double()
                    self.reference_forwards += 1
                out.append(distributed.all_reduce_sum(table, world).cpu())
        finally:
            model.train(was_training)
        log.info(
            "reference log-probabilities of %d + %d pairs computed", len(self.pairs), len(self.val_pairs)
        )
        return out[0], out[1]

    def forward_backward(self, trainer: Trainer) -> StepOutput:
        cfg, world, step = trainer.cfg, trainer.world, trainer.step
        chosen = step_pairs(len(self.pairs), step, cfg.batch_size, cfg.seed)
        slots = range(world.rank * trainer.local_rows, (world.rank + 1) * trainer.local_rows)
        weight = 1.0 / cfg.batch_size
        totals = torch.zeros(7, dtype=torch.float64)  # loss, margin, accuracy, chosen, rejected, nll, tokens
        for s in slots:
            i = chosen[s]
            pair = self.pairs[i]
            with trainer.autocast:
                policy = pair_logprobs(trainer.parts.model, pair, self.vocab, world.device)  # (2,)
            reference = self.ref[i].to(device=world.device, dtype=policy.dtype)  # (2,)
            loss, r_chosen, r_rejected, nll = dpo_loss_terms(
                policy.unsqueeze(0),
                reference.unsqueeze(0),
                cfg.dpo_beta,
                torch.tensor([len(pair.chosen)], device=world.device),
                cfg.dpo_sft_weight,
            )
            (loss.sum() * weight).backward()
            margin = r_chosen - r_rejected
            n_tokens = len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
            totals += torch.tensor(
                [
                    float(loss.detach().sum()),
                    float(margin.sum()),
                    float(accuracy_of(margin).sum()),
                    float(r_chosen.sum()),
                    float(r_rejected.sum()),
                    float(nll.sum()),
                    n_tokens,
                ],
                dtype=torch.float64,
            )
        distributed.all_reduce_gradients(trainer.parts.trained, world, mean=False)
        loss_sum, margin, accuracy, r_chosen, r_rejected, nll, tokens = distributed.sum_values(
            totals.tolist(), world
        )
        metrics = {
            "margin": margin * weight,
            "accuracy": accuracy * weight,
            "reward_chosen": r_chosen * weight,
            "reward_rejected": r_rejected * weight,
            "nll_chosen": nll * weight,
        }
        return StepOutput(loss_sum * weight, int(tokens), metrics)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """``val_loss``, ``val_margin``, ``val_accuracy`` and ``val_policy_accuracy`` over every validation
        pair (each process its share, then summed)."""
        if not self.val_pairs:
            return {}
        cfg, world, model = trainer.cfg, trainer.world, trainer.parts.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(5, dtype=torch.float64)  # loss, margin, accuracy, policy accuracy, nll
        try:
            for i in range(world.rank, len(self.val_pairs), world.world_size):
                with trainer.autocast:
                    policy = pair_logprobs(model, self.val_pairs[i], self.vocab, world.device).double()
                reference = self.val_ref[i].to(world.device)
                lengths = torch.tensor([len(self.val_pairs[i].chosen)], device=world.device)
                loss, r_chosen, r_rejected, nll = dpo_loss_terms(
                    policy[None], reference[None], cfg.dpo_beta, lengths, cfg.dpo_sft_weight
                )
                margin = r_chosen - r_rejected
                own = accuracy_of(policy[:1] - policy[1:])
                totals += torch.tensor(
                    [
                        float(loss.sum()),
                        float(margin.sum()),
                        float(accuracy_of(margin).sum()),
                        float(own.sum()),
                        float(nll.sum()),
                    ],
                    dtype=torch.float64,
                )
        finally:
            model.train(was_training)
        loss, margin, accuracy, own, nll = distributed.sum_values(totals.tolist(), world)
        n = len(self.val_pairs)
        return {
            "val_loss": loss / n,
            "val_margin": margin / n,
            "val_accuracy": accuracy / n,
            "val_policy_accuracy": own / n,
            "val_nll_chosen": nll / n,
        }
