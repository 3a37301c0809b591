"""Hugging Face folders both ways (rwkvkit.hf_layouts, rwkvkit.checkpoint, rwkvkit.export.hf).

Checked against what can run here: transformers' own ``RwkvForCausalLM`` loads the RWKV-4 folder and gives
rwkvkit's logits; llama.cpp's ``convert_hf_to_gguf.py`` (from the llama-cpp-python source distribution)
converts the RWKV-6 / RWKV-7 folders into the same tensors as ``rwkvkit export --to gguf``. The layouts
whose modelling code is not in the transformers wheel are checked against their published key lists.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from checkpoints import random_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rwkvkit.checkpoint import load_state_dict, save_state_dict
from rwkvkit.cli import main
from rwkvkit.errors import RwkvkitError
from rwkvkit.export.hf import export_hf
from rwkvkit.models import load_model

VERSIONS = ("4", "5.2", "6", "7")


def _checkpoint(tmp_path: Path, version: str, dtype: torch.dtype = torch.float32, **kwargs) -> Path:
    path = tmp_path / f"v{version}-{str(dtype)[6:]}.pth"
    save_state_dict(random_state_dict(version, dtype=dtype, **kwargs), path)
    return path


def _stored(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# --------------------------------------------------------------------------------------------------
# Round trip: .pth -> folder -> .pth is the same file content; the folder loads as the same model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_is_identical(tmp_path, version, dtype):
    pth = _checkpoint(tmp_path, version, dtype)
    export_hf(pth, tmp_path / "hf", tokenizer="none")
    back = tmp_path / "back.pth"
    save_state_dict(load_state_dict(tmp_path / "hf"), back)
    original, again = torch.load(pth, weights_only=True), torch.load(back, weights_only=True)
    assert list(again) == list(original)  # keys, in the same order
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and again[key].shape == tensor.shape, key
        assert torch.equal(again[key], tensor), key


@pytest.mark.parametrize("version", VERSIONS)
def test_the_folder_is_the_same_model(tmp_path, version):
    pth = _checkpoint(tmp_path, version, seed=3)
    export_hf(pth, tmp_path / "hf", tokenizer="none")
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    a, b = load_model(pth), load_model(tmp_path / "hf")
    assert b.config == a.config
    assert torch.equal(b(tokens)[0], a(tokens)[0])


def test_v7_without_layer0_value_lora_writes_no_extras(tmp_path):
    pth = _checkpoint(tmp_path, "7", layer0_value_lora=False)
    summary = export_hf(pth, tmp_path / "hf", tokenizer="none")
    assert "official_extras.safetensors" not in summary.files
    assert not (tmp_path / "hf" / "official_extras.safetensors").exists()
    assert list(load_state_dict(tmp_path / "hf")) == list(torch.load(pth, weights_only=True))


def test_v7_layer0_value_lora_travels_beside_the_layout(tmp_path):
    """fla's layer 0 has no value LoRA (never used there): the official trainer's dummy v0/v1/v2 are kept
    in a file the layout's readers do not open, so the .pth comes back whole."""
    pth = _checkpoint(tmp_path, "7")
    export_hf(pth, tmp_path / "hf", tokenizer="none")
    assert not any(k.startswith("model.layers.0.attn.v_lora") for k in _stored(tmp_path / "hf"))
    extras = load_file(str(tmp_path / "hf" / "official_extras.safetensors"))
    assert sorted(extras) == ["blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"]


# --------------------------------------------------------------------------------------------------
# The layouts against their published key lists and config fields
# --------------------------------------------------------------------------------------------------

C, H, N, V, L = 64, 4, 16, 97, 2  # the shapes of tests/checkpoints.py's defaults


