"""Weight-only quantization: the layers against their dequantized weights, whole models against fp32,
the quantized file format (round trip, refusals), the CLI, and quality on a model trained on Shakespeare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkpoints import random_state_dict

from rwkvkit import RwkvkitError, load_model, native
from rwkvkit.blas import fast_decode
from rwkvkit.cli import main as cli_main
from rwkvkit.models import load_quantized, model_from_state_dict
from rwkvkit.quant import layers as quant_layers
from rwkvkit.quant import quantize_model, quantized_names, save_quantized
from rwkvkit.quant.layers import (
    PREFILL_ROWS,
    Int4Linear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
    unpack_int4,
    unpack_int4_cpu_layout,
)

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "shakespeare"


def test_int8_and_int4_reconstruct_within_half_a_step():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()  # round to nearest: at most half a step per row
    packed, s4, z4 = quantize_int4(w, 32)
    assert packed.shape == (48, 64) and packed.dtype == torch.uint8
    codes = unpack_int4(packed)
    assert codes.min() >= 0 and codes.max() <= 15
    w4 = (codes.float() - 8) * s4.repeat_interleave(32, 1) + z4.repeat_interleave(32, 1)
    assert ((w4 - w).abs() <= s4.repeat_interleave(32, 1) / 2 + 1e-6).all()


# 128: held packed only; 80: packed, not in 64-row blocks (both forms kept); 72: no kernel (N % 16)
@pytest.mark.parametrize("out_features", [128, 80, 72])
def test_int4_layers_hold_their_weights_once_and_give_them_back_exactly(out_features):
    with native.enabled(False):  # torch's packed layout (the native kernels read the portable nibbles)
        _check_int4_layer_holds_weights_once(out_features)


def _check_int4_layer_holds_weights_once(out_features):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(out_features, 128, generator=g)
    packed, scales, zeros = quantize_int4(w, 32)
    layer = Int4Linear(packed.clone(), scales, zeros, group_size=32)
    assert (layer._packed is None) == (out_features % 16 != 0)
    # torch's packed layout depends on the CPU (AVX-512 or AVX2 kernels): where it reads back exactly,
    # the layer keeps no second copy (on AVX-512 machines: out_features % 64 == 0)
    back = None if layer._packed is None else unpack_int4_cpu_layout(layer._packed, out_features, 128)
    reads_back = back is not None and torch.equal(back, unpack_int4(packed))
    assert (layer.qweight is None) == reads_back
    if layer.qweight is None:  # torch's packed layout read back, checked against the values packed
        assert torch.equal(unpack_int4_cpu_layout(layer._packed, out_features, 128), unpack_int4(packed))
    assert torch.equal(layer.portable_qweight(), packed)
    assert torch.equal(layer.state_dict()["qweight"], packed)
    assert list(layer.state_dict()) == ["qweight", "scales", "zeros"]
    codes = unpack_int4(packed).float()
    expected = (codes - 8) * scales.repeat_interleave(32, 1) + zeros.repeat_interleave(32, 1)
    assert torch.allclose(layer.dequantize(), expected)
    x = torch.randn(3, 128, generator=g)
    y = layer(x)
    # converting the layer re-derives the portable weights and packs again: same results
    layer.to(torch.float64)
    assert (layer.qweight is None) == reads_back and layer.scales.dtype == torch.float64
    assert torch.allclose(layer.float()(x), y) and torch.equal(layer.portable_qweight(), packed)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, PREFILL_ROWS + 3])  # the weight-only kernels, then bf16 GEMM
def test_quantized_layers_compute_with_their_dequantized_weights(kind, rows):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=g) * 0.05
    layer = (
        Int8Linear(*quantize_int8(w)) if kind == "int8" else Int4Linear(*quantize_int4(w, 64), group_size=64)
    )
    x = torch.randn(2, rows, 128, generator=g)
    y = layer(x)
    assert y.shape == (2, rows, 96) and y.dtype == torch.float32
    expected = F.linear(x, layer.dequantize(torch.float32))
    # bf16 activations and outputs: relative error of bf16 rounding
    assert (y - expected).norm() / expected.norm() < 1e-2


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("bf16_math", [False, True])
def test_prompts_dequantize_to_fp32_where_the_cpu_lacks_bf16_math(monkeypatch, kind, bf16_math):
    """Many rows: the dequantized weight's GEMM, in fp32 on a CPU without bf16 arithmetic (exactly
    F.linear with the fp32 weights), in bf16 on one with it."""
    monkeypatch.setattr(quant_layers, "cpu_has_bf16_math", lambda: bf16_math)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 128, generator=g) * 0.05
    layer = (
        Int8Linear(*quantize_int8(w)) if kind == "int8" else Int4Linear(*quantize_int4(w, 64), group_size=64)
    )
    x = torch.randn(1, PREFILL_ROWS, 128, generator=g)  # (B, T, K)
    y = layer(x)
    dtype = torch.bfloat16 if bf16_math else torch.float32
    assert quant_layers.prompt_dtype(x) == dtype
    assert torch.equal(y, F.linear(x.to(dtype), layer.dequantize(dtype)).float())


def test_a_quantized_model_stays_close_to_fp32():
    sd = random_state_dict("7", n_layer=2, n_embd=128, head_size=32, vocab_size=300, seed=2)
    tokens = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact, _ = model_from_state_dict(sd)(tokens)
        # random gaussian weights amplify rounding (int4: 16 levels per group); a wrong scale or nibble
        # order gives errors of 100% and more. Quality on a trained model is checked below.
        for scheme, bound in (("int8", 0.05), ("int4", 0.35)):
            model = quantize_model(model_from_state_dict(sd), scheme, group_size=32)
            assert len(quantized_names(model)) == 2 * 6 + 1  # 4 att + 2 ffn projections per layer, head
            approx, _ = model(tokens)
            rel = ((approx - exact).norm() / exact.norm()).item()
            assert rel < bound, (scheme, rel)
            # the decode fast path (one token) agrees with the sequence path for quantized layers too
            # (with fp32 activations in the native kernels: int8 activations round a little differently
            # from one path to the other; tests/test_native.py bounds that)
            with fast_decode(False), native.exact_activations():
                general, state = model(tokens[:, :5])
                out_general, _ = model(tokens[:, 5:6], state)
            with native.exact_activations():
                out_fast, _ = model(tokens[:, 5:6], state)
            assert torch.allclose(out_fast, out_general, atol=1e-4 * out_general.abs().max().item())


@pytest.mark.parametrize("version", ["4", "6", "7"])
def test_the_quantized_file_round_trips(tmp_path, version):
    sd = random_state_dict(version, n_layer=2, n_embd=64, vocab_size=97, seed=3, dtype=torch.bfloat16)
    model = quantize_model(model_from_state_dict(sd), "int4", group_size=32)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    again = load_model(path)  # recognised as quantized by the generic loader
    assert again.quantization == {"scheme": "int4", "group_size": 32} and again.config == model.config
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(tokens)[0], again(tokens)[0])
    # the weights are held once: with the native kernels as the portable nibbles they read; else the
    # (64, 64) projections in torch's packed form only (where that layout reads back exactly on this
    # CPU). Written again, the file has the same tensors
    int4 = [m for m in again.modules() if isinstance(m, Int4Linear)]
    if native.load() is not None:
        assert all(m.qweight is not None and m._packed is None for m in int4)
    with native.enabled(False):
        torch_held = load_model(path)
    torch_int4 = [m for m in torch_held.modules() if isinstance(m, Int4Linear) and m._packed is not None]
    reads_back = [
        unpack_int4_cpu_layout(m._packed, m.out_features, m.in_features) is not None for m in torch_int4
    ]
    assert any(m.qweight is None for m in torch_int4) == any(
        back and torch.equal(unpack_int4_cpu_layout(m._packed, m.out_features, m.in_features), m._values())
        for m, back in zip(torch_int4, reads_back, strict=True)
    )
    save_quantized(again, tmp_path / "again.safetensors")
    from safetensors.torch import load_file

    first, second = load_file(path), load_file(tmp_path / "again.safetensors")
    assert list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["rwkvkit_format"] == "rwkvkit-quantized-1" and meta["scheme"] == "int4"
    assert json.loads(meta["config"])["version"] == version
    assert "head.qweight" in keys and "head.weight" not in keys and "emb.weight" in keys
    # unquantized tensors keep the checkpoint's dtype (bf16 here); small matrices are not quantized
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("emb.weight").dtype == torch.bfloat16
        assert f.get_tensor("blocks.0.ln1.weight").dtype == torch.bfloat16


def test_damaged_and_mismatched_quantized_files_are_refused(tmp_path):
    model = quantize_model(model_from_state_dict(random_state_dict("7", seed=4)), "int8")
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    del tensors["head.scales"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(RwkvkitError, match="head.scales"):
        load_quantized(tmp_path / "missing.safetensors")
    broken = dict(meta, config="{not json")
    save_file(load_file(str(path)), str(tmp_path / "broken.safetensors"), metadata=broken)
    with pytest.raises(RwkvkitError, match="damaged"):
        load_quantized(tmp_path / "broken.safetensors")
    with pytest.raises(RwkvkitError, match="not quantized"):
        save_quantized(model_from_state_dict(random_state_dict("7", seed=4)), tmp_path / "x.safetensors")
    with pytest.raises(RwkvkitError, match="unknown quantization"):
        quantize_model(model_from_state_dict(random_state_dict("7", seed=4)), "int3")


def test_quantize_command(tmp_path, capsys):
    src = tmp_path / "m.pth"
    torch.save(random_state_dict("7", n_layer=2, n_embd=64, vocab_size=256, seed=5), src)
    out = tmp_path / "m-int8.safetensors"
    assert cli_main(["quantize", str(src), "--to", "int8", "-o", str(out)]) == 0
    assert "13 matrices quantized" in capsys.readouterr().out and out.stat().st_size < src.stat().st_size
    assert cli_main(["info", str(out)]) == 0
    assert "quantized   int8" in capsys.readouterr().out
    assert (
        cli_main(["generate", "-m", str(out), "-p", "Hello", "--max-tokens", "5", "--temperature", "0"]) == 0
    )
    capsys.readouterr()
    assert cli_main(["quantize", str(out), "--to", "int4", "-o", str(tmp_path / "again.safetensors")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert cli_main(["quantize", str(src), "--to", "int4", "-o", str(tmp_path / "x.pth")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    # training and merging need the full-precision weights
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 50)
    train = ["train", "--init-from", str(out), "--data", str(text), "--tokenizer", "byte"]
    assert cli_main([*train, "--out", str(tmp_path / "run"), "--steps", "1", "--ctx-len", "16"]) == 2
    assert "quantized model" in capsys.readouterr().err
    (tmp_path / "a.safetensors").write_bytes(b"")
    merge = ["merge", "--base", str(out), "--adapter", str(tmp_path / "a.safetensors")]
    assert cli_main([*merge, "-o", str(tmp_path / "merged.pth")]) == 2
    assert "quantized model" in capsys.readouterr().err


def test_quality_on_a_model_trained_on_shakespeare(tmp_path):
    """Validation loss of int8 within 0.5% of fp32, int4 within 3% (a small model trained here)."""
    from rwkvkit.train.data import eval_windows
    from rwkvkit.train.trainer import TrainConfig, evaluate, train

    (tmp_path / "train.txt").write_text((SHAKESPEARE / "train.txt").read_text(encoding="utf-8")[:400_000])
    cfg = TrainConfig(
        data=str(tmp_path / "train.txt"), out=str(tmp_path / "run"), n_layer=2, n_embd=128, head_size=32,
        ctx_len=64, batch_size=8, steps=120, lr=3e-3, warmup_steps=5, progress=False, plot_every=0,
    )  # fmt: skip
    model_path = train(cfg).model_path
    val = np.frombuffer((SHAKESPEARE / "val.txt").read_bytes()[:32_769], dtype=np.uint8).astype(np.int64)
    windows = eval_windows(val, 256)
    exact = evaluate(load_model(model_path), *windows)
    assert exact < 2.6  # it did learn
    for scheme, bound in (("int8", 0.005), ("int4", 0.03)):
        quantized = quantize_model(load_model(model_path), scheme, group_size=64)
        loss = evaluate(quantized, *windows)
        assert abs(loss - exact) / exact < bound, (scheme, loss, exact)


def test_weights_at_an_unaligned_address_are_copied_before_the_kernels_read_them():
    """Tensors read from a file's buffer can start at any byte; the CPU kernels need aligned weights
    (an unaligned int8 weight crashed the process in torch's kernel before this was handled)."""
    q, scales = quantize_int8(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    buffer = torch.zeros(q.numel() + 1, dtype=torch.int8)
    buffer[1:] = q.flatten()
    unaligned = buffer[1:].view(64, 64)
    assert unaligned.data_ptr() % 64 != 0
    layer = Int8Linear(unaligned, scales)
    assert layer.qweight.data_ptr() % 64 == 0 and torch.equal(layer.qweight, q)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    with native.enabled(False):  # torch's weight-only kernel (the one that crashed)
        assert torch.allclose(layer(x), F.linear(x, layer.dequantize()), rtol=2e-2, atol=2e-2)
    with native.exact_activations():  # the native kernel reads the same aligned copy
        assert torch.allclose(layer(x), F.linear(x, layer.dequantize()), rtol=1e-5, atol=1e-5)
