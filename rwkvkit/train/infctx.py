"""Infinite-context training (``--seq-len``): sequences longer than a window, run window by window with
the recurrent state carried across, in the memory of one window.

A step's batch is ``batch_size`` sequences of ``seq_len`` tokens, drawn from the token stream as a pure
function of (seed, step) like the ordinary windows (:func:`rwkvkit.train.data.sample_batch`), and each
is cut into ``seq_len / ctx_len`` windows. Window j starts from the state window j - 1 ended in (the WKV
states and both token shifts of every layer); window 0 from the initial state. Each window's loss is
weighted by its share of the sequence, so the summed loss is the mean over all ``seq_len`` tokens: the
value a whole-sequence forward gives.

Gradients (``--state-grad-windows k``): the windows are taken in groups of k; inside a group the
gradient flows back through the carried state, at a group's first window it is cut (the state that
enters it is a constant). k = 1 is truncated back-propagation at every window boundary; k >= the number
of windows is the exact gradient of the whole sequence. Memory stays that of one window for any k: a
group is first run forward without gradients, keeping only the states at its window boundaries, then
backward from its last window to its first, each window recomputed from its stored entry state with the
gradient of the state it hands on (received from the window after it) added to its loss. A group of k
windows costs k - 1 extra window forwards (none for k = 1).

The loss masks of chat data and L2Wrap are handled as in the ordinary step, each window carrying its
share. Validation (:func:`evaluate_sequences`) runs the validation stream in sequences of ``seq_len``
the same way, with the state carried, so ``val_loss`` measures what the long context buys.

Under DDP the windows run through the unwrapped model and the accumulated gradients are averaged once
at the end of the step (:func:`rwkvkit.train.distributed.all_reduce_gradients`): a step is many small
backward passes, and with state tuning some windows have no gradient at all, which DDP's reducer cannot
be told in advance. Under FSDP2 every backward reduces its gradients as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rwkvkit.errors import RwkvkitError
from rwkvkit.state import RWKVState
from rwkvkit.train import distributed
from rwkvkit.train.data import sample_batch, sample_mask
from rwkvkit.train.optim import L2Wrap, masked_loss_sum

if TYPE_CHECKING:  # annotations only
    from rwkvkit.train.trainer import Trainer

# window_loss(logits (B, T, V), index of the window) -> (what to back-propagate, the loss value to report)
WindowLoss = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _leaf(state: RWKVState) -> RWKVState:
    """A copy of ``state`` cut from its history, whose gradient is collected (the entry of a window)."""
    return RWKVState(*(t.detach().requires_grad_(True) for t in _tensors(state)))


def _tensors(state: RWKVState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return state.att_shift, state.wkv, state.ffn_shift


def _state_grads(state: RWKVState) -> list[torch.Tensor]:
    """The gradients collected in a :func:`_leaf` state (zeros where nothing reached a part)."""
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in _tensors(state)]


def sequence_backward(
    model: torch.nn.Module,
    x: torch.Tensor,
    ctx_len: int,
    state_grad_windows: int,
    window_loss: WindowLoss,
    autocast=None,
) -> torch.Tensor:
    """Accumulate into the parameters' ``.grad`` the gradient of the summed window losses of sequences
    x (B, S), run in windows of ``ctx_len`` with the state carried and the gradient cut every
    ``state_grad_windows`` windows (see the module docstring). Returns the summed reported loss (a
    0-d tensor, detached).

    ``model`` is called as ``model(tokens, state=...)`` and returns (logits, state);
    ``window_loss(logits, j)`` gives window j's objective and its reported loss (the caller weights
    both). ``autocast`` is a context manager the forwards run in (e.g. bf16 autocast), or None.
    """
    B, S = x.shape
    n = S // ctx_len
    windows = [x[:, j * ctx_len : (j + 1) * ctx_len] for j in range(n)]  # n x (B, T)
    run = autocast if autocast is not None else nullcontext()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    carried: RWKVState | None = None  # the state entering the next group (None: the initial state)
    for first in range(0, n, state_grad_windows):
        last = min(first + state_grad_windows, n) - 1
        entries = [carried]  # the state entering each window of the group
        with torch.no_grad(), run:
            for j in range(first, last):
                _, state = model(windows[j], state=entries[-1])
                entries.append(state)
        handed_grads: list[torch.Tensor] | None = None  # gradient of the state window j hands on
        for j in range(last, first - 1, -1):
            entry = entries[j - first]
            if j > first:  # inside the group: collect the gradient of the entry state
                entry = _leaf(entry)
            with run:
                logits, state = model(windows[j], state=entry)  # (B, T, V)
                objective, loss = window_loss(logits, j)
            pairs = [(objective, None)]
            if handed_grads is not None:
                pairs += zip(_tensors(state), handed_grads, strict=True)
            pairs = [(t, g) for t, g in pairs if t.requires_grad]  # none: nothing trained (state tuning)
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            total += loss.detach().double()
            if j == last and last < n - 1:
                carried = state.detach()
            handed_grads = _state_grads(entry) if j > first else None
            del logits, state, objective, loss, entry
    return total


def check_sequence_data(n_tokens: int, seq_len: int, what: str, extra: int = 2) -> None:
    """Raise RwkvkitError unless a token stream of ``n_tokens`` holds ``seq_len + extra`` tokens (a
    sequence, its targets, and for training at least two places to start)."""
    if n_tokens < seq_len + extra:
        raise RwkvkitError(
            f"{what} has {n_tokens} tokens, fewer than --seq-len + {extra} = {seq_len + extra}: "
            "lower --seq-len"
        )


def forward_backward(trainer: Trainer) -> float:
    """The trainer's step under ``--seq-len``: gradients of this step's batch of sequences, summed over
    micro-batches (and averaged over processes); returns the loss (mean over every target the step
    trains, as the ordinary step)."""
    cfg, world = trainer.cfg, trainer.world

    model = _step_model(trainer)
    S, T = cfg.seq_len, cfg.ctx_len
    accumulation = trainer.local_rows // trainer.micro_rows
    share = trainer.micro_rows / trainer.local_rows  # of this process's mean loss
    window_share = T / S  # of a sequence's mean loss
    rows = [
        slice(f, f + trainer.micro_rows)
        for f in range(
            world.rank * trainer.local_rows, (world.rank + 1) * trainer.local_rows, trainer.micro_rows
        )
    ]
    weight = None  # chat data: the loss is a sum over marked targets times this
    masks: list[torch.Tensor] = []
    if trainer.mask is not None:
        masks = [sample_mask(trainer.mask, trainer.step, cfg.batch_size, S, cfg.seed, rows=r) for r in rows]
        counted = torch.tensor(
            float(sum(m.sum().item() for m in masks)), dtype=torch.float64, device=world.device
        )
        total_marked = distributed.all_reduce_sum(counted, world).item()
        weight = world.world_size / total_marked if total_marked > 0 else float("nan")
    loss_sum = torch.zeros((), dtype=torch.float64, device=world.device)
    for micro in range(accumulation):
        x, y = sample_batch(trainer.tokens, trainer.step, cfg.batch_size, S, cfg.seed, rows=rows[micro])
        x, y = x.to(world.device), y.to(world.device)  # (B, S)
        mask = masks[micro].to(world.device) if masks else None

        def window_loss(logits: torch.Tensor, j: int, y=y, mask=mask) -> tuple[torch.Tensor, torch.Tensor]:
            yj = y[:, j * T : (j + 1) * T]  # (B, T)
            if mask is None:
                loss = trainer.loss_fn(logits, yj)  # the window's mean
                objective = L2Wrap.apply(loss, logits) if cfg.l2wrap else loss  # its weight: the loss's
                return objective * (window_share * share), loss * (window_share * share)
            loss = masked_loss_sum(logits, yj, mask[:, j * T : (j + 1) * T]) * weight
            objective = loss
            if cfg.l2wrap:
                zero = torch.zeros((), device=logits.device)
                objective = loss + L2Wrap.apply(zero, logits) * (window_share * share)
            return objective, loss

        loss_sum += sequence_backward(model, x, T, cfg.state_grad_windows, window_loss, trainer.autocast)
    if world.enabled and not cfg.fsdp:
        distributed.all_reduce_gradients(trainer.parts.trained, world, mean=True)
    return (distributed.all_reduce_sum(loss_sum, world) / world.world_size).item()


def _step_model(trainer: Trainer) -> torch.nn.Module:
    """What the windows run through: the FSDP2 module (its hooks gather and reduce), else the model
    without its DDP wrapper (gradients are averaged once per step instead)."""
    if trainer.world.enabled and trainer.cfg.fsdp:
        return trainer.parts.module
    return trainer.parts.trained


@torch.no_grad()
def evaluate_sequences(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ctx_len: int,
    batch_size: int = 16,
    mask: torch.Tensor | None = None,
) -> float:
    """Mean cross-entropy (nats per token) over sequences x, y (W, S), each from the initial state and
    run in windows of ``ctx_len`` with the state carried (the memory of one window); with ``mask``
    (W, S), over the targets it marks only."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)  # (B, S)
        mb = None if mask is None else mask[start : start + batch_size].to(device)
        state = None
        for s in range(0, xb.shape[1], ctx_len):
            logits, state = model(xb[:, s : s + ctx_len], state=state)  # (B, T, V)
            ce = F.cross_entropy(
                logits.flatten(0, 1).float(), yb[:, s : s + ctx_len].flatten(), reduction="none"
            )
            if mb is None:
                total += ce.sum().item()
                count += ce.numel()
            else:
                m = mb[:, s : s + ctx_len].flatten().to(ce.dtype)
                total += (ce * m).sum().item()
                count += int(m.sum().item())
    model.train(was_training)
    return total / count