def _rwkv_hf_names(block: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    names = {"rwkv.embeddings.weight": (V, C), "head.weight": (V, C)}
    names |= {"rwkv.ln_out.weight": (C,), "rwkv.ln_out.bias": (C,)}
    names |= {"rwkv.blocks.0.pre_ln.weight": (C,), "rwkv.blocks.0.pre_ln.bias": (C,)}
    for i in range(L):
        for ln in ("ln1", "ln2"):
            names |= {f"rwkv.blocks.{i}.{ln}.weight": (C,), f"rwkv.blocks.{i}.{ln}.bias": (C,)}
        names |= {f"rwkv.blocks.{i}.{k}": shape for k, shape in block.items()}
    return names


def _feed_forward(mix: str, F: int) -> dict[str, tuple[int, ...]]:
    return {
        f"feed_forward.{mix}_key" if mix == "time_mix" else "feed_forward.time_maa_k": (1, 1, C),
        f"feed_forward.{mix}_receptance" if mix == "time_mix" else "feed_forward.time_maa_r": (1, 1, C),
        "feed_forward.key.weight": (F, C),
        "feed_forward.receptance.weight": (C, C),
        "feed_forward.value.weight": (C, F),
    }


def _projections(*names: str) -> dict[str, tuple[int, ...]]:
    out = {f"attention.{n}.weight": (C, C) for n in names}
    return out | {"attention.ln_x.weight": (C,), "attention.ln_x.bias": (C,)}


# RWKV-5.2: the RWKV/v5-Eagle-7B-HF remote code (modeling_rwkv5.py, classes Rwkv5SelfAttention,
# Rwkv5FeedForward, Rwkv5Block): time_decay / time_faaaa (H, N), time_mix_{gate,key,value,receptance}
# (1, 1, C), key / value / receptance / gate / output, ln_x (GroupNorm),
# feed_forward.time_mix_{key,receptance}
V5_BLOCK = {f"attention.time_mix_{n}": (1, 1, C) for n in ("key", "value", "receptance", "gate")}
V5_BLOCK |= {"attention.time_decay": (H, N), "attention.time_faaaa": (H, N)}
V5_BLOCK |= _projections("key", "value", "receptance", "gate", "output") | _feed_forward("time_mix", 224)

# RWKV-6: the RWKV/v6-Finch-1B6-HF remote code (modeling_rwkv6.py, Rwkv6SelfAttention): time_maa_{x,w,k,v,r,g}
# (1, 1, C), time_maa_w1 (C, 5 D_mix), time_maa_w2 (5, D_mix, C), time_decay (1, 1, C), time_decay_w1
# (C, D_decay), time_decay_w2 (D_decay, C), time_faaaa (H, N); Rwkv6FeedForward: time_maa_{k,r}
V6_BLOCK = {f"attention.time_maa_{n}": (1, 1, C) for n in "xwkvrg"}
V6_BLOCK |= {"attention.time_maa_w1": (C, 5 * 8), "attention.time_maa_w2": (5, 8, C)}
V6_BLOCK |= {"attention.time_decay": (1, 1, C), "attention.time_faaaa": (H, N)}
V6_BLOCK |= {"attention.time_decay_w1": (C, 16), "attention.time_decay_w2": (16, C)}
V6_BLOCK |= _projections("key", "value", "receptance", "gate", "output") | _feed_forward("time_maa", 224)


def _fla_names() -> dict[str, tuple[int, ...]]:
    """flash-linear-attention's RWKV7ForCausalLM (fla/models/rwkv7/modeling_rwkv7.py, fla/layers/rwkv7.py
    RWKV7Attention; the fla-hub repos, converted by fla's utils/convert_from_rwkv7.py): x_* (1, 1, C),
    k_k / k_a (C,), r_k (H, N), {r,k,v,o}_proj, LoRA(C -> D -> C) as lora.0 (D, C) and lora.2 (C, D) + bias
    (C,) (g_lora without bias), no v_lora in layer 0, g_norm (GroupNorm), ffn.x_k (C,), ffn.key / value."""
    names = {"model.embeddings.weight": (V, C), "lm_head.weight": (V, C)}
    names |= {"model.norm.weight": (C,), "model.norm.bias": (C,)}
    names |= {"model.layers.0.pre_norm.weight": (C,), "model.layers.0.pre_norm.bias": (C,)}
    widths = {"w": 8, "a": 8, "v": 4, "g": 16}  # tests/checkpoints.py's RWKV-7 defaults
    for i in range(L):
        p = f"model.layers.{i}."
        for norm in ("attn_norm", "ffn_norm", "attn.g_norm"):
            names |= {f"{p}{norm}.weight": (C,), f"{p}{norm}.bias": (C,)}
        names |= {f"{p}attn.x_{n}": (1, 1, C) for n in "rwkvag"}
        names |= {f"{p}attn.k_k": (C,), f"{p}attn.k_a": (C,), f"{p}attn.r_k": (H, N)}
        names |= {f"{p}attn.{n}_proj.weight": (C, C) for n in "rkvo"}
        for lora, d in widths.items():
            if lora == "v" and i == 0:
                continue
            names |= {
                f"{p}attn.{lora}_lora.lora.0.weight": (d, C),
                f"{p}attn.{lora}_lora.lora.2.weight": (C, d),
            }
            if lora != "g":
                names[f"{p}attn.{lora}_lora.lora.2.bias"] = (C,)
        names |= {f"{p}ffn.x_k": (C,), f"{p}ffn.key.weight": (4 * C, C), f"{p}ffn.value.weight": (C, 4 * C)}
    return names


PUBLISHED = {"5.2": lambda: _rwkv_hf_names(V5_BLOCK), "6": lambda: _rwkv_hf_names(V6_BLOCK), "7": _fla_names}


@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_tensors_have_the_published_names_and_shapes(tmp_path, version):
    export_hf(_checkpoint(tmp_path, version), tmp_path / "hf", tokenizer="none")
    assert _stored(tmp_path / "hf") == PUBLISHED[version]()


def test_v7_low_rank_factors_are_nn_linear_weights(tmp_path):
    """fla's LoRA computes lora.2(tanh(lora.0(x))) with nn.Linear: w1 (C, D) is lora.0's (D, C) weight."""
    pth = _checkpoint(tmp_path, "7")
    export_hf(pth, tmp_path / "hf", tokenizer="none")
    sd, stored = torch.load(pth, weights_only=True), load_file(str(tmp_path / "hf" / "model.safetensors"))
    p = "model.layers.1.attn."
    assert torch.equal(stored[p + "w_lora.lora.0.weight"], sd["blocks.1.att.w1"].t())
    assert torch.equal(stored[p + "w_lora.lora.2.weight"], sd["blocks.1.att.w2"].t())
    assert torch.equal(stored[p + "w_lora.lora.2.bias"], sd["blocks.1.att.w0"].flatten())
    assert torch.equal(stored[p + "g_norm.weight"], sd["blocks.1.att.ln_x.weight"])


# the fields the readers of each layout take from config.json: llama.cpp's conversion/rwkv.py
# (Rwkv6Model / Rwkv7Model.set_gguf_parameters), fla's RWKV7Config, transformers' RwkvConfig
CONFIG_FIELDS = {
    "4": {"model_type": "rwkv", "architectures": ["RwkvForCausalLM"], "hidden_size": C, "vocab_size": V},
    "5.2": {
        "model_type": "rwkv5",
        "architectures": ["Rwkv5ForCausalLM"],
        "head_size": N,
        "head_size_divisor": 8,
    },
    "6": {"model_type": "rwkv6", "architectures": ["Rwkv6ForCausalLM"], "head_size": N, "rescale_every": 6},
    "7": {
        "model_type": "rwkv7",
        "architectures": ["RWKV7ForCausalLM"],
        "head_dim": N,
        "num_heads": H,
        "norm_eps": 1e-5,
        "decay_low_rank_dim": 8,
        "a_low_rank_dim": 8,
        "v_low_rank_dim": 4,
        "gate_low_rank_dim": 16,
        "intermediate_size": 4 * C,
        "hidden_act": "sqrelu",
        "value_dim": [C, C],
    },
}


@pytest.mark.parametrize("version", VERSIONS)
def test_config_has_the_fields_its_readers_take(tmp_path, version):
    export_hf(_checkpoint(tmp_path, version), tmp_path / "hf", tokenizer="none")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: config.get(k) for k in CONFIG_FIELDS[version]} == CONFIG_FIELDS[version]
    assert config["num_hidden_layers"] == L and config["bos_token_id"] == config["eos_token_id"] == 0
    if version != "7":
        assert config["layer_norm_epsilon"] == 1e-5 and config["intermediate_size"] == (
            256 if version == "4" else 224
        )


