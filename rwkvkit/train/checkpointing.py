"""The resumable training state: what ``--resume`` needs to continue a run exactly where it stopped.

``train_state.pt`` holds the step, the complete fp32 model and optimizer state (keyed by parameter name),
the RNG state, the tokens seen, the training seconds spent and the size the metrics file had. The data
needs no position: batches are a pure function of (seed, step). The file is written atomically (temp file
+ rename, :func:`rwkvkit.checkpoint.atomic_write`), so a run killed at any moment leaves either the
previous state or the new one, never a torn file; it is read with ``weights_only=True``.

Settings that change what the run computes (data, model shape, tuning mode, batch, seed, ...) must match
the saved run; the schedule length, output and logging options may change on resume.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

from rwkvkit.checkpoint import atomic_write
from rwkvkit.errors import RwkvkitError
from rwkvkit.train.config import TrainConfig

TRAIN_STATE = "train_state.pt"
FORMAT = "rwkvkit-train-state-v1"

# TrainConfig fields a resumed run must share with the saved one (the rest may change).
MUST_MATCH = (
    "data",
    "tokenizer",
    "init_from",
    "version",
    "n_layer",
    "n_embd",
    "head_size",
    "tune",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "freeze",
    "train_only",
    "ctx_len",
    "batch_size",
    "seed",
    "precision",
)


def save_training_state(
    path: Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    tokens_seen: int,
    elapsed: float,
    metrics_bytes: int,
    config: TrainConfig,
) -> None:
    """Write the resumable state atomically (rank 0 only)."""
    state = {
        "format": FORMAT,
        "step": step,
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": {"torch": torch.get_rng_state()},
        "tokens_seen": tokens_seen,
        "elapsed": elapsed,
        "metrics_bytes": metrics_bytes,
        "config": asdict(config),
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path, config: TrainConfig) -> dict:
    """The saved state, after checking it belongs to a run with the same settings as ``config``."""
    if not path.is_file():
        raise RwkvkitError(f"nothing to resume: {path} does not exist (was the run saved? see --save-every)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RwkvkitError(f"{path} is not a readable training state ({detail})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RwkvkitError(f"{path} is not an rwkvkit training state")
    saved = state["config"]
    known = {f.name for f in fields(TrainConfig)}
    for name in MUST_MATCH:
        if name in known and saved.get(name) != getattr(config, name):
            raise RwkvkitError(
                f"cannot resume {path}: it was trained with {name}={saved.get(name)!r}, this run has "
                f"{name}={getattr(config, name)!r}"
            )
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
