"""Checkpoint files: round trips, reference loads what rwkvkit writes, safetensors, safety, memory mapping."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoints import random_state_dict, random_v7_state_dict
from reference import reference_logits, reference_model

from rwkvkit import RwkvkitError, load_model, save_model
from rwkvkit.checkpoint import load_state_dict
from rwkvkit.config import config_from_state_dict

TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]


VARIANTS = {
    "v4": ("4", {}),
    "v5": ("5.2", {}),
    "v5-time-state": ("5.2", {"time_state": True}),
    "v6": ("6", {}),
    "v6-time-state": ("6", {"time_state": True}),
    "v7": ("7", {}),
    "v7-no-layer0-vlora": ("7", {"layer0_value_lora": False}),
    "v7-time-state": ("7", {"time_state": True}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_save_round_trip_keeps_keys_shapes_dtypes(tmp_path, dtype, variant):
    version, kwargs = VARIANTS[variant]
    sd = random_state_dict(version, dtype=dtype, seed=3, **kwargs)
    src = tmp_path / "src.pth"
    torch.save(sd, src)
    model = load_model(src)  # computes in fp32 whatever the file holds
    assert model.emb.weight.dtype == torch.float32 and model.config.version == version
    out = tmp_path / "out.pth"
    save_model(model, out)
    back = torch.load(out, weights_only=True)
    assert list(back) == list(sd)  # same keys, same order
    for key in sd:
        assert back[key].shape == sd[key].shape, key
        assert back[key].dtype == sd[key].dtype, key
        assert torch.equal(back[key], sd[key]), key  # fp32 compute of a bf16/fp16 file is lossless back


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_package_loads_what_rwkvkit_writes(tmp_path, variant):
    version, kwargs = VARIANTS[variant]
    sd = random_state_dict(version, n_layer=2, n_embd=64, vocab_size=150, seed=4, **kwargs)
    src = tmp_path / "src.pth"
    torch.save(sd, src)
    model = load_model(src)
    with torch.no_grad():  # change the weights so the test sees that the written values are ours
        model.blocks[1].att.output.weight.mul_(1.5)
        model.head.weight.mul_(1.5)
        if kwargs.get("time_state"):
            model.blocks[0].att.time_state.add_(0.5)
    out = tmp_path / "written.pth"
    save_model(model, out)
    ref = reference_model(out, version)
    with torch.inference_mode():
        ours, _ = model(torch.tensor([TOKENS]))
    ref_state = None
    if version == "7" and kwargs.get("time_state"):  # its v7 class takes a tuned state as the initial one
        written = torch.load(out, weights_only=True)
        ref_state = ref.generate_zero_state()
        for i in range(model.config.n_layer):
            ref_state[3 * i + 1] = written[f"blocks.{i}.att.time_state"].float()
    theirs, _ = reference_logits(ref, TOKENS, ref_state)
    assert (ours[0] - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max().item())
    unedited = reference_logits(reference_model(src, version), TOKENS)[0]
    assert (unedited - theirs).abs().max() > 1e-2  # the edits reached the written file


def test_safetensors_round_trip_same_keys_and_logits(tmp_path):
    sd = random_v7_state_dict(dtype=torch.bfloat16, seed=5)
    src = tmp_path / "m.pth"
    torch.save(sd, src)
    model = load_model(src)
    st = tmp_path / "m.safetensors"
    save_model(model, st)
    from safetensors.torch import load_file

    raw = load_file(str(st))
    assert set(raw) == set(sd) and all(raw[k].dtype == sd[k].dtype for k in sd)
    again = load_model(st)
    with torch.inference_mode():
        a, _ = model(torch.tensor([TOKENS]))
        b, _ = again(torch.tensor([TOKENS]))
    assert torch.equal(a, b)
    save_model(again, tmp_path / "back.pth")
    assert set(torch.load(tmp_path / "back.pth", weights_only=True)) == set(sd)  # safetensors keeps no order


def test_forward_module_prefix_is_stripped(tmp_path):
    sd = random_v7_state_dict(seed=6)
    path = tmp_path / "prefixed.pth"
    torch.save({"_forward_module." + k: v for k, v in sd.items()}, path)
    assert set(load_state_dict(path)) == set(sd)


class _RunsCode:
    """An object whose unpickling runs a shell command: what a malicious .pth would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy_format", [False, True])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, legacy_format):
    marker = tmp_path / "pwned"
    sd = random_v7_state_dict(seed=7)
    sd["blocks.0.att.evil"] = _RunsCode(marker)
    path = tmp_path / "evil.pth"
    if legacy_format:
        with open(path, "wb") as f:  # the pre-1.6 torch.save layout: a bare pickle stream
            pickle.dump(sd, f, protocol=2)
    else:
        torch.save(sd, path)
    with pytest.raises(RwkvkitError, match="refusing to load|not a checkpoint|corrupt"):
        load_model(path)
    assert not marker.exists()


