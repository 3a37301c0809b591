"""Training configuration: the ``TrainConfig`` dataclass, the help of its flags and its config files.

A run is one YAML or TOML file (``--config run.yaml``; its keys are the field names below) plus flags
on the command line, which override the file; fields given nowhere keep their defaults. Every field is
a flag (``n_layer`` -> ``--n-layer``; the command line builds them from the fields and FLAG_HELP), and
``--help`` prints each one with its help text and default.
``check_config`` rejects nonsensical settings with a one-line error before any work starts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rwkvkit.errors import RwkvkitError
from rwkvkit.train.objective import OBJECTIVE_NAMES


@dataclass
class TrainConfig:
    """Everything a training run needs. Each field is also a ``rwkvkit train`` flag (see FLAG_HELP)."""

    # data
    data: str = "data/shakespeare/train.txt"
    val_data: str = ""
    tokenizer: str = "byte"
    # the model: new (version and shape) or an official checkpoint to fine-tune
    init_from: str = ""
    version: str = "7"
    n_layer: int = 4
    n_embd: int = 128
    head_size: int = 32
    # what to train
    tune: str = "full"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    freeze: list[str] = field(default_factory=list)
    train_only: list[str] = field(default_factory=list)
    # the objective and how windows are formed
    objective: str = "lm"
    pack: bool = False
    seq_len: int = 0
    state_grad_windows: int = 1
    # preference tuning (--objective dpo)
    dpo_beta: float = 0.1
    dpo_sft_weight: float = 0.0
    # reinforcement learning with verifiable rewards (--objective grpo)
    reward: str = ""
    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    kl_coef: float = 0.04
    clip_eps: float = 0.2
    # batches and schedule
    ctx_len: int = 256
    batch_size: int = 16
    micro_batch_size: int = 0
    steps: int = 1000
    time_budget: float = 0.0
    lr: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    l2wrap: bool = True
    precision: str = "fp32"
    grad_checkpoint: bool = False
    fsdp: bool = False
    # outputs
    out: str = "runs/train"
    save_every: int = 0
    save_dtype: str = "fp32"
    eval_every: int = 0
    eval_tokens: int = 0
    plot_every: int = 50
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


FLAG_HELP = {
    "data": "training data: a UTF-8 .txt file, a .jsonl ({'text': ...} per line), a .parquet ('text' "
    "column), a binidx prefix (.bin + .idx, as rwkvkit data or RWKV-LM write) or a .npy of token ids",
    "val_data": "validation data, same kinds as --data (optional)",
    "tokenizer": "'byte' (256 symbols, for small models), 'world' (RWKV World, 65536), a World vocab file or "
    "a tokenizer.json; a fine-tuned checkpoint's vocabulary size must match it",
    "init_from": "fine-tune this official checkpoint (.pth or .safetensors) instead of starting from "
    "scratch; its version and shape replace --version, --n-layer, --n-embd and --head-size",
    "version": "RWKV version of a new model: 4, 5.2 (or 5), 6 or 7",
    "n_layer": "number of blocks of a new model",
    "n_embd": "width C of a new model",
    "head_size": "head size N of a new model (C must be a multiple of it; RWKV-4 has no heads)",
    "tune": "what to train: 'full' (every parameter not frozen), 'lora' (low-rank adapters on the "
    "projection matrices, through peft; the written .pth has them merged) or 'state' (only each layer's "
    "initial wkv state, written as att.time_state; RWKV-5.2/6/7)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (the adapter's output is scaled by alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "freeze": "do not train parameters whose name matches this glob, e.g. 'emb.weight' or 'blocks.0.*' "
    "(repeatable)",
    "train_only": "train only parameters whose name matches this glob (repeatable); everything else is "
    "frozen",
    "objective": "what to optimise: 'lm' (next-token prediction; chat data trains the assistant's tokens "
    "only), 'dpo' (preference pairs: .jsonl with prompt / chosen / rejected) or 'grpo' (rewards from "
    "--reward on completions sampled for .jsonl prompts)",
    "pack": "treat each window as packed documents: at every end-of-text id 0 (which rwkvkit data writes "
    "after each document) the WKV state and the token shifts restart, so the 0 begins the next document "
    "and each document trains as if it ran alone",
    "seq_len": "infinite-context training: each sequence is this many tokens, run in --ctx-len windows "
    "with the state (WKV and token shifts) carried from window to window; memory is that of a window, "
    "the loss is the whole sequence's; validation runs in sequences of this length too (0 = off: "
    "sequences are one window)",
    "state_grad_windows": "with --seq-len: the gradient flows through the carried state across groups of "
    "this many consecutive windows and is cut between groups (1 = cut at every window boundary; "
    "seq_len / ctx_len = the exact whole-sequence gradient); memory stays one window's, each window "
    "of a group but its last runs forward twice",
    "dpo_beta": "DPO: strength of the implicit KL constraint to the reference model (beta)",
    "dpo_sft_weight": "DPO: weight of an added language-model loss on the chosen completion (its mean "
    "negative log-likelihood per token, as TRL's rpo_alpha); keeps the likelihood of preferred text from "
    "falling (0 = plain DPO)",
    "reward": "GRPO: the reward, 'module:function' (a Python function (prompt, completion) -> float; "
    "module may be a .py path) or a verifier script path (prompt and completion as JSON on stdin, "
    "the reward printed on stdout)",
    "group_size": "GRPO: completions sampled per prompt (>= 2; they share one prefill of the prompt)",
    "max_new_tokens": "GRPO: most tokens sampled per completion",
    "temperature": "GRPO: sampling temperature of the rollouts",
    "kl_coef": "GRPO: weight of the KL penalty to the reference model (0 = none)",
    "clip_eps": "GRPO: clipping range of the policy ratio (PPO-style)",
    "ctx_len": "training window length in tokens",
    "batch_size": "sequences per optimizer step, summed over all processes (--objective grpo: prompts per "
    "step, each sampled --group-size times; --objective dpo: preference pairs per step)",
    "micro_batch_size": "sequences per forward/backward on one process; gradients are accumulated over "
    "batch_size / (processes * micro_batch_size) of them (0 = no accumulation)",
    "steps": "number of optimizer steps; also the horizon of the cosine schedule",
    "time_budget": "stop after this many seconds of training (0 = no limit); the schedule then follows "
    "elapsed time",
    "lr": "peak learning rate (after warmup)",
    "lr_final": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay, applied to 2-D weight matrices only",
    "grad_clip": "clip the gradient norm to this value (0 = off)",
    "l2wrap": "apply the L2Wrap logit regulariser (--no-l2wrap to turn it off)",
    "precision": "'fp32', or 'bf16': bf16 autocast for the matmuls with fp32 master weights (the WKV "
    "recurrence and the norms stay fp32)",
    "grad_checkpoint": "recompute each block in the backward instead of storing its activations (less "
    "memory, ~30%% more compute)",
    "fsdp": "shard parameters, gradients and optimizer state over the processes (FSDP2, fully_shard) "
    "instead of replicating them (DDP); for models that do not fit one device",
    "out": "output folder: model.pth, train_state.pt, metrics.jsonl, loss.png, train_config.json (and "
    "adapter.safetensors for --tune lora)",
    "save_every": "write model.pth and the resumable train_state.pt every N steps (0 = only at the end)",
    "save_dtype": "dtype of the written model.pth: fp32, bf16 or fp16",
    "eval_every": "evaluate the validation loss every N steps (0 = only at the end)",
    "eval_tokens": "use at most this many validation tokens per evaluation (0 = all)",
    "plot_every": "redraw loss.png every N steps (0 = only at the end)",
    "resume": "continue the run in --out from its train_state.pt (same data order, schedule and RNG)",
    "seed": "random seed for initialisation and data order",
    "device": "torch device to train on, e.g. cpu, cuda, mps (under torchrun each process takes "
    "cuda:LOCAL_RANK)",
    "progress": "show a progress bar (--no-progress to turn it off)",
}

SAVE_DTYPES = ("fp32", "bf16", "fp16")
TUNE_MODES = ("full", "lora", "state")
PRECISIONS = ("fp32", "bf16")
VERSION_ALIASES = {"4": "4", "5": "5.2", "5.2": "5.2", "6": "6", "7": "7"}
LIST_FIELDS = {"freeze", "train_only"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML or TOML file, checked against the TrainConfig fields and their types."""
    path = Path(path)
    if not path.is_file():
        raise RwkvkitError(f"no such config file: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            raise RwkvkitError(f"config file {path} must be .yaml, .yml or .toml")
    except RwkvkitError:
        raise
    except Exception as e:  # the parsers' own error types
        detail = " ".join(str(e).split())
        raise RwkvkitError(f"config file {path} is not valid {suffix[1:].upper()}: {detail}") from None
    if not isinstance(data, dict):
        raise RwkvkitError(f"config file {path} must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in data.items()}


def _coerce(name: str, value: Any, default: Any, source: str) -> Any:
    """``value`` as the type of the field's default; RwkvkitError naming the option otherwise."""
    if name in LIST_FIELDS:
        return _coerce_patterns(name, value, source)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RwkvkitError(f"{source}: '{name}' must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (int, float)) and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return type(default)(value)
        except ValueError:
            pass
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. version: 7
    if not isinstance(value, type(default)) or isinstance(value, bool):
        raise RwkvkitError(f"{source}: '{name}' must be a {type(default).__name__}, got {value!r}")
    return value


def _coerce_patterns(name: str, value: Any, source: str) -> list[str]:
    """A list field (``freeze``, ``train_only``): one pattern or a list of them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise RwkvkitError(f"{source}: '{name}' must be a list of name patterns, got {value!r}")


def config_from_settings(given: Mapping[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """Defaults, then the settings of ``config_file`` (if any), then ``given`` (e.g. the flags given on the
    command line, already of the fields' types)."""
    known = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}
    values = dict(known)
    if config_file:
        for name, value in read_config_file(config_file).items():
            if name not in known:
                raise RwkvkitError(f"config file {config_file}: unknown option '{name}'")
            values[name] = _coerce(name, value, known[name], f"config file {config_file}")
    unknown = set(given) - set(known)
    if unknown:
        raise RwkvkitError(f"unknown training option '{sorted(unknown)[0]}'")
    values.update(given)
    return TrainConfig(**values)


def check_config(cfg: TrainConfig) -> None:
    """Reject nonsensical settings with a one-line error before any work starts (normalises version)."""
    _check_counts(cfg)
    if cfg.version not in VERSION_ALIASES:
        raise RwkvkitError(f"--version must be one of 4, 5.2, 6, 7, got {cfg.version}")
    cfg.version = VERSION_ALIASES[cfg.version]
    if not cfg.init_from and cfg.version != "4" and cfg.n_embd % cfg.head_size:
        raise RwkvkitError(f"--n-embd {cfg.n_embd} must be a multiple of --head-size {cfg.head_size}")
    if not cfg.lr > 0 or cfg.lr_final < 0:
        raise RwkvkitError("--lr must be > 0 and --lr-final >= 0")
    for name, allowed in (("save_dtype", SAVE_DTYPES), ("tune", TUNE_MODES), ("precision", PRECISIONS)):
        if getattr(cfg, name) not in allowed:
            raise RwkvkitError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(cfg, name)}")
    _check_tuning(cfg)
    _check_objective(cfg)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_counts(cfg: TrainConfig) -> None:
    """Sizes and step counts: positive, or >= 0 where 0 means "off"."""
    positive = ["ctx_len", "batch_size", "steps"]
    if not cfg.init_from:
        positive += ["n_layer", "n_embd", "head_size"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise RwkvkitError(f"{_flag(name)} must be positive, got {getattr(cfg, name)}")
    for name in ("micro_batch_size", "save_every", "eval_every", "eval_tokens", "plot_every", "warmup_steps"):
        if getattr(cfg, name) < 0:
            raise RwkvkitError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")


def _check_tuning(cfg: TrainConfig) -> None:
    """The LoRA settings, and the options that only go with some --tune modes."""
    if cfg.tune == "lora" and (cfg.lora_r <= 0 or cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1):
        raise RwkvkitError("--lora-r and --lora-alpha must be positive and --lora-dropout in [0, 1)")
    if cfg.tune == "lora" and cfg.fsdp:
        raise RwkvkitError("--fsdp with --tune lora is not supported; LoRA runs replicate the model (DDP)")
    if cfg.tune != "full" and (cfg.freeze or cfg.train_only):
        raise RwkvkitError(f"--freeze / --train-only apply to --tune full, not to --tune {cfg.tune}")


def _check_objective(cfg: TrainConfig) -> None:
    """The objective and the options of the window forms (packing, infinite context)."""
    if cfg.objective not in OBJECTIVE_NAMES:
        raise RwkvkitError(f"--objective must be one of {', '.join(OBJECTIVE_NAMES)}, got {cfg.objective}")
    if cfg.seq_len < 0 or cfg.state_grad_windows < 1:
        raise RwkvkitError("--seq-len must be >= 0 and --state-grad-windows >= 1")
    if cfg.seq_len and cfg.seq_len % cfg.ctx_len:
        raise RwkvkitError(f"--seq-len {cfg.seq_len} must be a multiple of --ctx-len {cfg.ctx_len}")
    if cfg.objective != "lm" and (cfg.pack or cfg.seq_len):
        raise RwkvkitError(f"--pack and --seq-len go with --objective lm, not {cfg.objective}")
    if cfg.pack and cfg.seq_len:
        raise RwkvkitError(
            "--pack restarts the state inside a window and --seq-len carries it across: choose one"
        )


def config_to_json(cfg: TrainConfig) -> str:
    return json.dumps(asdict(cfg), indent=2) + "\n"