def test_v6_widths_other_readers_cannot_load_are_warned(tmp_path):
    summary = export_hf(_checkpoint(tmp_path, "6"), tmp_path / "hf", tokenizer="none")
    assert len(summary.warnings) == 1 and "assume 32 and 64" in summary.warnings[0]
    fixed = _checkpoint(tmp_path, "6", d_mix=32, d_decay=64)
    assert export_hf(fixed, tmp_path / "hf2", tokenizer="none").warnings == []


# --------------------------------------------------------------------------------------------------
# transformers' own RwkvForCausalLM reads the RWKV-4 folder
# --------------------------------------------------------------------------------------------------


def test_transformers_rwkv_for_causal_lm_gives_rwkvkit_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    # 7 layers: transformers halves the residual after every 6th layer in inference (rescale_every)
    pth = _checkpoint(tmp_path, "4", n_layer=7, seed=5)
    export_hf(pth, tmp_path / "hf", tokenizer="none")
    hf, info = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing, unexpected or mismatched tensors
    hf.eval()
    tokens = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(tokens).logits
        ours = load_model(tmp_path / "hf")(tokens)[0]
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max().item())


# --------------------------------------------------------------------------------------------------
# llama.cpp's converter accepts the RWKV-6 / RWKV-7 folders and gives rwkvkit's GGUF tensors
# --------------------------------------------------------------------------------------------------

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CONVERTER_CACHE = Path.home() / ".cache" / "rwkvkit" / "llama-cpp-python-0.3.36-convert"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/")


