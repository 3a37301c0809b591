"""Parameter-efficient fine-tuning: freeze / train_only, LoRA through peft (training, merge, adapter files)
and state tuning; merged and state-tuned files are checked against the reference ``rwkv`` package.

The task is tiny and fixed: continue one repeated token string. Checkpoints are small random ones in the
official layout (tests/checkpoints.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checkpoints import random_state_dict
from reference import reference_logits, reference_model

from rwkvkit import RwkvkitError, load_model
from rwkvkit.cli.merge import add_arguments as add_merge_arguments
from rwkvkit.cli.merge import run as run_merge
from rwkvkit.models import model_from_state_dict, save_model
from rwkvkit.train.finetune import (
    apply_lora,
    enable_state_tuning,
    freeze,
    load_adapter,
    merge_adapter_file,
    merge_lora,
    read_adapter,
    save_adapter,
    train_only,
    trainable_names,
)
from rwkvkit.train.optim import make_optimizer

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the peft package")

TASK = [5, 17, 42, 8, 63, 29, 71, 3] * 5  # the string to learn to continue (vocab 97)
N_LAYER = 2
# LoRA-wrapped projections per layer (att + ffn) in each version
LORA_LAYERS_PER_BLOCK = {"4": 4 + 3, "5.2": 5 + 3, "6": 5 + 3, "7": 4 + 2}


def write_checkpoint(
    tmp_path: Path, version: str, name: str = "base.pth", n_embd: int = 64, **kwargs
) -> Path:
    """A random official checkpoint (2 layers, vocab 97) written to tmp_path / name."""
    if version != "4":
        kwargs.setdefault("head_size", 16)
    sd = random_state_dict(version, n_layer=N_LAYER, n_embd=n_embd, vocab_size=97, **kwargs)
    path = tmp_path / name
    torch.save(sd, path)
    return path


def task_loss(model) -> torch.Tensor:
    tokens = torch.tensor([TASK])
    logits, _ = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def train_steps(model, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = task_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    return model(torch.tensor([TASK]))[0][0]  # (T, V)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Max abs error within ``rel`` of the expected tensor's scale."""
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} vs scale {scale:.3e}"


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_weights_of(peft_model) -> dict[str, torch.Tensor]:
    """The base model's tensors under the official keys (peft keeps a wrapped linear's as base_layer.*)."""
    out = {}
    for key, t in peft_model.get_base_model().state_dict().items():
        if "lora_" not in key:
            out[key.replace(".base_layer.", ".")] = t
    return out


def assert_same_layout(written: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    assert list(written) == list(source)  # same keys, same order
    for key, t in source.items():
        assert written[key].shape == t.shape and written[key].dtype == t.dtype, key


# ---------------------------------------------------------------------------------------------- freezing


def test_freeze_by_patterns_returns_the_frozen_names(tmp_path):
    model = load_model(write_checkpoint(tmp_path, "7"))
    names = [n for n, _ in model.named_parameters()]
    frozen = freeze(model, ["blocks.0.*"])
    assert frozen == [n for n in names if n.startswith("blocks.0.")]
    assert trainable_names(model) == [n for n in names if not n.startswith("blocks.0.")]
    more = freeze(model, ["*.att.*", "emb.weight"])
    assert more == [n for n in names if ".att." in n or n == "emb.weight"]
    assert set(trainable_names(model)) == {
        n for n in names if not n.startswith("blocks.0.") and ".att." not in n and n != "emb.weight"
    }
    assert "blocks.1.ffn.key.weight" in trainable_names(model) and "head.weight" in trainable_names(model)


def test_train_only_freezes_everything_else(tmp_path):
    model = load_model(write_checkpoint(tmp_path, "6"))
    trainable = train_only(model, ["head.weight", "blocks.1.ffn.*"])
    expected = ["blocks.1.ffn.time_maa_k", "blocks.1.ffn.time_maa_r", "blocks.1.ffn.key.weight"]
    expected += ["blocks.1.ffn.receptance.weight", "blocks.1.ffn.value.weight", "head.weight"]
    assert trainable == expected
    assert trainable_names(model) == expected
    optimizer = make_optimizer(model, 1e-3, 0.1)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in expected}
    # train_only also turns frozen parameters back on
    assert train_only(model, ["emb.weight"]) == ["emb.weight"] == trainable_names(model)


