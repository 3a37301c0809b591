"""The training loop behind ``rwkvkit train``: a from-scratch RWKV (version 4, 5.2, 6 or 7) on a text file.

Trains in parallel ("GPT") mode with the chunked WKV operator, writes an official-layout `.pth`
(loadable by the reference ``rwkv`` package), a JSONL metrics file and a loss-curve PNG, and shows a
progress bar with loss and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkvkit.errors import RwkvkitError

log = logging.getLogger("rwkvkit.train")


@dataclass
class TrainConfig:
    """Everything a training run needs. Each field is also a ``rwkvkit train`` flag."""

    data: str = "data/shakespeare/train.txt"  # UTF-8 text file to train on
    val_data: str = ""  # optional UTF-8 text file for validation loss
    out: str = "runs/train"  # output folder: model.pth, metrics.jsonl, loss.png
    tokenizer: str = "byte"  # "byte" (256 symbols) or "world" (65536)
    version: str = "7"  # RWKV version: "4", "5.2" (also "5"), "6" or "7"
    n_layer: int = 4
    n_embd: int = 128
    head_size: int = 32
    ctx_len: int = 256  # training window length in tokens
    batch_size: int = 16
    steps: int = 1000  # optimizer steps (the schedule's horizon)
    time_budget: float = 0.0  # seconds; > 0 ends training (and the schedule) early when time runs out
    lr: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    l2wrap: bool = True
    eval_every: int = 0  # steps between validation evaluations (0: only at the end)
    eval_tokens: int = 0  # cap on validation tokens per evaluation (0: all)
    save_dtype: str = "fp32"  # dtype of the written .pth: fp32, bf16 or fp16
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


FLAG_HELP = {
    "data": "UTF-8 text file to train on",
    "val_data": "UTF-8 text file for validation loss (optional)",
    "out": "output folder for model.pth, metrics.jsonl, loss.png and train_config.json",
    "tokenizer": "tokenizer: 'byte' (256 symbols, for small models) or 'world' (RWKV World, 65536)",
    "version": "RWKV version to train: 4, 5.2 (or 5), 6 or 7",
    "n_layer": "number of blocks",
    "n_embd": "model width C",
    "head_size": "head size N (C must be a multiple of it; RWKV-4 has no heads and ignores it)",
    "ctx_len": "training window length in tokens",
    "batch_size": "sequences per optimizer step",
    "steps": "number of optimizer steps; also the horizon of the cosine schedule",
    "time_budget": "stop after this many seconds (0 = no limit); the schedule then follows elapsed time",
    "lr": "peak learning rate (after warmup)",
    "lr_final": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay, applied to 2-D weight matrices only",
    "grad_clip": "clip the gradient norm to this value (0 = off)",
    "l2wrap": "apply the L2Wrap logit regulariser (use --no-l2wrap to turn off)",
    "eval_every": "evaluate validation loss every N steps (0 = only at the end)",
    "eval_tokens": "use at most this many validation tokens per evaluation (0 = all)",
    "save_dtype": "dtype of the written checkpoint: fp32, bf16 or fp16",
    "seed": "random seed for initialisation and data order",
    "device": "torch device to train on, e.g. cpu, cuda, mps",
    "progress": "show a progress bar (use --no-progress to turn off)",
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Fill ``parser`` with one flag per TrainConfig field."""
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{FLAG_HELP[f.name]} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


VERSION_ALIASES = {"4": "4", "5": "5.2", "5.2": "5.2", "6": "6", "7": "7"}


def check_config(cfg: TrainConfig) -> None:
    """Reject nonsensical settings with a one-line error before any work starts."""
    positive = ["n_layer", "n_embd", "head_size", "ctx_len", "batch_size", "steps"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise RwkvkitError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.version not in VERSION_ALIASES:
        raise RwkvkitError(f"--version must be one of 4, 5.2, 6, 7, got {cfg.version}")
    cfg.version = VERSION_ALIASES[cfg.version]
    if cfg.n_embd % cfg.head_size and cfg.version != "4":
        raise RwkvkitError(f"--n-embd {cfg.n_embd} must be a multiple of --head-size {cfg.head_size}")
    if not cfg.lr > 0 or cfg.lr_final < 0:
        raise RwkvkitError("--lr must be > 0 and --lr-final >= 0")
    if cfg.save_dtype not in DTYPES:
        raise RwkvkitError(f"--save-dtype must be one of {', '.join(DTYPES)}, got {cfg.save_dtype}")
    if cfg.tokenizer not in ("byte", "world"):
        raise RwkvkitError(f"--tokenizer must be 'byte' or 'world', got {cfg.tokenizer}")


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats per token) over windows x, y (W, T), each run from a zero state."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(model.device), y[i : i + batch_size].to(model.device)
        logits, _ = model(xb)
        total += F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
        count += yb.numel()
    model.train(was_training)
    return total / count


