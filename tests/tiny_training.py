"""Shared setup of the training tests: the settings of a tiny CPU training run (no assertions here)."""

from __future__ import annotations

import os

from rwkvkit.train.config import TrainConfig

# What every tiny run of the training tests shares: a 2-layer model with heads of 16, batches of 8 at
# lr 3e-3, no progress bar. Each test adds its width, context, steps and warm-up.
TINY_RUN = dict(n_layer=2, head_size=16, batch_size=8, lr=3e-3, progress=False)


def tiny_config(
    data: str | os.PathLike, val_data: str | os.PathLike, out: str | os.PathLike, /, **settings
) -> TrainConfig:
    """A TrainConfig of a tiny run on these files; ``settings`` add to TINY_RUN or override any of it
    (the files too: ``val_data=""`` for no validation)."""
    files = {"data": str(data), "val_data": str(val_data), "out": str(out)}
    return TrainConfig(**{**files, **TINY_RUN, **settings})