def test_unmatched_pattern_is_refused_and_changes_nothing(tmp_path):
    model = load_model(write_checkpoint(tmp_path, "7"))
    with pytest.raises(RwkvkitError, match=r"'blocks\.9\.\*' matches no parameter"):
        freeze(model, ["blocks.0.*", "blocks.9.*"])
    with pytest.raises(RwkvkitError, match="'att.key' matches no parameter"):
        train_only(model, ["att.key"])  # a glob on full names: '*.att.key.*' is meant
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(RwkvkitError, match="list of strings"):
        freeze(model, "emb.weight")
    with pytest.raises(RwkvkitError, match="no parameter name patterns"):
        train_only(model, [])


# ---------------------------------------------------------------------------------------------- LoRA


@needs_peft
@pytest.mark.parametrize("version", ["7", "6", "5.2", "4"])
def test_lora_trains_only_adapters_and_merges_into_an_official_file(tmp_path, version):
    path = write_checkpoint(tmp_path, version)
    source = torch.load(path, weights_only=True)
    model = load_model(path)
    before = snapshot(model)
    untuned = logits_of(model)
    peft_model = apply_lora(model, r=4, alpha=8)
    assert peft_model.config is model.config
    assert torch.equal(logits_of(peft_model), untuned)  # lora_B starts at zero

    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert len(lora_names) == 2 * N_LAYER * LORA_LAYERS_PER_BLOCK[version]  # lora_A and lora_B each
    assert trainable_names(peft_model) == lora_names
    optimizer = make_optimizer(peft_model, 1e-2, 0.0)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(peft_model.named_parameters())
    assert in_optimizer == {id(params[n]) for n in lora_names}

    losses = train_steps(peft_model, optimizer, 6)
    assert losses[-1] < 0.6 * losses[0], losses
    base_now = base_weights_of(peft_model)
    assert set(base_now) == set(before)
    for key, t in before.items():
        assert torch.equal(base_now[key], t), key

    lora_logits = logits_of(peft_model)
    merged = merge_lora(peft_model)
    assert type(merged) is type(model) and "lora_" not in str(list(merged.state_dict()))
    merged_logits = logits_of(merged)
    assert_close(merged_logits, lora_logits, rel=1e-5)
    assert (merged_logits - untuned).abs().max() > 0.1  # the training reached the merged weights
    assert all(p.requires_grad for p in merged.parameters())

    out = tmp_path / "merged.pth"
    save_model(merged, out)
    written = torch.load(out, weights_only=True)
    assert_same_layout(written, source)
    theirs, _ = reference_logits(reference_model(out, version), TASK)
    assert_close(merged_logits, theirs, rel=1e-4)
    # the merge wrote new tensors: the base file (and the tensors loaded from it) are unchanged
    for key, t in torch.load(path, weights_only=True).items():
        assert torch.equal(t, source[key]) and torch.equal(t, before[key]), key


@needs_peft
def test_merge_leaves_the_tensors_the_model_was_built_from_alone():
    sd = random_state_dict("7", n_layer=N_LAYER, n_embd=64, head_size=16, vocab_size=97)
    copy = {k: v.clone() for k, v in sd.items()}
    model = model_from_state_dict(sd)  # uses sd's tensors as they are (no copy)
    key = "blocks.1.att.key.weight"
    assert model.blocks[1].att.key.weight.data_ptr() == sd[key].data_ptr()
    peft_model = apply_lora(model, r=4, alpha=8)
    train_steps(peft_model, make_optimizer(peft_model, 1e-2, 0.0), 2)
    merged = merge_lora(peft_model)
    assert not torch.equal(merged.blocks[1].att.key.weight, copy[key])
    for k, t in copy.items():
        assert torch.equal(sd[k], t), k


