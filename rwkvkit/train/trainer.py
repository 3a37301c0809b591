"""The training loop behind ``rwkvkit train`` and ``torchrun -m rwkvkit.train``.

Trains any RWKV version in parallel ("GPT") mode with the chunked WKV operators, from scratch (official
init) or from an official checkpoint (fine-tuning: full, LoRA, or state tuning), on one process or many
(DDP, or FSDP2 with ``--fsdp``). One optimizer step sees ``batch_size`` windows of ``ctx_len`` tokens,
drawn as a pure function of (seed, step) and split over processes and micro-batches, so the loss curve
does not depend on how the batch is split and a resumed run sees the data it would have seen.

Per step: AdamW with the official parameter groups, warmup + cosine schedule, gradient accumulation,
L2Wrap, optional bf16 autocast and gradient checkpointing, gradient clipping. A step whose loss or
gradient norm is not finite is skipped (logged, weights and optimizer untouched). Rank 0 writes, every
``save_every`` steps and at the end: ``model.pth`` (official layout, LoRA merged, tuned states as
``att.time_state``), ``train_state.pt`` (for ``--resume``), ``metrics.jsonl``, ``loss.png``, and for
LoRA runs ``adapter.safetensors``.
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

from rwkvkit.errors import RwkvkitError
from rwkvkit.train import distributed
from rwkvkit.train.config import TrainConfig, check_config, config_to_json

log = logging.getLogger("rwkvkit.train")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_FILE = "adapter.safetensors"  # LoRA runs: the adapter alone (rwkvkit merge puts it into a base)


def compute_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats per token) over windows x, y (W, T), each from the initial state.

    Under several processes every process evaluates all windows through its (DDP or FSDP) module, so
    the collectives of a sharded forward line up and every process gets the same number.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        logits, _ = model(xb)
        total += F.cross_entropy(logits.flatten(0, 1).float(), yb.flatten(), reduction="sum").item()
        count += yb.numel()
    model.train(was_training)
    return total / count


def save_loss_plot(metrics: list[dict], path: Path) -> None:
    """Training and validation loss, and the learning rate, against step, written as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    lrs = [(m["step"], m["lr"]) for m in metrics if "lr" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    if lrs:
        ax_lr = ax.twinx()
        ax_lr.plot(*zip(*lrs, strict=True), color="gray", lw=0.8, ls="--", label="lr")
        ax_lr.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


@dataclass
class TrainResult:
    model_path: Path
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    val_loss: float | None


# ---------------------------------------------------------------------------------------------- set-up


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device):
    """The model to train: the official checkpoint ``init_from`` (fp32) or a new one (official init)."""
    from rwkvkit.models import load_model, new_model

    if cfg.init_from:
        model = load_model(cfg.init_from, device=device)
        if getattr(model, "quantization", None):
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


def prepare_tuning(model, cfg: TrainConfig):
    """Apply --tune / --freeze / --train-only; returns the module to train (a peft wrapper for LoRA)."""
    from rwkvkit.train import finetune

    if cfg.tune == "lora":
        return finetune.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    if cfg.tune == "state":
        finetune.enable_state_tuning(model)
    if cfg.train_only:
        finetune.train_only(model, cfg.train_only)
    if cfg.freeze:
        finetune.freeze(model, cfg.freeze)
    return model


