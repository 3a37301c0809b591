"""The native CPU decode path (rwkvkit.native) against the pure-torch model it must reproduce.

Kernels: every weight format against a plain torch product on the dequantized weights (fp32 / bf16 to
rounding; int8 / int4, which quantize activations in blocks of 32, within the bound that quantization
allows, and exactly with fp32 activations). Steps: each version's one-token step against the torch
model's one-token forward from the same state, along a trajectory, for fp32 / bf16 / int8 / int4, one row
and several, odd widths, a 65536 vocab, tuned initial states, RWKV-4's time-mix width (dim_att) and
RWKV-7's layer-0 values. Fallback: with
``RWKVKIT_NATIVE=0`` or no compiler, everything decodes on the torch path and says why once.
"""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys

import pytest
import torch
from checkpoints import BUILDERS, random_state_dict
from torch import nn

from rwkvkit import blas, native
from rwkvkit.models import model_from_state_dict
from rwkvkit.native import matrix as nm
from rwkvkit.native import step as native_step
from rwkvkit.quant import quantize_model
from rwkvkit.quant.layers import Int4Linear, Int8Linear, quantize_int4, quantize_int8

NATIVE_VERSIONS = ["4", "5.2", "6", "7"]  # the versions with a native step (src/step_v*.cpp)

pytestmark = pytest.mark.skipif(native.load() is None, reason="the native library did not build here")


def lib():
    return native.load()


# ---------------------------------------------------------------------------------------------- kernels


def _packed(kind: str, w: torch.Tensor, group_size: int = 32):
    """(PackedMatrix, the exact weight it stands for (fp32), the layer keeping its tensors)."""
    if kind in ("fp32", "bf16"):
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data = w.to(torch.float32 if kind == "fp32" else torch.bfloat16).contiguous()
        return nm.matrix_for(layer), layer.weight.float(), layer
    if kind == "int8":
        layer = Int8Linear(*quantize_int8(w))
    else:
        layer = Int4Linear(*quantize_int4(w, group_size), group_size)
    return nm.matrix_for(layer), layer.dequantize(torch.float32), layer