@needs_peft
def test_adapter_round_trip_gives_the_same_logits(tmp_path):
    path = write_checkpoint(tmp_path, "7")
    peft_model = apply_lora(load_model(path), r=4, alpha=8, dropout=0.1)
    peft_model.train()
    train_steps(peft_model, make_optimizer(peft_model, 1e-2, 0.0), 3)
    peft_model.eval()
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(peft_model, adapter)

    tensors, lora, base_config = read_adapter(adapter)
    assert tensors and all("lora_" in k for k in tensors)
    assert lora == {"r": 4, "alpha": 8, "dropout": 0.1, "targets": sorted(lora["targets"])}
    assert set(lora["targets"]) == {
        "att.receptance",
        "att.key",
        "att.value",
        "att.output",
        "ffn.key",
        "ffn.value",
    }
    assert base_config["version"] == "7" and base_config["n_embd"] == 64
    with torch.no_grad():
        for key, t in tensors.items():  # the stored values are the trained ones
            assert torch.equal(
                t, dict(peft_model.named_parameters())[key.replace(".weight", ".default.weight")]
            )

    reloaded = load_adapter(load_model(path), adapter)
    reloaded.eval()
    assert torch.equal(logits_of(reloaded), logits_of(peft_model))
    assert trainable_names(reloaded) == trainable_names(peft_model)


@needs_peft
def test_load_adapter_refuses_another_model(tmp_path):
    peft_model = apply_lora(load_model(write_checkpoint(tmp_path, "7")), r=4)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(peft_model, adapter)
    others = {
        "wider": write_checkpoint(tmp_path, "7", "wide.pth", n_embd=128),
        "v6": write_checkpoint(tmp_path, "6", "v6.pth"),
        "other-lora-widths": write_checkpoint(tmp_path, "7", "gate.pth", d_gate=24),
    }
    for name, other_path in others.items():
        other = load_model(other_path)
        with pytest.raises(RwkvkitError, match="is a LoRA adapter for RWKV-7 L2 D64.*not for this"):
            load_adapter(other, adapter)
        assert not any("lora_" in n for n, _ in other.named_parameters()), name  # left untouched
    # a state-tuned base of the same shape is fine (the tuned state does not change the projections)
    tuned = load_model(write_checkpoint(tmp_path, "7", "tuned.pth", time_state=True))
    load_adapter(tuned, adapter)
    # not an adapter file at all
    plain = tmp_path / "model.safetensors"
    save_model(load_model(others["v6"]), plain)
    with pytest.raises(RwkvkitError, match="not an rwkvkit LoRA adapter"):
        load_adapter(load_model(others["v6"]), plain)
    with pytest.raises(RwkvkitError, match="as .safetensors"):
        save_adapter(peft_model, tmp_path / "adapter.pth")


@needs_peft
def test_apply_lora_checks_targets_and_settings(tmp_path):
    model = load_model(write_checkpoint(tmp_path, "7"))
    with pytest.raises(RwkvkitError, match="'att.nope' matches no linear layer"):
        apply_lora(model, targets=["att.key", "att.nope"])
    with pytest.raises(RwkvkitError, match="rank"):
        apply_lora(model, r=0)
    with pytest.raises(RwkvkitError, match="no LoRA target"):
        apply_lora(model, targets=["att.gate"])  # a default target that RWKV-7 lacks
    peft_model = apply_lora(model, r=2, targets=["att.key"])
    assert len(trainable_names(peft_model)) == 2 * N_LAYER
    with pytest.raises(RwkvkitError, match="already has LoRA layers"):
        apply_lora(peft_model.get_base_model())
    logits, state = peft_model(torch.tensor([TASK[:5]]), last_only=True)  # keyword arguments pass through
    assert logits.shape == (1, 1, 97) and state.wkv.shape[0] == N_LAYER


def test_lora_without_peft_says_what_to_install(tmp_path, monkeypatch):
    model = load_model(write_checkpoint(tmp_path, "7"))
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(RwkvkitError, match=r"pip install 'rwkvkit\[train\]'"):
        apply_lora(model)


