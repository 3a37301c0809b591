"""Checkpoints of a training run: ``model.pth``, ``train_state.pt`` and a LoRA run's adapter file.

:class:`Checkpointer` writes all three every ``save_every`` steps and at the end (a collective: full
state dicts are gathered on rank 0, which alone writes), and reads ``train_state.pt`` back for
``--resume``. ``model.pth`` is the official layout (LoRA merged, tuned states as ``att.time_state``, in
``save_dtype``); ``adapter.safetensors`` holds a LoRA run's adapter alone (``rwkvkit merge`` puts it
into a base).

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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from rwkvkit.checkpoint import atomic_write, save_state_dict
from rwkvkit.errors import RwkvkitError
from rwkvkit.models import export_state_dict
from rwkvkit.models.common import RWKVModel
from rwkvkit.train import distributed, finetune
from rwkvkit.train.config import TrainConfig

TRAIN_STATE = "train_state.pt"
MODEL_FILE = "model.pth"
ADAPTER_FILE = "adapter.safetensors"  # LoRA runs: the adapter alone (rwkvkit merge puts it into a base)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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
    "objective",
    "pack",
    "seq_len",
    "state_grad_windows",
    "dpo_beta",
    "dpo_sft_weight",
    "reward",
    "group_size",
    "max_new_tokens",
    "temperature",
    "kl_coef",
    "clip_eps",
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
    defaults = TrainConfig()  # a setting newer than the saved run had its default there
    known = {f.name for f in fields(TrainConfig)}
    for name in MUST_MATCH:
        if name in known and saved.get(name, getattr(defaults, name)) != getattr(config, name):
            raise RwkvkitError(
                f"cannot resume {path}: it was trained with {name}={saved.get(name)!r}, this run has "
                f"{name}={getattr(config, name)!r}"
            )
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


# ---------------------------------------------------------------------------------------------- a run's files


@dataclass
class ModelParts:
    """The model of a run, seen three ways."""

    model: RWKVModel  # the RWKV model itself (inside any peft wrapper)
    trained: nn.Module  # what tuning and the optimizer see: the model, or its peft (LoRA) wrapper
    module: nn.Module  # what the loop calls: ``trained``, its DDP replica, or itself sharded by FSDP


def official_state_dict(trained: nn.Module, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The official-layout tensors of the trained model (LoRA merged, without changing the model)."""
    dtype = DTYPES[cfg.save_dtype]
    if cfg.tune == "lora":
        return finetune.merged_state_dict(trained, dtype=dtype)
    return export_state_dict(trained, dtype=dtype)


class Checkpointer:
    """Writes a run's checkpoint files into ``cfg.out`` and reads its training state back."""

    def __init__(self, cfg: TrainConfig, world: distributed.Distributed) -> None:
        self.cfg = cfg
        self.world = world
        out = Path(cfg.out)
        self.model_path = out / MODEL_FILE
        self.state_path = out / TRAIN_STATE
        self.adapter_path = out / ADAPTER_FILE

    def load(self) -> dict:
        """The saved training state of the run in ``cfg.out`` (checked against ``cfg``)."""
        return load_training_state(self.state_path, self.cfg)

    def restore(self, saved: dict, parts: ModelParts, optimizer: torch.optim.Optimizer) -> None:
        """Put the saved weights, optimizer state and RNG state back (every process)."""
        distributed.load_full_state_dicts(
            parts.module, optimizer, saved["model"], saved["optimizer"], self.world
        )
        restore_rng(saved)

    def save(
        self,
        parts: ModelParts,
        optimizer: torch.optim.Optimizer,
        *,
        step: int,
        tokens_seen: int,
        elapsed: float,
        metrics_bytes: int,
    ) -> None:
        """model.pth, train_state.pt and the adapter (collective: full state dicts are gathered on rank 0)."""
        cfg = self.cfg
        model_sd, optim_sd = distributed.full_state_dicts(parts.module, optimizer)
        sharded = cfg.fsdp and self.world.enabled
        official = None if sharded else official_state_dict(parts.trained, cfg)
        if self.world.is_main:
            if cfg.tune == "lora":
                finetune.save_adapter(parts.trained, self.adapter_path)
            if official is None:  # FSDP: the gathered tensors, in the official key order
                official = export_state_dict(parts.model, DTYPES[cfg.save_dtype], tensors=model_sd)
            save_state_dict(official, self.model_path, metadata={"format": "pt"})
            save_training_state(
                self.state_path,
                step=step,
                model_state=model_sd,
                optimizer_state=optim_sd,
                tokens_seen=tokens_seen,
                elapsed=elapsed,
                metrics_bytes=metrics_bytes,
                config=cfg,
            )
        distributed.barrier(self.world)
