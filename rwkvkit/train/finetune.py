"""Parameter-efficient fine-tuning: freezing by name, LoRA adapters (through ``peft``) and state tuning.

This module owns three ways to train a small part of a loaded RWKV model:

* :func:`freeze` / :func:`train_only`: switch ``requires_grad`` by fnmatch patterns on parameter names
  (the official checkpoint keys, e.g. ``"blocks.0.*"``, ``"*.att.*"``, ``"emb.weight"``).
* LoRA: :func:`apply_lora` wraps the model with ``peft`` (low-rank updates on the projection matrices,
  base weights frozen); :func:`save_adapter` / :func:`load_adapter` write and read only the LoRA tensors as
  `.safetensors` (with the LoRA settings and the base model's shape in the metadata); :func:`merge_lora`
  folds the update into the weights and gives back a plain model whose ``save_model`` file is an ordinary
  official `.pth`. :func:`merge_adapter_file` does that from files (``rwkvkit merge``).
* State tuning: :func:`enable_state_tuning` gives every layer of an RWKV-5.2/6/7 model a trainable initial
  wkv state ``att.time_state`` (H, N, N) [value, key] and freezes everything else; the model starts every
  sequence from it and ``save_model`` writes it under the official key ``blocks.{i}.att.time_state``.

``peft`` is imported only inside the LoRA functions, so the rest of rwkvkit works without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from rwkvkit.checkpoint import SAFETENSORS_SUFFIX, load_state_dict, save_state_dict
from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.models import export_state_dict, load_model, save_model
from rwkvkit.models.common import PROJECTION_SUFFIXES, RWKVModel

# LoRA goes on the projection matrices of both mixes; ``head`` (and ``emb``) are left out on purpose.
DEFAULT_LORA_TARGETS: tuple[str, ...] = PROJECTION_SUFFIXES

ADAPTER_FORMAT = "rwkvkit-lora-1"  # the "rwkvkit_adapter" metadata value of the files save_adapter writes
LORA_MARKER = "lora_"  # in the name of every parameter peft adds (lora_A, lora_B)
STATE_TUNING_VERSIONS = ("5.2", "6", "7")
# Where a new att.time_state key goes in a loaded file's key order: right after this key of its layer
# (the place the official state-tuning files and tests/checkpoints.py put it).
TIME_STATE_ANCHOR = {"5.2": "time_faaaa", "6": "time_faaaa", "7": "r_k"}


# ---------------------------------------------------------------------------------------------- freezing


def _matching_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the parameters matching any pattern; every pattern must match at least one name."""
    if isinstance(patterns, str):
        raise RwkvkitError(f"patterns must be a list of strings, got the string {patterns!r}")
    if not patterns:
        raise RwkvkitError("no parameter name patterns given")
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            example = names[0] if names else "none"
            raise RwkvkitError(f"pattern '{pattern}' matches no parameter (names look like '{example}')")
    return [name for name in names if any(fnmatchcase(name, p) for p in patterns)]


