"""Shared setup of the training tests: the settings of a tiny CPU training run (no assertions here)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

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


def torchrun_train(argv: list[str], processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=processes -m rwkvkit.train *argv`` on a free local port, one thread a
    process (the caller checks the return code: ``done.stderr`` says why it failed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "rwkvkit.train", *argv,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
