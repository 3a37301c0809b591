"""The metrics log of a training run: ``metrics.jsonl`` (one JSON object per step) and ``loss.png``.

Rank 0 appends each entry to the file as soon as it is recorded (flushed, so a killed run keeps what it
logged). A resumed run first cuts the file back to the size it had at the saved step (a killed run may
have logged steps after it), so the file holds each step once. The plot shows training and validation
loss and the learning rate against step, and is redrawn from the entries held in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """The entries of ``metrics.jsonl``; ``write`` says whether this process writes files (rank 0)."""

    def __init__(self, path: Path, write: bool) -> None:
        self.path = path
        self.write = write
        self.entries: list[dict] = []
        self._file: IO[str] | None = None

    def truncate(self, size: int) -> None:
        """Cut the file back to ``size`` bytes (its size at the saved step) and hold its entries."""
        if self.write:
            self.entries = _truncate_metrics(self.path, size)

    def open(self) -> None:
        """Start appending (the output folder must exist)."""
        if self.write:
            self._file = open(self.path, "a")  # noqa: SIM115 (closed by close())

    def record(self, entry: dict) -> None:
        self.entries.append(entry)
        if self._file is not None:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()

    def tell(self) -> int:
        """The file's size so far (what a resumed run truncates it to); 0 where nothing is written."""
        return self._file.tell() if self._file is not None else 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def plot(self, path: Path) -> None:
        """Redraw the loss plot at ``path`` (rank 0 only)."""
        if self.write:
            save_loss_plot(self.entries, path)


def _truncate_metrics(path: Path, size: int) -> list[dict]:
    """Cut metrics.jsonl back to ``size`` bytes and return its entries ([] when there is no file)."""
    if not path.is_file():
        return []
    with open(path, "r+b") as f:
        f.truncate(size)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_loss_plot(metrics: list[dict], path: Path) -> None:
    """Training and validation loss, and the learning rate, against step, written as a PNG (atomically)."""
    # matplotlib is an optional extra (rwkvkit[train]): imported only when a plot is drawn
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
