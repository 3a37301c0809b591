"""The training objectives other than next-token prediction: the ``Objective`` interface and its registry.

``rwkvkit train --objective lm`` (the default) is the loop in :mod:`rwkvkit.train.trainer` itself:
next-token cross-entropy over windows of the token stream (plain text, chat data with a loss mask,
packed documents, infinite context). Every other objective (``dpo``, ``grpo``) is an :class:`Objective`
in a module of its own, found through :data:`OBJECTIVES` and imported only when chosen. The trainer keeps
what every run has (model, tuning, optimizer and schedule, gradient clipping, NaN-step skipping, resume,
DDP, metrics.jsonl, the progress bar, the official ``.pth`` out) and asks the objective for three things:
its data, the gradients of one step, and its evaluation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rwkvkit.errors import RwkvkitError

if TYPE_CHECKING:  # annotations only
    from rwkvkit.train.trainer import Trainer


@dataclass
class StepOutput:
    """What one optimizer step's forward and backward gave."""

    loss: float  # the objective's value, averaged over processes (not finite: the step is skipped)
    tokens: int  # tokens the step trained on, summed over processes
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own: reward, kl, margin, ...


class Objective:
    """One training objective. Subclasses implement :meth:`load_data` and :meth:`forward_backward`."""

    name = "lm"
    bar_metrics: tuple[str, ...] = ()  # keys of StepOutput.metrics shown on the progress bar
    has_validation = False  # whether evaluate() has something to report (validation data given)

    def load_data(self, trainer: Trainer) -> None:
        """Read and check ``trainer.cfg.data`` (and ``val_data``) with ``trainer.tokenizer`` (before the
        model is built); bad records raise RwkvkitError naming the record."""
        raise NotImplementedError

    def setup(self, trainer: Trainer) -> None:
        """After the model, tuning and optimizer are built and a resumed state restored: reference models,
        caches, anything that needs the model."""

    def forward_backward(self, trainer: Trainer) -> StepOutput:
        """Accumulate the gradients of step ``trainer.step`` into the trained parameters (a pure function
        of (seed, step) and the weights, so a resumed run repeats its curve)."""
        raise NotImplementedError

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Validation metrics now (``val_loss`` among them when the objective has one); {} when none."""
        return {}


OBJECTIVES = {
    "dpo": "rwkvkit.train.dpo:DPOObjective",
    "grpo": "rwkvkit.train.grpo:GRPOObjective",
}
OBJECTIVE_NAMES = ("lm", *OBJECTIVES)


def make_objective(name: str) -> Objective | None:
    """The objective called ``name``; None for ``lm`` (the trainer's own loop)."""
    if name == "lm":
        return None
    if name not in OBJECTIVES:
        raise RwkvkitError(f"--objective must be one of {', '.join(OBJECTIVE_NAMES)}, got {name}")
    module_name, class_name = OBJECTIVES[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)()