def _llama_cpp_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py and what it imports, from the llama-cpp-python source
    distribution on the package registry (downloaded once into the cache); skips when unavailable."""
    script = CONVERTER_CACHE / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    download = CONVERTER_CACHE.parent / "sdist"
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    result = subprocess.run([*pip, LLAMA_CPP_PYTHON, "-d", str(download)], capture_output=True, text=True)
    archives = sorted(download.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not archives:
        pytest.skip(f"the {LLAMA_CPP_PYTHON} source distribution is not available: {result.stderr[-200:]}")
    tmp = CONVERTER_CACHE.with_name(CONVERTER_CACHE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archives[-1]) as tar:
        for member in tar.getmembers():
            inner = member.name.partition("/vendor/llama.cpp/")[2]
            if member.isfile() and inner.startswith(CONVERTER_FILES):
                target = tmp / inner
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    tmp.rename(CONVERTER_CACHE)
    shutil.rmtree(download, ignore_errors=True)
    return script


LLAMA_SHAPES = {  # heads of 64 (llama.cpp's RWKV-7 kernel), RWKV-6 widths its converter assumes
    "6": dict(n_embd=64, head_size=64, vocab_size=65536, d_mix=32, d_decay=64),
    "7": dict(n_embd=64, head_size=64, vocab_size=65536),
}


@pytest.mark.parametrize("version", ["6", "7"])
def test_llama_cpp_converter_gives_rwkvkit_gguf_tensors(tmp_path, version):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from rwkvkit.export.gguf import export_gguf

    script = _llama_cpp_converter()
    pth = _checkpoint(tmp_path, version, **LLAMA_SHAPES[version])
    export_hf(pth, tmp_path / "hf")
    converted = tmp_path / "converted.gguf"
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "hf"), "--outfile", str(converted), "--outtype", "f32"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    export_gguf(pth, tmp_path / "ours.gguf", "f32")
    theirs, ours = gguf.GGUFReader(str(converted)), gguf.GGUFReader(str(tmp_path / "ours.gguf"))
    a, b = {t.name: t for t in theirs.tensors}, {t.name: t for t in ours.tensors}
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert list(t.shape) == list(b[name].shape) and t.tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
    fields = {n for n in theirs.fields if not n.startswith("general.")}
    assert fields <= set(ours.fields), fields - set(ours.fields)
    # the chat template differs in form only: the converter inlines llama.cpp's rwkv-world Jinja file, rwkvkit
    # names that built-in template ("rwkv-world")
    for name in fields - {"tokenizer.chat_template"}:
        if name.startswith(("tokenizer.", version.join(("rwkv", ".")))):
            assert theirs.fields[name].contents() == ours.fields[name].contents(), name


# --------------------------------------------------------------------------------------------------
# Bad folders: one line naming the problem, nothing written
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def v7_folder(tmp_path) -> Path:
    export_hf(_checkpoint(tmp_path, "7"), tmp_path / "hf", tokenizer="none")
    return tmp_path / "hf"


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def _shard(folder: Path) -> None:
    """Split model.safetensors into two shards with an index, as save_pretrained does for big models."""
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_folders_load(v7_folder, tmp_path):
    expected = load_state_dict(v7_folder)
    _shard(v7_folder)
    again = load_state_dict(v7_folder)
    assert sorted(again) == sorted(expected) and all(torch.equal(again[k], expected[k]) for k in expected)


def test_pytorch_model_bin_loads_and_one_carrying_code_is_refused(v7_folder):
    expected = load_state_dict(v7_folder)
    torch.save(load_file(str(v7_folder / "model.safetensors")), v7_folder / "pytorch_model.bin")
    (v7_folder / "model.safetensors").unlink()
    again = load_state_dict(v7_folder)
    assert all(torch.equal(again[k], expected[k]) for k in expected)

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    with open(v7_folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embeddings.weight": Payload()}, f, protocol=2)
    with pytest.raises(RwkvkitError, match="could run code"):
        load_state_dict(v7_folder)


def _broken(folder: Path, problem: str) -> str:
    """Break the folder one way; returns words the error must contain."""
    if problem == "missing shard":
        _shard(folder)
        (folder / "model-00002-of-00002.safetensors").unlink()
        return "1 of 2 shard(s) missing"
    if problem == "unknown model_type":
        _edit_config(folder, model_type="llama", architectures=["LlamaForCausalLM"])
        return "model_type 'llama' (architectures: LlamaForCausalLM)"
    if problem == "config disagrees":
        _edit_config(folder, hidden_size=128)
        return "config.json says hidden_size 128, but the tensors give 64"
    if problem == "no config":
        (folder / "config.json").unlink()
        return "without config.json"
    if problem == "no weights":
        (folder / "model.safetensors").unlink()
        return "no weights"
    tensors = load_file(str(folder / "model.safetensors"))
    if problem == "mismatched shape":
        tensors["model.layers.1.attn.k_proj.weight"] = torch.zeros(64, 32)
        words = "'blocks.1.att.key.weight' has shape (64, 32), expected (64, 64)"
    else:  # a tensor no RWKV-7 has
        tensors["model.layers.1.attn.q_proj.weight"] = torch.zeros(64, 64)
        words = "key(s) this RWKV-7 model does not use"
    save_file(tensors, str(folder / "model.safetensors"))
    return words


BAD_FOLDERS = (
    "missing shard",
    "unknown model_type",
    "config disagrees",
    "no config",
    "no weights",
    "mismatched shape",
    "unknown tensor",
)


@pytest.mark.parametrize("problem", BAD_FOLDERS)
def test_bad_folders_get_one_line_and_exit_2(v7_folder, tmp_path, capsys, problem):
    words = _broken(v7_folder, problem)
    with pytest.raises(RwkvkitError, match=None) as error:
        load_model(v7_folder)
    assert words in str(error.value) and "\n" not in str(error.value)
    capsys.readouterr()
    out = tmp_path / "out.safetensors"
    assert main(["quantize", str(v7_folder), "--to", "int8", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["export", str(v7_folder), "--to", "hf", "-o", str(tmp_path / "again")]) == 2
    assert not (tmp_path / "again").exists()


def test_export_refuses_a_non_empty_folder_and_leaves_it_alone(tmp_path, capsys):
    pth = _checkpoint(tmp_path, "4")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(pth), "--to", "hf", "-o", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import rwkvkit.export.hf as hf_export

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_export, "hf_config", full_disk)
    with pytest.raises(RwkvkitError, match="No space left on device"):
        export_hf(_checkpoint(tmp_path, "4"), tmp_path / "out", tokenizer="none")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v4-float32.pth"]


def test_a_tuned_state_is_refused(tmp_path):
    with pytest.raises(RwkvkitError, match="time_state"):
        export_hf(_checkpoint(tmp_path, "6", time_state=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Every command that takes a model takes a folder
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory) -> tuple[Path, Path]:
    """(an RWKV-7 .pth with the World vocabulary, its exported folder with the World tokenizer files)."""
    tmp = tmp_path_factory.mktemp("world")
    pth = _checkpoint(tmp, "7", seed=7, **LLAMA_SHAPES["7"])  # heads of 64: llama.cpp runs it
    assert main(["export", str(pth), "--to", "hf", "-o", str(tmp / "hf")]) == 0
    return pth, tmp / "hf"


def test_cli_export_writes_the_tokenizer_files(world_folder):
    files = {p.name for p in world_folder[1].iterdir()}
    assert {"config.json", "model.safetensors", "rwkv_vocab_v20230424.txt", "tokenizer_config.json"} <= files


def test_generate_on_a_folder_matches_the_checkpoint(world_folder, capsys):
    pth, folder = world_folder
    texts = []
    for model in (pth, folder):
        capsys.readouterr()
        argv = [
            "generate",
            "--model",
            str(model),
            "--prompt",
            "The",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ]
        assert main(argv) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_chat_on_a_folder(world_folder):
    pth, folder = world_folder
    replies = []
    for model in (pth, folder):
        argv = ["chat", "--model", str(model), "--temperature", "0", "--max-tokens", "6"]
        run = subprocess.run(
            [sys.executable, "-m", "rwkvkit", *argv],
            input="hello\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-1000:]
        replies.append(run.stdout.partition("User:")[2])  # after the banner, which names the model
    assert replies[0] == replies[1] and "Assistant:" in replies[0]


def test_quantize_and_export_gguf_from_a_folder(world_folder, tmp_path):
    """The folder gives the same quantized file and the same GGUF file as its .pth."""
    pth, folder = world_folder
    for model, out in ((folder, "f.safetensors"), (pth, "p.safetensors")):
        assert main(["quantize", str(model), "--to", "int8", "-o", str(tmp_path / out)]) == 0
    tokens = torch.tensor([[1, 2, 3, 4]])
    from_folder, from_pth = (load_model(tmp_path / f)(tokens)[0] for f in ("f.safetensors", "p.safetensors"))
    assert torch.equal(from_folder, from_pth)
    pytest.importorskip("gguf")
    for model, out in ((folder, "f.gguf"), (pth, "p.gguf")):
        argv = [
            "export",
            str(model),
            "--to",
            "gguf",
            "--type",
            "q8_0",
            "--name",
            "m",
            "-o",
            str(tmp_path / out),
        ]
        assert main(argv) == 0
    assert (tmp_path / "f.gguf").read_bytes() == (tmp_path / "p.gguf").read_bytes()


def test_train_init_from_a_folder(tmp_path, capsys):
    pth = _checkpoint(tmp_path, "7", vocab_size=256)
    export_hf(pth, tmp_path / "hf", tokenizer="none")
    data = tmp_path / "data.txt"
    data.write_text("to be or not to be, that is the question. " * 40)
    out = tmp_path / "run"
    argv = ["train", "--init-from", str(tmp_path / "hf"), "--data", str(data), "--tokenizer", "byte"]
    argv += ["--ctx-len", "32", "--batch-size", "2", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    saved = sorted(out.glob("**/*.pth"))
    assert saved and load_model(saved[-1]).config == load_model(pth).config


def test_serve_a_folder(world_folder):
    httpx = pytest.importorskip("httpx")
    from test_server_load import Server

    server = Server(world_folder[1])
    try:
        body = {"model": "hf", "prompt": "The", "max_tokens": 4, "temperature": 0}
        reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        assert "choices" in reply, reply
        assert reply["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        server.stop()


def test_transformers_loads_the_exported_rwkv4_folder_with_its_tokenizer_and_generates_like_rwkvkit(tmp_path):
    """AutoTokenizer and AutoModelForCausalLM on the exported folder alone (no rwkvkit code involved):
    the tokenizer gives the World ids, and transformers' greedy generate gives rwkvkit's greedy text."""
    transformers = pytest.importorskip("transformers")
    from rwkvkit.infer.generate import generate_text
    from rwkvkit.tokenizer import WorldTokenizer

    pth = _checkpoint(tmp_path, "4", vocab_size=65536, seed=11)
    assert main(["export", str(pth), "--to", "hf", "-o", str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == "RwkvForCausalLM"
    prompt = "Hello, 世界! 🙂 def f(x):\n\treturn x"
    ids = tokenizer(prompt)["input_ids"]
    assert ids == WorldTokenizer().encode(prompt)
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = tokenizer.decode(out[0, len(ids) :])
    ours = generate_text(
        load_model(pth), WorldTokenizer(), prompt, max_tokens=8, temperature=0, stop_tokens=()
    )
    assert theirs == ours.text and len(out[0]) == len(ids) + 8


def test_a_folder_saved_by_rwkvkit_hf_loads_as_the_same_model(tmp_path):
    pytest.importorskip("transformers")
    from rwkvkit.hf import RwkvkitForCausalLM

    pth = _checkpoint(tmp_path, "6", seed=2)
    RwkvkitForCausalLM.from_rwkvkit(load_model(pth)).save_pretrained(tmp_path / "wrapped")
    assert sorted(load_state_dict(tmp_path / "wrapped")) == sorted(torch.load(pth, weights_only=True))
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(load_model(tmp_path / "wrapped")(tokens)[0], load_model(pth)(tokens)[0])
    _edit_config(tmp_path / "wrapped", n_embd=128)
    with pytest.raises(RwkvkitError, match="config.json says n_embd 128, but the tensors give 64"):
        load_model(tmp_path / "wrapped")