def _activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Largest |error| int8 activations in blocks of 32 can add to x W^T: sum_k |w_k| step_k / 2."""
    B, K = x.shape
    step = x.abs().view(B, K // 32, 32).amax(-1) / 127.0  # (B, K/32)
    return (step.repeat_interleave(32, dim=1) / 2) @ w.abs().T  # (B, N)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("rows, cols, batch", [(37, 96, 1), (64, 768, 3), (130, 128, 64)])
def test_kernel_matches_torch_on_the_exact_weights(kind, rows, cols, batch):
    g = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=g) * 0.05
    x = torch.randn(batch, cols, generator=g)
    packed, exact, _keep = _packed(kind, w)
    expected = x @ exact.T  # (B, N)
    reference = nm.matmul(lib(), packed, x, reference=True)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    y = nm.matmul(lib(), packed, x)
    if kind in ("fp32", "bf16"):
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    else:
        err = (y - expected).abs()
        assert (err <= _activation_bound(x, exact) * 1.01 + 1e-4).all(), err.max()
        assert err.max() > 0  # it does quantize activations (else the bound test tests nothing)
        with native.exact_activations():
            torch.testing.assert_close(nm.matmul(lib(), packed, x), expected, rtol=1e-5, atol=1e-5)


def test_int4_kernel_reads_every_group_size():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(48, 256, generator=g), torch.randn(2, 256, generator=g)
    for group_size in (32, 64, 128):
        packed, exact, _keep = _packed("int4", w, group_size)
        with native.exact_activations():
            torch.testing.assert_close(nm.matmul(lib(), packed, x), x @ exact.T, rtol=1e-5, atol=1e-4)


def test_unsupported_layers_have_no_descriptor():
    assert nm.matrix_for(nn.Linear(32, 8, bias=True)) is None
    assert nm.matrix_for(nn.Linear(32, 8, bias=False).half()) is None
    assert nm.matrix_for(Int8Linear(*quantize_int8(torch.randn(8, 40)))) is None  # 40 % 32 != 0


# ------------------------------------------------------------------------------------------------ steps


def _model(version: str, dtype=torch.float32, **kwargs):
    """A random model of ``version``; the kwargs its checkpoint builder has no knob for are dropped
    (RWKV-4 has no heads and no tuned state: head_size and time_state mean nothing there)."""
    knobs = inspect.signature(BUILDERS[version]).parameters
    kwargs = {name: value for name, value in kwargs.items() if name in knobs}
    model = model_from_state_dict(random_state_dict(version, **kwargs)).eval()
    return model.to(dtype)


def _exact_twin(model: nn.Module) -> nn.Module:
    """The fp32 torch model with exactly the weights ``model`` computes with (dequantized, upcast)."""
    twin = copy.deepcopy(model).float()
    for name, module in model.named_modules():
        if hasattr(module, "dequantize"):
            parent, _, child = name.rpartition(".")
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = module.dequantize(torch.float32)
            setattr(twin.get_submodule(parent) if parent else twin, child, linear)
    return twin.eval()


def _compare_along(model, twin, tokens: torch.Tensor, atol: float, steps: int | None = None):
    """Run the torch twin along ``tokens`` (B, T); at every step also run the native step from the same
    state and compare logits and every piece of the new state."""
    B, T = tokens.shape
    step = native_step.step_for(model)
    assert step is not None, "the model has no native step"
    state = model.initial_state(B)
    with torch.no_grad(), blas.fast_decode(False):
        for t in range(steps or T):
            logits, new_state = twin(tokens[:, t : t + 1], _as_fp32(state))
            native_logits, native_state = step.step(tokens[:, t], state)
            scale = logits.abs().max().item()
            torch.testing.assert_close(native_logits, logits[:, 0], rtol=0, atol=atol * max(1.0, scale))
            for name in ("att_shift", "wkv", "ffn_shift"):
                a, b = getattr(native_state, name), getattr(new_state, name)
                b = b.to(a.dtype).float()  # shifts are held in the model dtype (rounded to bf16 there)
                # bf16 shifts: one rounding step apart at most (an fp32 value on the edge between two)
                tol, rtol = (atol, 0.0) if a.dtype == torch.float32 else (2**-8, 2**-7)
                torch.testing.assert_close(a.float(), b, rtol=rtol, atol=tol * max(1.0, b.abs().max().item()))
            state = native_state


def _as_fp32(state):
    return type(state)(state.att_shift.float(), state.wkv, state.ffn_shift.float())


@pytest.mark.parametrize("version", NATIVE_VERSIONS)
@pytest.mark.parametrize("batch", [1, 5])
def test_fp32_step_matches_torch(version, batch):
    model = _model(version, n_layer=3, n_embd=96, head_size=32, vocab_size=211, seed=1)
    tokens = torch.randint(0, 211, (batch, 24), generator=torch.Generator().manual_seed(2))
    _compare_along(model, model, tokens, atol=2e-5)


@pytest.mark.parametrize("version", NATIVE_VERSIONS)
def test_bf16_step_matches_torch_on_the_same_weights(version):
    model = _model(version, torch.bfloat16, n_layer=2, n_embd=64, head_size=16, vocab_size=97, seed=3)
    tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(4))
    _compare_along(model, _exact_twin(model), tokens, atol=2e-5)


@pytest.mark.parametrize("version", NATIVE_VERSIONS)
@pytest.mark.parametrize("scheme, group_size", [("int8", 0), ("int4", 32), ("int4", 64)])
def test_quantized_step_matches_torch_on_the_dequantized_weights(version, scheme, group_size):
    model = _model(version, n_layer=2, n_embd=128, head_size=32, vocab_size=300, seed=5)
    quantized = quantize_model(model, scheme, group_size or 64)
    twin = _exact_twin(quantized)
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(6))
    with native.exact_activations():
        _compare_along(quantized, twin, tokens, atol=2e-5)
    # with int8 activations: close, not equal (quantizing x in blocks of 32 costs ~1% of a product)
    _compare_along(quantized, twin, tokens, atol=0.1, steps=4)


@pytest.mark.parametrize("version", NATIVE_VERSIONS)
def test_step_with_tuned_state_large_vocab_and_no_layer0_value_lora(version):
    shape = dict(n_layer=2, n_embd=64, head_size=32, vocab_size=65536)
    model = _model(version, **shape, time_state=True, layer0_value_lora=False)
    tokens = torch.randint(0, 65536, (2, 6), generator=torch.Generator().manual_seed(7))
    _compare_along(model, model, tokens, atol=2e-5)


@pytest.mark.parametrize("dim_att", [48, 160])
def test_v4_step_with_a_time_mix_narrower_or_wider_than_the_model(dim_att):
    model = _model("4", n_layer=2, n_embd=96, dim_att=dim_att, vocab_size=101, seed=12)
    assert model.config.dim_att == dim_att
    tokens = torch.randint(0, 101, (3, 10), generator=torch.Generator().manual_seed(13))
    _compare_along(model, model, tokens, atol=2e-5)


@pytest.mark.parametrize("version", NATIVE_VERSIONS)
def test_model_forward_decodes_natively_and_matches_the_torch_path(version):
    model = _model(version, n_layer=2, n_embd=64, head_size=16, vocab_size=97, seed=8)
    tokens = torch.randint(0, 97, (4, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, state = model(tokens[:, :8])  # prefill on the torch path
        native_state = torch_state = state
        for t in range(8, 20):
            native_logits, native_state = model(tokens[:, t : t + 1], native_state)
            with blas.fast_decode(False):
                torch_logits, torch_state = model(tokens[:, t : t + 1], torch_state)
            torch.testing.assert_close(native_logits, torch_logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(native_state.wkv, torch_state.wkv, rtol=0, atol=1e-4)
    assert native_step.step_for(model) is not None


@pytest.mark.parametrize("version", NATIVE_VERSIONS)
def test_step_is_rebuilt_when_weights_change(version):
    model = _model(version, n_layer=1, n_embd=64, head_size=16, vocab_size=97, seed=10)
    tok = torch.tensor([[3]])
    with torch.no_grad():
        before = model(tok)[0]
        first = native_step.step_for(model)
        other = _model(version, n_layer=1, n_embd=64, head_size=16, vocab_size=97, seed=11)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(tok)[0], other(tok)[0], rtol=0, atol=1e-5)
        assert not torch.allclose(model(tok)[0], before)
        model.head = nn.Linear(64, 97, bias=True)  # replaced by a layer without a kernel: torch path
        assert native_step.step_for(model) is None
        with blas.fast_decode(False):
            expected = model(tok)[0]
        torch.testing.assert_close(model(tok)[0], expected)
    assert first is not None


# --------------------------------------------------------------------------------------------- fallback


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


DECODE = """
import torch
from rwkvkit import native
from rwkvkit.models import new_model
from rwkvkit.native.step import step_for
model = new_model("7", 1, 64, 50, head_size=16)
with torch.no_grad():
    logits, state = model(torch.tensor([[1]]))
