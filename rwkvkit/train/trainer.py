"""The training loop behind ``rwkvkit train`` and ``torchrun -m rwkvkit.train``: the ``Trainer``.

Trains any RWKV version in parallel ("GPT") mode with the chunked WKV operators, from scratch (official
init) or from an official checkpoint (fine-tuning: full, LoRA, or state tuning), on one process or many
(DDP, or FSDP2 with ``--fsdp``). One optimizer step sees ``batch_size`` windows of ``ctx_len`` tokens,
drawn as a pure function of (seed, step) and split over processes and micro-batches, so the loss curve
does not depend on how the batch is split and a resumed run sees the data it would have seen.
With ``--seq-len`` a step's rows are sequences of ``seq_len`` tokens run in ``ctx_len`` windows with the
state carried (:mod:`rwkvkit.train.infctx`).

:class:`Trainer` runs in named phases: ``setup`` (data, model, tuning, optimizer, resume), ``train_step``
(AdamW with the official parameter groups, warmup + cosine schedule, gradient accumulation, L2Wrap,
optional bf16 autocast and gradient checkpointing, gradient clipping), ``evaluate`` (validation loss) and
``save``; ``train`` is the loop over them. A step whose loss or gradient norm is not finite is skipped
(logged, weights and optimizer untouched). Its components: :mod:`rwkvkit.train.metrics` (``metrics.jsonl``
and ``loss.png``) and :class:`rwkvkit.train.checkpointing.Checkpointer` (``model.pth``,
``train_state.pt`` for ``--resume``, and ``adapter.safetensors`` for LoRA runs), written by rank 0 every
``save_every`` steps and at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rwkvkit.errors import RwkvkitError
from rwkvkit.models import load_model, new_model
from rwkvkit.models.common import RWKVModel
from rwkvkit.tokenizer import load_tokenizer
from rwkvkit.train import distributed, finetune, infctx
from rwkvkit.train.checkpointing import Checkpointer, ModelParts
from rwkvkit.train.config import TrainConfig, check_config, config_to_json
from rwkvkit.train.data import EOT_ID, eval_windows, load_training_data, sample_batch, sample_mask
from rwkvkit.train.metrics import METRICS_FILE, PLOT_FILE, MetricsLog
from rwkvkit.train.objective import StepOutput, make_objective
from rwkvkit.train.optim import L2Wrap, lr_at, make_optimizer, masked_loss_sum, set_lr

log = logging.getLogger("rwkvkit.train")


def compute_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def pack_resets(x: torch.Tensor) -> torch.Tensor:
    """Where the packed documents of windows x (B, T) start (``--pack``): at every end-of-text id, which
    ends one document and begins the next (the model's ``resets``)."""
    return x == EOT_ID


def evaluate(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 16,
    mask: torch.Tensor | None = None,
    pack: bool = False,
) -> float:
    """Mean cross-entropy (nats per token) over windows x, y (W, T), each from the initial state; with
    ``mask`` (W, T), over the targets it marks only (chat data: the assistant's tokens); with ``pack``,
    each document in a window from the initial state (:func:`pack_resets`).

    Under several processes every process evaluates all windows through its (DDP or FSDP) module, so
    the collectives of a sharded forward line up and every process gets the same number.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        logits, _ = model(xb, resets=pack_resets(xb) if pack else None)  # (B, T, V)
        if mask is None:
            total += F.cross_entropy(logits.flatten(0, 1).float(), yb.flatten(), reduction="sum").item()
            count += yb.numel()
        else:
            mb = mask[start : start + batch_size].to(device)  # (B, T)
            total += masked_loss_sum(logits, yb, mb).item()
            count += int(mb.sum().item())
    model.train(was_training)
    return total / count


@dataclass
class TrainResult:
    model_path: Path
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    val_loss: float | None
    rank: int = 0  # of the process that trained (under torchrun rank 0 alone wrote the files)


# ---------------------------------------------------------------------------------------------- set-up


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> RWKVModel:
    """The model to train: the official checkpoint ``init_from`` (fp32) or a new one (official init)."""
    if cfg.init_from:
        model = load_model(cfg.init_from, device=device)
        if model.quantization:
            raise RwkvkitError(
                f"{cfg.init_from} is a quantized model ({model.quantization['scheme']}): training needs the "
                "full-precision checkpoint it was made from"
            )
        if model.config.vocab_size != vocab_size:
            raise RwkvkitError(
                f"{cfg.init_from} has a vocabulary of {model.config.vocab_size} tokens, but the tokenizer "
                f"'{cfg.tokenizer}' has {vocab_size}; choose the matching --tokenizer"
            )
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = new_model(cfg.version, cfg.n_layer, cfg.n_embd, vocab_size, cfg.head_size, device)
    return model.train()


def prepare_tuning(model: RWKVModel, cfg: TrainConfig) -> torch.nn.Module:
    """Apply --tune / --freeze / --train-only; returns the module to train (a peft wrapper for LoRA)."""
    if cfg.tune == "lora":
        return finetune.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    if cfg.tune == "state":
        finetune.enable_state_tuning(model)
    if cfg.train_only:
        finetune.train_only(model, cfg.train_only)
    if cfg.freeze:
        finetune.freeze(model, cfg.freeze)
    return model


def _batch_layout(cfg: TrainConfig, world: distributed.Distributed) -> tuple[int, int]:
    """(rows per process, rows per micro-batch) of the global batch."""
    if cfg.batch_size % world.world_size:
        raise RwkvkitError(
            f"--batch-size {cfg.batch_size} is not divisible by the {world.world_size} processes"
        )
    local = cfg.batch_size // world.world_size
    micro = cfg.micro_batch_size or local
    if local % micro:
        raise RwkvkitError(
            f"each process takes {local} sequences per step, not a multiple of --micro-batch-size {micro}"
        )
    return local, micro


def _clip_gradients(module: torch.nn.Module, max_norm: float) -> float:
    """Clip the total gradient norm to ``max_norm`` (0: only measure it); returns the norm before."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ---------------------------------------------------------------------------------------------- the run


class Trainer:
    """One training run as ``cfg`` says: ``setup()``, then ``train()``; ``close()`` leaves the process group.

    Used as a context manager (``with Trainer(cfg) as t: t.setup(); t.train()``), which closes it.
    """

    def __init__(self, cfg: TrainConfig, loss_fn: Callable = compute_loss) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.objective = make_objective(cfg.objective)  # None: next-token prediction (this module's loop)
        self.out = Path(cfg.out)
        self.world = distributed.setup(cfg.device)
        self.checkpointer = Checkpointer(cfg, self.world)
        self.metrics = MetricsLog(self.out / METRICS_FILE, write=self.world.is_main)
        self.step = self.start_step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # training seconds of the run before it was resumed
        self.started = time.perf_counter()
        self.loss_value = float("nan")  # the last finite training loss
        self.val_loss: float | None = None
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None  # validation windows (W, T)
        self.val_mask: torch.Tensor | None = None  # which validation targets count (chat data), (W, T)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        distributed.teardown(self.world)

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Data, model, tuning and optimizer; the saved state under --resume; the run's config file."""
        self.local_rows, self.micro_rows = _batch_layout(self.cfg, self.world)
        self._load_data()
        saved = self.checkpointer.load() if self.cfg.resume else None
        self._build()
        if saved is not None:
            self._resume(saved)
        if self.objective is not None:
            self.objective.setup(self)
        if self.world.is_main:
            self._announce()
        self.metrics.open()

    def _load_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = tokenizer = load_tokenizer(cfg.tokenizer)
        self.vocab_size = tokenizer.vocab_size
        if self.objective is not None:
            self.objective.load_data(self)
            return
        self.tokens, self.mask = load_training_data(cfg.data, tokenizer)  # mask: chat data's loss mask
        if cfg.seq_len:
            infctx.check_sequence_data(self.tokens.size, cfg.seq_len, f"--data {cfg.data}")
        if cfg.val_data:
            val_tokens, val_mask = load_training_data(cfg.val_data, tokenizer)
            if cfg.eval_tokens:
                val_tokens = val_tokens[: cfg.eval_tokens + 1]
            length = cfg.seq_len or cfg.ctx_len  # --seq-len: whole sequences, run in windows
            if cfg.seq_len:
                infctx.check_sequence_data(val_tokens.size, cfg.seq_len, f"--val-data {cfg.val_data}", 1)
            self.val = eval_windows(val_tokens, length)
            if val_mask is not None:
                self.val_mask = eval_windows(val_mask[: val_tokens.size], length)[1].float()

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, self.vocab_size, self.world.device)
        trained = prepare_tuning(model, cfg)
        model.grad_checkpoint = cfg.grad_checkpoint
        module = distributed.wrap(trained, self.world, cfg.fsdp)
        self.parts = ModelParts(model, trained, module)
        self.optimizer = make_optimizer(trained, cfg.lr, cfg.weight_decay)
        bf16 = cfg.precision == "bf16"
        self.autocast = (
            torch.autocast(self.world.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        )

    def _resume(self, saved: dict) -> None:
        self.checkpointer.restore(saved, self.parts, self.optimizer)
        self.step = self.start_step = saved["step"]
        self.tokens_seen, self.elapsed_before = saved["tokens_seen"], saved["elapsed"]
        self.metrics.truncate(saved["metrics_bytes"])

    def _announce(self) -> None:
        """Create the output folder, write train_config.json and log what is trained (rank 0)."""
        cfg, parts = self.cfg, self.parts
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(config_to_json(cfg))
        log.info(
            "%s %s, %.2fM parameters (%.2fM trained, --tune %s), --objective %s, %d process(es)%s",
            f"resuming at step {self.start_step}:" if self.start_step else "model",
            parts.model.config.describe(),
            sum(p.numel() for p in parts.model.parameters()) / 1e6,
            sum(p.numel() for p in parts.trained.parameters() if p.requires_grad) / 1e6,
            cfg.tune,
            cfg.objective,
            self.world.world_size,
            ", FSDP" if cfg.fsdp and self.world.enabled else "",
        )

    # ------------------------------------------------------------------------------------------ one step

    def elapsed(self) -> float:
        """Training seconds of the whole run so far (resumed runs included)."""
        return self.elapsed_before + time.perf_counter() - self.started

    def progress(self) -> float | None:
        """How far the run is, 0 to 1, by steps or by the time budget; None once the time budget is spent."""
        cfg = self.cfg
        progress = self.step / cfg.steps
        if cfg.time_budget > 0:
            progress = max(progress, self.elapsed() / cfg.time_budget)
            if distributed.broadcast_flag(progress >= 1.0, self.world):
                return None
        return progress

    def step_output(self) -> StepOutput:
        """The gradients of this step's batch, from the objective (or next-token prediction)."""
        if self.objective is not None:
            return self.objective.forward_backward(self)
        return StepOutput(
            self.forward_backward(), self.cfg.batch_size * (self.cfg.seq_len or self.cfg.ctx_len)
        )

    def resets(self, x: torch.Tensor) -> torch.Tensor | None:
        """The document starts of windows x (B, T) under ``--pack`` (None without it)."""
        return pack_resets(x) if self.cfg.pack else None

    def forward_backward(self) -> float:
        """Gradients of this step's batch, summed over micro-batches; returns the loss (mean of processes)."""
        cfg, world, module, autocast = self.cfg, self.world, self.parts.module, self.autocast
        if cfg.seq_len:  # sequences of --seq-len in --ctx-len windows, the state carried
            return infctx.forward_backward(self)
        accumulation = self.local_rows // self.micro_rows
        share = self.micro_rows / self.local_rows  # of this process's mean loss (DDP averages processes)
        loss_sum = torch.zeros((), dtype=torch.float64, device=world.device)
        if self.mask is not None:
            return self.masked_forward_backward()
        for micro in range(accumulation):
            first = world.rank * self.local_rows + micro * self.micro_rows
            rows = slice(first, first + self.micro_rows)
            x, y = sample_batch(self.tokens, self.step, cfg.batch_size, cfg.ctx_len, cfg.seed, rows=rows)
            x, y = x.to(world.device), y.to(world.device)  # (B, T)
            with distributed.no_sync(module, sync=micro == accumulation - 1), autocast:
                logits, _ = module(x, resets=self.resets(x))  # (B, T, V)
                loss = self.loss_fn(logits, y)
                objective = L2Wrap.apply(loss, logits) if cfg.l2wrap else loss
                (objective * share).backward()
            loss_sum += loss.detach().double() * share
        return (distributed.all_reduce_sum(loss_sum, world) / world.world_size).item()

    def masked_forward_backward(self) -> float:
        """:meth:`forward_backward` for chat data: the loss is the mean over the targets the mask marks in
        the whole step's batch (every process and micro-batch), so accumulation and processes change
        nothing; L2Wrap's term keeps its per-row weight as without a mask."""
        cfg, world, module, autocast = self.cfg, self.world, self.parts.module, self.autocast
        accumulation = self.local_rows // self.micro_rows
        share = self.micro_rows / self.local_rows
        rows = [
            slice(f, f + self.micro_rows)
            for f in range(world.rank * self.local_rows, (world.rank + 1) * self.local_rows, self.micro_rows)
        ]
        masks = [
            sample_mask(self.mask, self.step, cfg.batch_size, cfg.ctx_len, cfg.seed, rows=r) for r in rows
        ]
        counted = torch.tensor(
            float(sum(m.sum().item() for m in masks)), dtype=torch.float64, device=world.device
        )
        total = distributed.all_reduce_sum(counted, world).item()  # marked targets in the global batch
        weight = world.world_size / total if total > 0 else float("nan")  # no marked target: skipped
        loss_sum = torch.zeros((), dtype=torch.float64, device=world.device)
        for micro, (r, mask) in enumerate(zip(rows, masks, strict=True)):
            x, y = sample_batch(self.tokens, self.step, cfg.batch_size, cfg.ctx_len, cfg.seed, rows=r)
            x, y, mask = x.to(world.device), y.to(world.device), mask.to(world.device)  # (B, T)
            with distributed.no_sync(module, sync=micro == accumulation - 1), autocast:
                logits, _ = module(x, resets=self.resets(x))  # (B, T, V)
                part = masked_loss_sum(logits, y, mask) * weight
                objective = part
                if cfg.l2wrap:
                    objective = part + L2Wrap.apply(torch.zeros((), device=world.device), logits) * share
                objective.backward()
            loss_sum += part.detach().double()
        return (distributed.all_reduce_sum(loss_sum, world) / world.world_size).item()

    def train_step(self, progress: float) -> tuple[dict, float]:
        """One optimizer step (skipped when the loss or gradient norm is not finite).

        Returns the step's metrics entry (``skipped`` for a skipped step) and the elapsed seconds.
        """
        cfg, optimizer = self.cfg, self.optimizer
        lr = lr_at(self.step, progress, cfg.lr, cfg.lr_final, cfg.warmup_steps)
        set_lr(optimizer, lr)
        out = self.step_output()
        loss = out.loss
        grad_norm = _clip_gradients(self.parts.trained, cfg.grad_clip)
        self.step += 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            if self.world.is_main:
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                log.warning("step %d: non-finite %s, update skipped", self.step, what)
            return {"step": self.step, "skipped": True, "loss": None, "lr": lr}, self.elapsed()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += out.tokens
        self.loss_value = loss
        elapsed = self.elapsed()
        entry = {
            "step": self.step,
            "loss": round(loss, 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 4),
            **{name: round(value, 6) for name, value in out.metrics.items()},
            "tokens": self.tokens_seen,
            "tokens_per_s": round(self.tokens_seen / max(elapsed, 1e-9), 1),
            "elapsed_s": round(elapsed, 2),
        }
        return entry, elapsed

    def has_validation(self) -> bool:
        return self.val is not None or (self.objective is not None and self.objective.has_validation)

    def evaluate(self) -> dict[str, float]:
        """The validation metrics now (every process evaluates every window): ``val_loss`` and the
        objective's own."""
        if self.objective is not None:
            metrics = self.objective.evaluate(self)
        else:
            module, micro = self.parts.module, self.micro_rows
            if self.cfg.seq_len:
                val_loss = infctx.evaluate_sequences(
                    module, *self.val, self.cfg.ctx_len, batch_size=micro, mask=self.val_mask
                )
            else:
                val_loss = evaluate(
                    module, *self.val, batch_size=micro, mask=self.val_mask, pack=self.cfg.pack
                )
            metrics = {"val_loss": val_loss}
        self.val_loss = metrics.get("val_loss", self.val_loss)
        return {name: round(value, 6) for name, value in metrics.items()}

    def save(self, elapsed: float) -> None:
        """model.pth, train_state.pt (and the adapter) at the current step; collective."""
        self.checkpointer.save(
            self.parts,
            self.optimizer,
            step=self.step,
            tokens_seen=self.tokens_seen,
            elapsed=elapsed,
            metrics_bytes=self.metrics.tell(),
        )

    # ------------------------------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Steps until ``cfg.steps`` (or the time budget); a last evaluation and save; the result."""
        cfg = self.cfg
        self.started = time.perf_counter()
        bar = self._progress_bar()
        try:
            while self.step < cfg.steps:
                progress = self.progress()
                if progress is None:
                    break
                entry, elapsed = self.train_step(progress)
                if entry.get("skipped"):
                    self.metrics.record(entry)
                    continue
                self._after_step(entry, elapsed, bar)
            if self.has_validation() and not (self._eval_due() and self.step > self.start_step):
                self.metrics.record({"step": self.step, **self.evaluate()})
            elapsed = self.elapsed()
            self.save(elapsed)
        finally:
            bar.close()
            self.metrics.close()
        model_path = self.checkpointer.model_path
        if self.world.is_main:
            self.metrics.plot(self.out / PLOT_FILE)
            log.info(
                "trained to step %d (%d tokens) in %.1fs; wrote %s",
                self.step,
                self.tokens_seen,
                elapsed,
                model_path,
            )
        return TrainResult(
            model_path, self.step, self.tokens_seen, elapsed, self.loss_value, self.val_loss, self.world.rank
        )

    def _eval_due(self) -> bool:
        return bool(self.cfg.eval_every) and self.step % self.cfg.eval_every == 0

    def _after_step(self, entry: dict, elapsed: float, bar: tqdm) -> None:
        """Evaluate, record, save and plot as due after a completed step; move the progress bar."""
        cfg, step = self.cfg, self.step
        if self.has_validation() and self._eval_due():
            entry.update(self.evaluate())
        self.metrics.record(entry)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            self.save(elapsed)
        if cfg.plot_every and step % cfg.plot_every == 0:
            self.metrics.plot(self.out / PLOT_FILE)
        bar.update(min(round(elapsed), bar.total) - bar.n if cfg.time_budget > 0 else 1)
        lr, tok_s = f"{entry['lr']:.1e}", f"{entry['tokens_per_s']:,.0f}"
        names = self.objective.bar_metrics if self.objective is not None else ()
        shown = {name: f"{entry[name]:.3g}" for name in names if name in entry}
        bar.set_postfix(step=step, loss=f"{self.loss_value:.3f}", **shown, lr=lr, tok_s=tok_s)

    def _progress_bar(self) -> tqdm:
        cfg = self.cfg
        by_time = cfg.time_budget > 0
        return tqdm(
            total=round(cfg.time_budget) if by_time else cfg.steps,
            initial=min(round(self.elapsed_before), round(cfg.time_budget)) if by_time else self.start_step,
            disable=not (cfg.progress and self.world.is_main),
            unit="s" if by_time else "step",
            dynamic_ncols=True,
        )


def train(cfg: TrainConfig, loss_fn: Callable = compute_loss) -> TrainResult:
    """Run training as ``cfg`` says; returns where the model went and the final losses."""
    with Trainer(cfg, loss_fn) as trainer:
        trainer.setup()
        return trainer.train()


__all__ = ["TrainConfig", "TrainResult", "Trainer", "evaluate", "train"]