def freeze(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad = False`` on every parameter whose name matches one of the fnmatch patterns.

    Returns the names frozen. A pattern that matches no parameter is an error (RwkvkitError naming it).
    """
    frozen = _matching_names(model, patterns)
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def train_only(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Make the parameters matching the fnmatch patterns trainable and freeze all others.

    Returns the trainable names. A pattern that matches no parameter is an error (RwkvkitError naming it).
    """
    trainable = set(_matching_names(model, patterns))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return [name for name, _ in model.named_parameters() if name in trainable]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad``."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------- LoRA


def _peft():
    """The ``peft`` module, or a clear RwkvkitError when it is not installed."""
    try:
        import peft
    except ImportError:
        raise RwkvkitError("LoRA needs the 'peft' package: pip install 'rwkvkit[train]'") from None
    return peft


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _base_of(peft_model: nn.Module) -> RWKVModel:
    """The RWKV model inside a peft wrapper (with its LoRA layers injected)."""
    if not _is_peft_model(peft_model):
        raise RwkvkitError(
            f"expected a LoRA-wrapped model (from apply_lora), got {type(peft_model).__name__}"
        )
    base = peft_model.get_base_model()
    if not isinstance(base, RWKVModel):
        raise RwkvkitError(f"the LoRA-wrapped model is a {type(base).__name__}, not an rwkvkit RWKV model")
    return base


def _matches_target(module_name: str, target: str) -> bool:
    """peft's rule for a list of target_modules: the module name is the target or ends with '.' + target."""
    return module_name == target or module_name.endswith("." + target)


def resolve_lora_targets(model: RWKVModel, targets: Sequence[str]) -> list[str]:
    """The targets that name at least one ``nn.Linear`` of ``model``.

    Targets of DEFAULT_LORA_TARGETS that this version lacks (e.g. ``att.gate`` in RWKV-7) are dropped;
    any other target that matches no linear layer is an error naming it.
    """
    if isinstance(targets, str):
        raise RwkvkitError(f"targets must be a list of module names, got the string {targets!r}")
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    resolved = []
    for target in targets:
        if any(_matches_target(name, target) for name in linear):
            resolved.append(target)
        elif target not in DEFAULT_LORA_TARGETS:
            raise RwkvkitError(
                f"LoRA target '{target}' matches no linear layer of this RWKV-{model.config.version} model "
                f"(linear layers look like '{linear[0]}')"
            )
    if not resolved:
        raise RwkvkitError(f"no LoRA target matches a linear layer of this model (targets: {list(targets)})")
    return resolved


def apply_lora(
    model: RWKVModel,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
):
    """Wrap ``model`` with LoRA adapters of rank ``r`` on the ``targets`` projections (``peft``).

    Returns the ``peft.PeftModel``: only the LoRA weights (``lora_A``, ``lora_B``) are trainable, every
    base weight is frozen. It is called like the model (``logits, state = m(tokens, state)``: peft's
    wrapper hands all arguments to the base model) and ``m.config`` is the model's config. ``model`` is
    changed in place (its linear layers are replaced by LoRA layers wrapping them); the update starts at
    zero, so the wrapped model first computes exactly what the base model did.
    """
    if not isinstance(model, RWKVModel):
        raise RwkvkitError(f"apply_lora needs an rwkvkit RWKV model, got {type(model).__name__}")
    if int(r) != r or r < 1:
        raise RwkvkitError(f"LoRA rank r must be a positive integer, got {r}")
    if not alpha > 0:
        raise RwkvkitError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise RwkvkitError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if any(LORA_MARKER in name for name, _ in model.named_parameters()):
        raise RwkvkitError("this model already has LoRA layers; merge them first (merge_lora)")
    peft = _peft()
    config = peft.LoraConfig(
        r=int(r),
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=resolve_lora_targets(model, targets),
        bias="none",
    )
    return peft.get_peft_model(model, config)


def _lora_settings(peft_model) -> dict:
    """r, alpha, dropout and targets of the single plain-LoRA adapter of ``peft_model``."""
    peft = _peft()
    if len(peft_model.peft_config) != 1:
        raise RwkvkitError(f"expected one LoRA adapter, the model has {len(peft_model.peft_config)}")
    (config,) = peft_model.peft_config.values()
    plain = (
        isinstance(config, peft.LoraConfig)
        and not config.use_dora
        and not config.use_rslora
        and config.bias == "none"
        and isinstance(config.target_modules, (list, set, tuple))
    )
    if not plain:
        raise RwkvkitError("only plain LoRA adapters (as apply_lora makes them) can be saved")
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": sorted(config.target_modules),
    }


