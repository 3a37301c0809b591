"""Optimizer and schedule as the official RWKV trainer sets them up.

AdamW with betas (0.9, 0.99) and eps 1e-18; weight decay only on 2-D ``.weight`` matrices; the decay
base (``att.w0`` for RWKV-7) at twice the learning rate; linear warmup then cosine decay; and the
L2Wrap regulariser that keeps logits small; and the masked cross-entropy sum every loss path shares.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DOUBLE_LR_SUFFIXES = ("att.w0", "att.time_decay")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Three groups: decayed 2-D weights, plain parameters, and decay parameters at 2x lr (``lr_scale``)."""
    decayed, plain, double_lr = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(DOUBLE_LR_SUFFIXES):
            double_lr.append(p)
        elif name.endswith(".weight") and p.dim() == 2 and weight_decay > 0:
            decayed.append(p)
        else:
            plain.append(p)
    groups = [
        {"params": decayed, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay"},
        {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        {"params": double_lr, "weight_decay": 0.0, "lr_scale": 2.0, "name": "2x_lr"},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.99), eps=1e-18)


def lr_at(step: int, progress: float, lr: float, lr_final: float, warmup_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr_final`` over progress 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    cosine = lr_final + (lr - lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if warmup_steps > 0 and step < warmup_steps:
        return cosine * (step + 1) / warmup_steps
    return cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward, adds 1e-4 / (B*T) * max_logit to each position's largest logit.

    Pulls the top logit towards zero, which keeps logits (and bf16 training) well behaved. The extra
    gradient is scaled like the loss's (by the incoming gradient), so a loss weighted for gradient
    accumulation carries its L2Wrap term with the same weight and k micro-batches of B/k rows add up to
    one batch of B rows.
    """

    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (logits,) = ctx.saved_tensors  # (B, T, V)
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        max_val, max_idx = logits.max(dim=-1, keepdim=True)
        grad_logits = torch.zeros_like(logits).scatter_(-1, max_idx, max_val * factor * grad_output)
        return grad_output, grad_logits


def masked_loss_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token cross-entropy of logits (B, T, V) over targets (B, T) where mask (B, T) is 1."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # (B*T,)
    return (ce * mask.flatten().to(ce.dtype)).sum()