print("STATUS", native.status())
print("STEP", step_for(model) is not None, bool(torch.isfinite(logits).all()))
"""


def test_opt_out_runs_the_torch_path():
    out = _run(DECODE, RWKVKIT_NATIVE="0")
    assert out.returncode == 0, out.stderr
    assert "STATUS pure torch (RWKVKIT_NATIVE=0)" in out.stdout
    assert "STEP False True" in out.stdout
    assert "native CPU decode off" not in out.stderr  # the user asked for it: no warning


def test_no_compiler_falls_back_with_one_line(tmp_path):
    out = _run(DECODE, CXX="/nonexistent/g++", PATH=str(tmp_path), RWKVKIT_CACHE=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    assert "STEP False True" in out.stdout
    assert out.stderr.count("native CPU decode off") == 1, out.stderr


def test_build_is_cached_per_machine(tmp_path):
    env = {"RWKVKIT_CACHE": str(tmp_path)}
    first = _run(DECODE, **env)
    assert first.returncode == 0 and "STEP True True" in first.stdout, first.stderr
    libs = list(tmp_path.glob("native/*/librwkvkit_native.so"))
    assert len(libs) == 1
    mtime = libs[0].stat().st_mtime_ns
    second = _run(DECODE, **env)
    assert "STEP True True" in second.stdout
    assert libs[0].stat().st_mtime_ns == mtime  # loaded, not compiled again


def test_quantized_layers_compute_through_the_native_kernels_holding_weights_once():
    g = torch.Generator().manual_seed(12)
    w, x = torch.randn(64, 128, generator=g) * 0.05, torch.randn(5, 128, generator=g)
    packed, scales, zeros = quantize_int4(w, 64)
    layer = Int4Linear(packed.clone(), scales, zeros, group_size=64)
    assert layer._packed is None and torch.equal(layer.qweight, packed)  # only the portable nibbles
    assert layer.native_matrix().tensors[0] is layer.qweight  # the kernels read them: no copy
    torch.testing.assert_close(layer(x), nm.matmul(lib(), layer.native_matrix(), x))
    for quantized in (layer, Int8Linear(*quantize_int8(w))):
        exact = x @ quantized.dequantize(torch.float32).T
        assert (quantized(x) - exact).norm() / exact.norm() < 1e-2
        with native.enabled(False):  # the torch path on the same layer
            assert (quantized(x) - exact).norm() / exact.norm() < 1e-2
    layer.to(torch.float64)  # scales no longer fp32: no native descriptor, torch's path
    assert layer.native_matrix() is None and layer._packed is not None


def test_info_reports_the_decode_path(tmp_path):
    from rwkvkit.checkpoint import save_state_dict
    from rwkvkit.cli.info import checkpoint_info

    path = tmp_path / "m.pth"
    save_state_dict(random_state_dict("7"), path)
    assert checkpoint_info(path)["decode_path"].startswith("native, up to 64 rows")
    code = f"from rwkvkit.cli import main; main(['info', {str(path)!r}])"
    out = _run(code, RWKVKIT_NATIVE="0")
    assert "decoding    pure torch (RWKVKIT_NATIVE=0)" in out.stdout, out.stderr


PORTABLE = """
import torch
from torch import nn
from rwkvkit import blas, native
from rwkvkit.models import new_model
from rwkvkit.native import matrix as nm
from rwkvkit.quant.layers import Int4Linear, Int8Linear, quantize_int4, quantize_int8
print("BUILD", native.status())
torch.manual_seed(0)
model = new_model("7", 2, 64, 97, head_size=16)
for p in model.parameters():
    p.data.add_(torch.randn_like(p) * 0.05)