@needs_peft
def test_merge_adapter_file_keeps_a_bf16_layout(tmp_path):
    path = write_checkpoint(tmp_path, "6", dtype=torch.bfloat16)
    source = torch.load(path, weights_only=True)
    peft_model = apply_lora(load_model(path), r=4, alpha=8)
    train_steps(peft_model, make_optimizer(peft_model, 1e-2, 0.0), 3)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(peft_model, adapter)
    in_memory = tmp_path / "in_memory.pth"
    save_model(merge_lora(peft_model), in_memory)

    parser = argparse.ArgumentParser()
    add_merge_arguments(parser)
    out = tmp_path / "merged.pth"
    args = parser.parse_args(["--base", str(path), "--adapter", str(adapter), "-o", str(out)])
    assert run_merge(args) == 0
    written = torch.load(out, weights_only=True)
    assert_same_layout(written, source)
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    expected = torch.load(in_memory, weights_only=True)
    for key, t in written.items():
        assert torch.equal(t, expected[key]), key
    assert not torch.equal(written["blocks.1.att.key.weight"], source["blocks.1.att.key.weight"])
    with pytest.raises(RwkvkitError, match="refusing to overwrite"):
        merge_adapter_file(path, adapter, path)


# ---------------------------------------------------------------------------------------------- state tuning


@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_state_tuning_trains_only_the_initial_state(tmp_path, version):
    path = write_checkpoint(tmp_path, version)
    source = torch.load(path, weights_only=True)
    model = load_model(path)
    assert not model.config.has_time_state
    before = snapshot(model)
    untuned = logits_of(model)
    assert enable_state_tuning(model) is model
    names = [f"blocks.{i}.att.time_state" for i in range(N_LAYER)]
    assert trainable_names(model) == names and model.config.has_time_state
    H, N = model.config.n_head, model.config.head_size
    for block in model.blocks:
        assert block.att.time_state.shape == (H, N, N) and block.att.time_state.dtype == torch.float32
    assert torch.equal(logits_of(model), untuned)  # a zero initial state is the untuned model

    losses = train_steps(model, make_optimizer(model, 0.05, 0.0), 6)
    assert losses[-1] < 0.95 * losses[0], losses
    now = model.state_dict()
    assert set(now) == set(before) | set(names)
    for key, t in before.items():
        assert torch.equal(now[key], t), key
    tuned = logits_of(model)
    assert (tuned - untuned).abs().max() > 1e-2

    out = tmp_path / "tuned.pth"
    save_model(model, out)
    written = torch.load(out, weights_only=True)
    anchor = "r_k" if version == "7" else "time_faaaa"
    order = list(source)
    for i in range(N_LAYER):
        order.insert(order.index(f"blocks.{i}.att.{anchor}") + 1, f"blocks.{i}.att.time_state")
    assert list(written) == order
    reloaded = load_model(out)
    assert reloaded.config.has_time_state
    assert torch.equal(logits_of(reloaded), tuned)

    ref = reference_model(out, version)
    ref_state = None
    if version == "7":  # the reference's v7 class ignores the keys: hand them over as its state
        ref_state = ref.generate_zero_state()
        for i in range(N_LAYER):
            ref_state[3 * i + 1] = written[f"blocks.{i}.att.time_state"].float().clone()
    theirs, _ = reference_logits(ref, TASK, ref_state)
    assert_close(tuned, theirs, rel=1e-4)


def test_state_tuning_keeps_an_existing_state(tmp_path):
    path = write_checkpoint(tmp_path, "6", time_state=True)
    source = torch.load(path, weights_only=True)
    model = enable_state_tuning(load_model(path))
    assert torch.equal(model.blocks[1].att.time_state, source["blocks.1.att.time_state"])
    train_steps(model, make_optimizer(model, 0.05, 0.0), 2)
    out = tmp_path / "tuned.pth"
    save_model(model, out)
    written = torch.load(out, weights_only=True)
    assert_same_layout(written, source)
    assert not torch.equal(written["blocks.1.att.time_state"], source["blocks.1.att.time_state"])


def test_state_tuning_refuses_rwkv4(tmp_path):
    model = load_model(write_checkpoint(tmp_path, "4"))
    with pytest.raises(RwkvkitError, match="state tuning is not supported for RWKV-4"):
        enable_state_tuning(model)
    assert all(p.requires_grad for p in model.parameters())