def save_loss_plot(metrics: list[dict], path: Path) -> None:
    """Training (and validation, if any) loss against step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
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


def train(cfg: TrainConfig) -> TrainResult:
    """Train a new RWKV from scratch as ``cfg`` says; returns where the model went and the final losses."""
    from tqdm import tqdm

    from rwkvkit.models import new_model, save_model
    from rwkvkit.tokenizer import load_tokenizer
    from rwkvkit.train.data import eval_windows, load_text_tokens, sample_batch
    from rwkvkit.train.optim import L2Wrap, lr_at, make_optimizer, set_lr

    check_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    tokenizer = load_tokenizer(cfg.tokenizer)
    tokens = load_text_tokens(cfg.data, tokenizer)
    val = None
    if cfg.val_data:
        val_tokens = load_text_tokens(cfg.val_data, tokenizer)
        if cfg.eval_tokens:
            val_tokens = val_tokens[: cfg.eval_tokens + 1]
        val = eval_windows(val_tokens, cfg.ctx_len)

    torch.manual_seed(cfg.seed)
    model = new_model(cfg.version, cfg.n_layer, cfg.n_embd, tokenizer.vocab_size, cfg.head_size, cfg.device)
    model_config = model.config
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s, %.2fM parameters, %d training tokens", model_config.describe(), n_params / 1e6, tokens.size
    )
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)

    metrics: list[dict] = []
    metrics_file = open(out / "metrics.jsonl", "w")  # noqa: SIM115 (closed in finally)

    def record(entry: dict) -> None:
        metrics.append(entry)
        metrics_file.write(json.dumps(entry) + "\n")
        metrics_file.flush()

    start = time.perf_counter()
    tokens_seen, step, loss_value, val_loss = 0, 0, float("nan"), None
    # With a time budget the bar counts seconds (its ETA is then right); otherwise it counts steps.
    by_time = cfg.time_budget > 0
    bar = tqdm(
        total=round(cfg.time_budget) if by_time else cfg.steps,
        disable=not cfg.progress,
        unit="s" if by_time else "step",
        dynamic_ncols=True,
    )
    try:
        while step < cfg.steps:
            elapsed = time.perf_counter() - start
            progress = step / cfg.steps
            if cfg.time_budget > 0:
                progress = max(progress, elapsed / cfg.time_budget)
                if progress >= 1.0:
                    break
            lr = lr_at(step, progress, cfg.lr, cfg.lr_final, cfg.warmup_steps)
            set_lr(optimizer, lr)
            x, y = sample_batch(tokens, step, cfg.batch_size, cfg.ctx_len, cfg.seed)
            x, y = x.to(cfg.device), y.to(cfg.device)
            logits, _ = model(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            if not torch.isfinite(loss):
                log.warning("step %d: non-finite loss %s, skipping the update", step, loss.item())
                optimizer.zero_grad(set_to_none=True)
                record({"step": step, "skipped": True, "loss_nonfinite": str(loss.item())})
                step += 1
                continue
            (L2Wrap.apply(loss, logits) if cfg.l2wrap else loss).backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                if cfg.grad_clip > 0
                else float("nan")
            )
            if math.isfinite(grad_norm) or cfg.grad_clip <= 0:
                optimizer.step()
            else:
                log.warning("step %d: non-finite gradient norm, skipping the update", step)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += x.numel()
            loss_value = loss.item()
            elapsed = time.perf_counter() - start
            entry = {
                "step": step,
                "loss": round(loss_value, 5),
                "lr": lr,
                "grad_norm": round(grad_norm, 4),
                "tokens": tokens_seen,
                "tokens_per_s": round(tokens_seen / elapsed, 1),
                "elapsed_s": round(elapsed, 2),
            }
            if val is not None and cfg.eval_every and step % cfg.eval_every == 0:
                val_loss = evaluate(model, *val, batch_size=cfg.batch_size)
                entry["val_loss"] = round(val_loss, 5)
            record(entry)
            bar.update(min(round(elapsed), bar.total) - bar.n if by_time else 1)
            bar.set_postfix(
                step=step, loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_seen / elapsed:,.0f}"
            )
        if val is not None and not (cfg.eval_every and step % cfg.eval_every == 0 and step > 0):
            val_loss = evaluate(model, *val, batch_size=cfg.batch_size)
            record({"step": step, "val_loss": round(val_loss, 5)})
    finally:
        bar.close()
        metrics_file.close()
    seconds = time.perf_counter() - start
    model_path = out / "model.pth"
    save_model(model, model_path, dtype=DTYPES[cfg.save_dtype])
    save_loss_plot(metrics, out / "loss.png")
    log.info("trained %d steps (%d tokens) in %.1fs; wrote %s", step, tokens_seen, seconds, model_path)
    return TrainResult(model_path, step, tokens_seen, seconds, loss_value, val_loss)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit train``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train(config_from_args(args))
    print(f"model: {result.model_path}")
    print(f"final training loss: {result.final_loss:.4f}")
    if result.val_loss is not None:
        print(f"validation loss: {result.val_loss:.4f} nats/token")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rwkvkit train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["TrainConfig", "TrainResult", "add_arguments", "evaluate", "run", "train"]