tokens = torch.randint(0, 97, (3, 6))
with torch.no_grad():
    a = b = None
    for t in range(6):
        la, a = model(tokens[:, t : t + 1], a)
        with blas.fast_decode(False), native.enabled(False):
            lb, b = model(tokens[:, t : t + 1], b)
print("STEP", float((la - lb).abs().max()), float((a.wkv - b.wkv).abs().max()))
w, x = torch.randn(40, 128) * 0.05, torch.randn(5, 128)
bf16 = nn.Linear(128, 40, bias=False).bfloat16()
for name, layer in (("bf16", bf16), ("int8", Int8Linear(*quantize_int8(w))),
                    ("int4", Int4Linear(*quantize_int4(w, 64), 64))):
    packed = nm.matrix_for(layer)
    exact = x @ (layer.weight.float() if name == "bf16" else layer.dequantize(torch.float32)).T
    err = (nm.matmul(native.load(), packed, x) - exact).abs().max() / exact.abs().max()
    print("KERNEL", name, float(err))
"""


def test_the_portable_build_without_vector_instructions(tmp_path):
    """The plain loops every kernel falls back to on a CPU without AVX2, built for baseline x86-64."""
    if os.uname().machine != "x86_64":
        pytest.skip("-march=x86-64 is an x86 baseline")
    out = _run(PORTABLE, RWKVKIT_NATIVE_MARCH="x86-64", RWKVKIT_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "BUILD native (rwkvkit-native 1 (portable))" in out.stdout, out.stdout
    step = next(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("STEP"))
    assert float(step[0]) < 1e-4 and float(step[1]) < 1e-4, step
    kernels = {
        line.split()[1]: float(line.split()[2]) for line in out.stdout.splitlines() if "KERNEL" in line
    }
    # bf16: rounding only; int8 / int4: the int8 activations (~1% of the largest output at most)
    assert kernels["bf16"] < 1e-5 and 0 < kernels["int8"] < 2e-2 and 0 < kernels["int4"] < 2e-2, kernels