def official_state_dict(trained, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The official-layout tensors of the trained model (LoRA merged, without changing the model)."""
    from rwkvkit.models import export_state_dict
    from rwkvkit.train import finetune

    dtype = DTYPES[cfg.save_dtype]
    if cfg.tune == "lora":
        return finetune.merged_state_dict(trained, dtype=dtype)
    return export_state_dict(trained, dtype=dtype)


# ---------------------------------------------------------------------------------------------- the run


def _batch_layout(cfg: TrainConfig, d: distributed.Distributed) -> tuple[int, int]:
    """(rows per process, rows per micro-batch) of the global batch."""
    if cfg.batch_size % d.world_size:
        raise RwkvkitError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world_size} processes")
    local = cfg.batch_size // d.world_size
    micro = cfg.micro_batch_size or local
    if local % micro:
        raise RwkvkitError(
            f"each process takes {local} sequences per step, not a multiple of --micro-batch-size {micro}"
        )
    return local, micro


def train(cfg: TrainConfig, loss_fn: Callable = compute_loss) -> TrainResult:
    """Run training as ``cfg`` says; returns where the model went and the final losses."""
    from tqdm import tqdm

    from rwkvkit.checkpoint import save_state_dict
    from rwkvkit.models import export_state_dict
    from rwkvkit.tokenizer import load_tokenizer
    from rwkvkit.train.checkpointing import (
        TRAIN_STATE,
        load_training_state,
        restore_rng,
        save_training_state,
    )
    from rwkvkit.train.data import eval_windows, load_token_array, sample_batch
    from rwkvkit.train.optim import L2Wrap, lr_at, make_optimizer, set_lr

    check_config(cfg)
    d = distributed.setup(cfg.device)
    try:
        out = Path(cfg.out)
        state_path = out / TRAIN_STATE
        metrics_path = out / "metrics.jsonl"
        model_path = out / "model.pth"
        local_rows, micro_rows = _batch_layout(cfg, d)
        tokenizer = load_tokenizer(cfg.tokenizer)
        tokens = load_token_array(cfg.data, tokenizer)
        val = None
        if cfg.val_data:
            val_tokens = load_token_array(cfg.val_data, tokenizer)
            if cfg.eval_tokens:
                val_tokens = val_tokens[: cfg.eval_tokens + 1]
            val = eval_windows(val_tokens, cfg.ctx_len)

        saved = load_training_state(state_path, cfg) if cfg.resume else None
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, tokenizer.vocab_size, d.device)
        trained = prepare_tuning(model, cfg)
        model.grad_checkpoint = cfg.grad_checkpoint
        module = distributed.wrap(trained, d, cfg.fsdp)
        optimizer = make_optimizer(trained, cfg.lr, cfg.weight_decay)
        n_trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        n_params = sum(p.numel() for p in model.parameters())

        metrics: list[dict] = []
        start_step, tokens_seen, elapsed_before = 0, 0, 0.0
        if saved is not None:
            distributed.load_full_state_dicts(module, optimizer, saved["model"], saved["optimizer"], d)
            restore_rng(saved)
            start_step, tokens_seen, elapsed_before = saved["step"], saved["tokens_seen"], saved["elapsed"]
            if d.is_main:
                metrics = _truncate_metrics(metrics_path, saved["metrics_bytes"])
            del saved
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(config_to_json(cfg))
            log.info(
                "%s %s, %.2fM parameters (%.2fM trained, --tune %s), %d training tokens, %d process(es)%s",
                f"resuming at step {start_step}:" if start_step else "model",
                model.config.describe(),
                n_params / 1e6,
                n_trainable / 1e6,
                cfg.tune,
                len(tokens),
                d.world_size,
                ", FSDP" if cfg.fsdp and d.enabled else "",
            )
        metrics_file = open(metrics_path, "a") if d.is_main else None  # noqa: SIM115 (closed in finally)

        def record(entry: dict) -> None:
            metrics.append(entry)
            if metrics_file is not None:
                metrics_file.write(_json_line(entry))
                metrics_file.flush()

        def save(step: int, elapsed: float) -> None:
            """model.pth and train_state.pt (collective: full state dicts are gathered on rank 0)."""
            model_sd, optim_sd = distributed.full_state_dicts(module, optimizer)
            official = official_state_dict(trained, cfg) if not (cfg.fsdp and d.enabled) else None
            if d.is_main:
                if cfg.tune == "lora":
                    from rwkvkit.train.finetune import save_adapter

                    save_adapter(trained, out / ADAPTER_FILE)
                if official is None:  # FSDP: the gathered tensors, in the official key order
                    official = export_state_dict(model, DTYPES[cfg.save_dtype], tensors=model_sd)
                save_state_dict(official, model_path, metadata={"format": "pt"})
                save_training_state(
                    state_path,
                    step=step,
                    model_state=model_sd,
                    optimizer_state=optim_sd,
                    tokens_seen=tokens_seen,
                    elapsed=elapsed,
                    metrics_bytes=metrics_file.tell(),
                    config=cfg,
                )
            distributed.barrier(d)

        autocast = (
            torch.autocast(d.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
        )
        start = time.perf_counter()
        by_time = cfg.time_budget > 0
        bar = tqdm(
            total=round(cfg.time_budget) if by_time else cfg.steps,
            initial=min(round(elapsed_before), round(cfg.time_budget)) if by_time else start_step,
            disable=not (cfg.progress and d.is_main),
            unit="s" if by_time else "step",
            dynamic_ncols=True,
        )
        step, loss_value, val_loss = start_step, float("nan"), None
        accumulation = local_rows // micro_rows
        try:
            while step < cfg.steps:
                elapsed = elapsed_before + time.perf_counter() - start
                progress = step / cfg.steps
                if by_time:
                    progress = max(progress, elapsed / cfg.time_budget)
                    if distributed.broadcast_flag(progress >= 1.0, d):
                        break
                lr = lr_at(step, progress, cfg.lr, cfg.lr_final, cfg.warmup_steps)
                set_lr(optimizer, lr)
                loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
                for micro in range(accumulation):
                    first = d.rank * local_rows + micro * micro_rows
                    rows = slice(first, first + micro_rows)
                    x, y = sample_batch(tokens, step, cfg.batch_size, cfg.ctx_len, cfg.seed, rows=rows)
                    x, y = x.to(d.device), y.to(d.device)
                    share = micro_rows / local_rows  # of this process's mean loss (DDP averages processes)
                    with distributed.no_sync(module, sync=micro == accumulation - 1), autocast:
                        logits, _ = module(x)  # (B, T, V)
                        loss = loss_fn(logits, y)
                        objective = L2Wrap.apply(loss, logits) if cfg.l2wrap else loss
                        (objective * share).backward()
                    loss_sum += loss.detach().double() * share
                global_loss = (distributed.all_reduce_sum(loss_sum, d) / d.world_size).item()
                grad_norm = _clip_gradients(trained, cfg.grad_clip)
                step += 1
                if not (math.isfinite(global_loss) and math.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    if d.is_main:
                        log.warning(
                            "step %d: non-finite %s, update skipped",
                            step,
                            "loss" if not math.isfinite(global_loss) else "gradient norm",
                        )
                    record({"step": step, "skipped": True, "loss": None, "lr": lr})
                    continue
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tokens_seen += cfg.batch_size * cfg.ctx_len
                loss_value = global_loss
                elapsed = elapsed_before + time.perf_counter() - start
                entry = {
                    "step": step,
                    "loss": round(loss_value, 6),
                    "lr": lr,
                    "grad_norm": round(grad_norm, 4),
                    "tokens": tokens_seen,
                    "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
                    "elapsed_s": round(elapsed, 2),
                }
                if val is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    val_loss = evaluate(module, *val, batch_size=micro_rows)
                    entry["val_loss"] = round(val_loss, 6)
                record(entry)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save(step, elapsed)
                if d.is_main and cfg.plot_every and step % cfg.plot_every == 0:
                    save_loss_plot(metrics, out / "loss.png")
                bar.update(min(round(elapsed), bar.total) - bar.n if by_time else 1)
                bar.set_postfix(
                    step=step, loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", tok_s=f"{entry['tokens_per_s']:,.0f}"
                )
            if val is not None and not (cfg.eval_every and step % cfg.eval_every == 0 and step > start_step):
                val_loss = evaluate(module, *val, batch_size=micro_rows)
                record({"step": step, "val_loss": round(val_loss, 6)})
            elapsed = elapsed_before + time.perf_counter() - start
            save(step, elapsed)
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
        if d.is_main:
            save_loss_plot(metrics, out / "loss.png")
            log.info(
                "trained to step %d (%d tokens) in %.1fs; wrote %s", step, tokens_seen, elapsed, model_path
            )
        return TrainResult(model_path, step, tokens_seen, elapsed, loss_value, val_loss)
    finally:
        distributed.teardown(d)


def _clip_gradients(module, max_norm: float) -> float:
    """Clip the total gradient norm to ``max_norm`` (0: only measure it); returns the norm before."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _json_line(entry: dict) -> str:
    import json

    return json.dumps(entry) + "\n"


def _truncate_metrics(path: Path, size: int) -> list[dict]:
    """Cut metrics.jsonl back to its size at the saved step (a killed run may have gone further) and
    return its entries."""
    import json

    if not path.is_file():
        return []
    with open(path, "r+b") as f:
        f.truncate(size)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]