def test_mismatched_shapes_and_keys_are_named(tmp_path):
    sd = random_v7_state_dict(seed=8)
    sd["blocks.1.att.key.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(RwkvkitError, match=r"blocks\.1\.att\.key\.weight.*shape"):
        load_model(tmp_path / "bad.pth")
    sd = random_v7_state_dict(seed=8)
    del sd["blocks.1.ffn.x_k"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(RwkvkitError, match=r"missing.*blocks\.1\.ffn\.x_k"):
        load_model(tmp_path / "missing.pth")


def test_config_reads_every_width_from_shapes():
    sd = random_v7_state_dict(n_layer=3, n_embd=96, head_size=32, vocab_size=77, dim_ffn=320,
                              d_decay=12, d_iclr=20, d_value=4, d_gate=28)  # fmt: skip
    cfg = config_from_state_dict(sd)
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size) == ("7", 3, 96, 77)
    assert (cfg.n_head, cfg.head_size, cfg.dim_ffn) == (3, 32, 320)
    assert (cfg.d_decay, cfg.d_iclr, cfg.d_value, cfg.d_gate) == (12, 20, 4, 28)
    cfg = config_from_state_dict(random_state_dict("6", n_layer=2, n_embd=96, head_size=32, dim_ffn=224,
                                                   d_mix=12, d_decay=20, time_state=True))  # fmt: skip
    assert (cfg.version, cfg.n_head, cfg.head_size, cfg.dim_ffn) == ("6", 3, 32, 224)
    assert (cfg.d_mix, cfg.d_decay, cfg.has_time_state) == (12, 20, True)
    cfg = config_from_state_dict(random_state_dict("5.2", n_layer=4, n_embd=64, head_size=16, dim_ffn=96))
    assert (cfg.version, cfg.n_layer, cfg.n_head, cfg.head_size, cfg.dim_ffn) == ("5.2", 4, 4, 16, 96)
    assert not cfg.has_time_state
    cfg = config_from_state_dict(random_state_dict("4", n_layer=3, n_embd=48, vocab_size=50, dim_ffn=100))
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size) == ("4", 3, 48, 50)
    assert (cfg.n_head, cfg.dim_att, cfg.dim_ffn) == (0, 48, 100)


MEMORY_PROBE = textwrap.dedent(
    """
    import sys, torch
    from rwkvkit import load_model
    from rwkvkit.models import build_model
    from rwkvkit.models import new_config

    build_model(new_config("7", 1, 64, 10, 32), device="meta")  # one-time torch set-up (~70 MB), not weights

    def rss_anon_mb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024

    before = rss_anon_mb()
    model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
    total = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(rss_anon_mb() - before, total)
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read RssAnon")
@pytest.mark.parametrize("file_dtype,model_dtype", [("float32", "float32"), ("bfloat16", "float32")])
def test_loading_does_not_copy_the_weights_twice(tmp_path, file_dtype, model_dtype):
    """fp32 file as fp32: weights stay memory-mapped (almost no anonymous memory); bf16 -> fp32: one copy."""
    sd = random_v7_state_dict(
        n_layer=2, n_embd=256, head_size=64, vocab_size=65536, dtype=getattr(torch, file_dtype)
    )
    path = tmp_path / "big.pth"
    torch.save(sd, path)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path), model_dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    anon_growth_mb, model_mb = map(float, out.stdout.split())
    if file_dtype == model_dtype:
        assert anon_growth_mb < 0.25 * model_mb, (anon_growth_mb, model_mb)
    else:
        assert anon_growth_mb < 1.25 * model_mb, (anon_growth_mb, model_mb)


def test_versions_are_detected_as_the_reference_does():
    """Version detection from the keys; RWKV-5.0 / 5.1 previews are named and refused."""
    from rwkvkit.config import detect_version

    for version in ("4", "5.2", "6", "7"):
        assert detect_version(random_state_dict(version)) == version
    v52 = random_state_dict("5.2", n_layer=1, n_embd=32, head_size=16)
    v51 = {**v52, "blocks.0.att.time_decay": torch.zeros(2, 1)}  # a per-head decay: RWKV-5.1
    v50 = {k: v for k, v in v51.items() if "gate" not in k}  # no gate either: RWKV-5.0
    assert (detect_version(v51), detect_version(v50)) == ("5.1", "5.0")
    for sd, name in ((v51, "RWKV-5.1"), (v50, "RWKV-5.0")):
        with pytest.raises(RwkvkitError, match=f"{name} checkpoint, which rwkvkit does not support"):
            config_from_state_dict(sd)