def save_adapter(peft_model, path: str | os.PathLike) -> None:
    """Write only the LoRA tensors of ``peft_model`` as `.safetensors` (atomically).

    Keys are peft's (``base_model.model.blocks.0.att.key.lora_A.weight``, as peft's own
    ``adapter_model.safetensors``); the metadata holds the LoRA settings (``lora``: r, alpha, dropout,
    targets) and the base model's config (``base_config``), which :func:`load_adapter` checks.
    """
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise RwkvkitError(f"an adapter is written as {SAFETENSORS_SUFFIX}, got '{path.name}'")
    base = _base_of(peft_model)
    settings = _lora_settings(peft_model)
    (adapter_name,) = peft_model.peft_config
    tensors = _peft().get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    metadata = {
        "format": "pt",
        "rwkvkit_adapter": ADAPTER_FORMAT,
        "rwkv_version": base.config.version,
        "lora": json.dumps(settings),
        "base_config": json.dumps(base.config.to_dict()),
    }
    save_state_dict(tensors, path, metadata=metadata)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, LoRA settings, base config dict) of an adapter file written by :func:`save_adapter`."""
    tensors = load_state_dict(path)  # checks the file and gives one-line errors
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("rwkvkit_adapter") != ADAPTER_FORMAT:
        raise RwkvkitError(f"{path} is not an rwkvkit LoRA adapter (no '{ADAPTER_FORMAT}' metadata)")
    try:
        return tensors, json.loads(metadata["lora"]), json.loads(metadata["base_config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise RwkvkitError(f"{path} has broken adapter metadata ({e})") from None


def _check_adapter_base(path: str | os.PathLike, saved: dict, config: ModelConfig) -> None:
    """Refuse an adapter made for a model of another version or shape (the tuned state does not matter)."""
    ignored = {"has_time_state"}
    ours = config.to_dict()
    differs = [k for k in ours if k not in ignored and saved.get(k) != ours[k]]
    if differs:
        try:
            theirs = ModelConfig(**saved).describe()
        except TypeError:
            theirs = "another model"
        details = ", ".join(f"{k} {saved.get(k)} vs {ours[k]}" for k in differs[:4])
        raise RwkvkitError(
            f"{path} is a LoRA adapter for {theirs}, not for this {config.describe()} model ({details})"
        )


def load_adapter(base_model: RWKVModel, path: str | os.PathLike):
    """Apply a saved adapter (from :func:`save_adapter`) to ``base_model``; returns the peft model.

    Refuses (RwkvkitError) an adapter made for a model of another version or shape before touching
    ``base_model``. The LoRA weights stay trainable, so training can go on.
    """
    if not isinstance(base_model, RWKVModel):
        raise RwkvkitError(f"load_adapter needs an rwkvkit RWKV model, got {type(base_model).__name__}")
    tensors, lora, saved_config = read_adapter(path)
    _check_adapter_base(path, saved_config, base_model.config)
    peft = _peft()
    peft_model = apply_lora(base_model, lora["r"], lora["alpha"], lora["dropout"], lora["targets"])
    try:
        expected = peft.get_peft_model_state_dict(peft_model)
        missing = [k for k in expected if k not in tensors]
        unexpected = [k for k in tensors if k not in expected]
        if missing or unexpected:
            raise RwkvkitError(
                f"{path} does not fit this model: {len(missing)} LoRA tensor(s) missing, "
                f"{len(unexpected)} unexpected (e.g. {(missing + unexpected)[0]})"
            )
        for key, t in expected.items():
            if tensors[key].shape != t.shape:
                raise RwkvkitError(
                    f"{path}: '{key}' has shape {tuple(tensors[key].shape)}, expected {tuple(t.shape)}"
                )
        peft.set_peft_model_state_dict(peft_model, tensors)
    except RwkvkitError:
        peft_model.unload()  # take the LoRA layers out again: base_model is as it was
        raise
    return peft_model


def merge_lora(peft_model) -> RWKVModel:
    """The plain RWKV model with the LoRA update merged into its weights (peft's ``merge_and_unload``).

    Its ``save_model`` output is an ordinary official checkpoint: the base keys, shapes and dtypes, in the
    base file's key order (``source_dtypes`` / ``source_key_order`` are kept). Every parameter is
    trainable again, as after ``load_model``. ``peft_model`` must not be used afterwards. The merge writes
    new weight tensors (peft's safe merge), so tensors the base model was loaded from are not modified.
    """
    base = _base_of(peft_model)
    source_dtypes = getattr(base, "source_dtypes", None)
    source_key_order = getattr(base, "source_key_order", None)
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # peft's NaN check of the merged weights
        raise RwkvkitError(f"could not merge the LoRA adapter: {e}") from None
    if merged is not base:
        raise RwkvkitError(f"peft's merge returned a {type(merged).__name__}, not the base model")
    leftover = [name for name, _ in merged.named_parameters() if LORA_MARKER in name]
    if leftover:
        raise RwkvkitError(f"LoRA parameters left after the merge: {leftover[:3]}")
    for p in merged.parameters():
        p.requires_grad_(True)
    if source_dtypes is not None:
        merged.source_dtypes = source_dtypes
    if source_key_order is not None:
        merged.source_key_order = source_key_order
    return merged


def merged_state_dict(peft_model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The official-layout tensors of the base weights plus the LoRA update, computed without changing
    the model (for checkpoints during training); what ``export_state_dict(merge_lora(m))`` would give."""
    lora_layer = _peft().tuners.lora.LoraLayer
    base = _base_of(peft_model)
    tensors = {
        name.replace(".base_layer.", "."): t.detach()
        for name, t in base.state_dict().items()
        if LORA_MARKER not in name
    }
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, lora_layer):
                key = f"{name}.weight"
                delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
                tensors[key] = tensors[key] + delta.to(tensors[key].dtype)
    return export_state_dict(base, dtype, tensors=tensors)


def merge_adapter_file(
    base_path: str | os.PathLike, adapter_path: str | os.PathLike, out_path: str | os.PathLike
) -> Path:
    """Load the base checkpoint, apply the adapter, merge it and write an official checkpoint to ``out_path``.

    The merge is computed in fp32; the written file has the base file's keys, shapes, dtypes and key order.
    """
    base_path, adapter_path, out_path = Path(base_path), Path(adapter_path), Path(out_path)
    for source in (base_path, adapter_path):
        if out_path.exists() and source.exists() and out_path.resolve() == source.resolve():
            raise RwkvkitError(f"refusing to overwrite the input {source}: choose another output path")
    base = load_model(base_path)
    if getattr(base, "quantization", None):
        raise RwkvkitError(f"{base_path} is a quantized model: merge into the full-precision checkpoint")
    merged = merge_lora(load_adapter(base, adapter_path))
    save_model(merged, out_path)
    return out_path


# ---------------------------------------------------------------------------------------------- state tuning


def enable_state_tuning(model: RWKVModel) -> RWKVModel:
    """Make the initial wkv state of every layer (``att.time_state`` (H, N, N) fp32, [value, key]) the
    only trainable parameters of an RWKV-5.2/6/7 model (in place; returns the model).

    Layers without a tuned state get a zero one (what the model used before), so the model's output does
    not change; an existing one is kept (as fp32). ``model.config.has_time_state`` becomes True and
    ``save_model`` writes the states under ``blocks.{i}.att.time_state`` (for a model loaded from a file,
    placed in its key order right after ``time_faaaa`` (5.2, 6) or ``r_k`` (7) of the layer).
    """
    if not isinstance(model, RWKVModel):
        raise RwkvkitError(f"state tuning needs an rwkvkit RWKV model, got {type(model).__name__}")
    version = model.config.version
    if version not in STATE_TUNING_VERSIONS:
        raise RwkvkitError(
            f"state tuning is not supported for RWKV-{version}: it needs a matrix-valued wkv state "
            "(RWKV-5.2, 6 or 7); RWKV-4's state is per-channel running sums"
        )
    H, N = model.config.n_head, model.config.head_size
    for block in model.blocks:
        old = getattr(block.att, "time_state", None)
        if old is None:
            initial = torch.zeros(H, N, N, device=model.device, dtype=torch.float32)
        else:
            initial = old.detach().to(torch.float32).clone()
        block.att.time_state = nn.Parameter(initial)
    model.config.has_time_state = True
    order = getattr(model, "source_key_order", None)
    if order:
        model.source_key_order = _with_time_state_keys(list(order), version, model.config.n_layer)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".att.time_state"))
    return model


def _with_time_state_keys(order: list[str], version: str, n_layer: int) -> list[str]:
    """A checkpoint key order with each layer's missing ``att.time_state`` key put after its anchor key."""
    for i in range(n_layer):
        key = f"blocks.{i}.att.time_state"
        if key in order:
            continue
        anchor = f"blocks.{i}.att.{TIME_STATE_ANCHOR[version]}"
        order.insert(order.index(anchor) + 1 if anchor in order else len(order), key)
    return order


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "apply_lora",
    "enable_state_tuning",
    "freeze",
    "load_adapter",
    "merge_adapter_file",
    "merge_lora",
    "read_adapter",
    "resolve_lora_targets",
    "save_adapter",
    "train_only",
    "trainable_names",
]
