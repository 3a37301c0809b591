"""Tests for the fla adapter (rwkvkit.wkv.fla_backend) on the CPU, with a fake ``fla`` package.

fla's kernels need Triton and CUDA, so the fake ``fla`` installed here (into sys.modules) has fla 0.6's
exact signatures of ``chunk_rwkv7`` / ``chunk_rwkv6`` and computes their math the way fla defines it
(state [key, value], fla's argument order, fla's default scale of ``chunk_rwkv6``) with a plain loop of
torch ops, so autograd runs through it. The CUDA requirement is faked by replacing the two device
checks. The adapter's transposes, scale and dtypes are then checked numerically against rwkvkit's own
reference (impl="reference"), outputs, final states and gradients of every input included.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import types
from collections.abc import Iterator

import pytest
import torch

import rwkvkit.wkv as wkv
from rwkvkit.wkv import fla_backend

dispatch = importlib.import_module("rwkvkit.wkv.dispatch")

B, T, H, N = 2, 20, 2, 16


# fla 0.6's signatures, argument for argument (fla/ops/rwkv7/chunk.py, fla/ops/rwkv6/chunk.py).
def _chunk_rwkv7_signature(
    r,
    w,
    k,
    v,
    a,
    b,
    scale: float = 1.0,
    initial_state=None,
    output_final_state: bool = False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    safe_gate: bool = False,
    chunk_size=None,
    disable_recompute: bool = False,
    cp_context=None,
    lower_bound=None,
): ...


def _chunk_rwkv6_signature(
    r,
    k,
    v,
    w,
    u,
    scale=None,
    initial_state=None,
    output_final_state: bool = False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    **kwargs,
): ...


def _fla_rwkv7_math(r, w, k, v, a, b, scale, initial_state):
    """fla's DPLR rule in its own layout: S [key, value], S_t = diag(e^w) S + b (a^T S) + k v^T,
    o_t = scale * S_t^T r_t; computed in float32, o in r's dtype, final state float32."""
    r32, w32, k32, v32, a32, b32 = (x.float() for x in (r, w, k, v, a, b))
    S = r32.new_zeros(B, H, N, N) if initial_state is None else initial_state.float()  # (B, H, K, V)
    outs = []
    for t in range(r.shape[1]):
        r_t, w_t, k_t, v_t, a_t, b_t = (x[:, t] for x in (r32, w32, k32, v32, a32, b32))  # (B, H, K)
        a_s = (a_t.unsqueeze(-1) * S).sum(-2)  # (B, H, V): a^T S
        S = (
            S * w_t.exp().unsqueeze(-1)
            + b_t.unsqueeze(-1) * a_s.unsqueeze(-2)
            + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        )
        outs.append(scale * (r_t.unsqueeze(-1) * S).sum(-2))  # (B, H, V)
    return torch.stack(outs, 1).to(r.dtype), S


def _fla_rwkv6_math(r, k, v, w, u, scale, initial_state):
    """fla's RWKV-6 rule in its layout: o_t = scale * r_t^T (S + diag(u) k_t v_t^T) from the OLD state,
    then S = diag(e^w) S + k v^T; computed in float32."""
    r32, k32, v32, w32 = (x.float() for x in (r, k, v, w))
    u32 = u.float().unsqueeze(-1)  # (H, K, 1)
    S = r32.new_zeros(B, H, N, N) if initial_state is None else initial_state.float()  # (B, H, K, V)
    outs = []
    for t in range(r.shape[1]):
        r_t, k_t, v_t, w_t = (x[:, t] for x in (r32, k32, v32, w32))  # (B, H, K)
        kv = k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # (B, H, K, V)
        outs.append(scale * (r_t.unsqueeze(-1) * (S + u32 * kv)).sum(-2))
        S = S * w_t.exp().unsqueeze(-1) + kv
    return torch.stack(outs, 1).to(r.dtype), S


class FakeFla:
    """The fake package: each call's explicitly passed arguments are recorded in ``calls``."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.calls: list[tuple[str, dict[str, object]]] = []

    def chunk_rwkv7(self, *args, **kwargs):
        bound = inspect.signature(_chunk_rwkv7_signature).bind(*args, **kwargs)  # TypeError if not 0.6's
        self.calls.append(("chunk_rwkv7", dict(bound.arguments)))
        bound.apply_defaults()
        x = bound.arguments
        y, S = _fla_rwkv7_math(*(x[n] for n in ("r", "w", "k", "v", "a", "b", "scale", "initial_state")))
        return y, S if x["output_final_state"] else None

    def chunk_rwkv6(self, *args, **kwargs):
        bound = inspect.signature(_chunk_rwkv6_signature).bind(*args, **kwargs)
        self.calls.append(("chunk_rwkv6", dict(bound.arguments)))
        bound.apply_defaults()
        x = bound.arguments
        if "head_first" in x["kwargs"]:
            raise DeprecationWarning("head_first has been removed")  # as fla 0.6 does
        scale = x["r"].shape[-1] ** -0.5 if x["scale"] is None else x["scale"]  # fla's default
        y, S = _fla_rwkv6_math(*(x[n] for n in ("r", "k", "v", "w", "u")), scale, x["initial_state"])
        return y, S if x["output_final_state"] else None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fla = types.ModuleType("fla")
        fla.__version__ = self.version
        ops = types.ModuleType("fla.ops")
        rwkv7 = types.ModuleType("fla.ops.rwkv7")
        rwkv7.chunk_rwkv7 = self.chunk_rwkv7
        rwkv6 = types.ModuleType("fla.ops.rwkv6")
        rwkv6.chunk_rwkv6 = self.chunk_rwkv6
        for name, module in (
            ("fla", fla),
            ("fla.ops", ops),
            ("fla.ops.rwkv7", rwkv7),
            ("fla.ops.rwkv6", rwkv6),
        ):
            monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture(autouse=True)
def _fresh_fla_import() -> Iterator[None]:
    """Each test imports (fake) fla anew: the adapter caches its import."""
    fla_backend.load_fla.cache_clear()
    yield
    fla_backend.load_fla.cache_clear()


def _fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "on_fused_device", lambda lead: True)
    monkeypatch.setattr(fla_backend, "on_cuda", lambda x: True)


@pytest.fixture
def fake_fla(monkeypatch: pytest.MonkeyPatch) -> FakeFla:
    fake = FakeFla("0.6.0")
    fake.install(monkeypatch)
    _fake_cuda(monkeypatch)
    return fake


def _inputs(
    op: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The op's tensors in its argument order, and an initial state (B, H, N, N) [value, key]."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    state = randn(B, H, N, N) * 0.5
    if op == "wkv6":
        w = -torch.exp(randn(B, T, H, N) - 1.0)
        tensors = [randn(B, T, H, N), w, randn(B, T, H, N), randn(B, T, H, N) * 0.5, randn(H, N)]
    else:
        w = -0.6 * torch.rand(B, T, H, N, generator=gen)
        kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
        iclr = torch.rand(B, T, H, N, generator=gen)
        tensors = [randn(B, T, H, N), w, randn(B, T, H, N), randn(B, T, H, N) * 0.5, -kk, kk * iclr]
    return [x.to(dtype) for x in tensors], state


def _forward_backward(op: str, tensors: list[torch.Tensor], state: torch.Tensor, impl: str | None):
    """y, the final state, and the gradients of every input and of the initial state."""
    leaves = [x.clone().requires_grad_() for x in tensors]
    s0 = state.clone().requires_grad_()
    y, s = getattr(wkv, op)(*leaves, s0, impl=impl)
    loss = (y.float() * torch.cos(y.float())).sum() + (s * torch.sin(s)).sum()
    loss.backward()
    return y, s, [x.grad for x in (*leaves, s0)]


def _check_call(
    args: dict[str, object], state: torch.Tensor, dtype: torch.dtype, names: tuple[str, ...]
) -> None:
    """The arguments the adapter passed: scale 1.0, a final state asked for, the initial state as
    [key, value] float32, every tensor contiguous (B, T, H, N) in r's dtype but w in float32, and nothing
    else (no head_first, chunk_size, lower_bound, cu_seqlens)."""
    assert set(args) == {*names, "scale", "initial_state", "output_final_state"}
    assert args["scale"] == 1.0
    assert args["output_final_state"] is True
    h0 = args["initial_state"]
    assert h0.dtype == torch.float32 and h0.is_contiguous()
    torch.testing.assert_close(h0, state.transpose(-1, -2), rtol=0, atol=0)  # [key, value]
    for name in names:
        x = args[name]
        assert x.is_contiguous(), name
        want = (H, N) if name == "u" else (B, T, H, N)
        assert tuple(x.shape) == want, name
        assert x.dtype == (torch.float32 if name == "w" else dtype), name


@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_fla_matches_reference_with_state_and_gradients(op: str, fake_fla: FakeFla) -> None:
    tensors, state = _inputs(op)
    y_ref, s_ref, g_ref = _forward_backward(op, tensors, state, "reference")
    for impl in ("fla", None):  # by name, and chosen by auto on the (faked) CUDA device
        fake_fla.calls.clear()
        y, s, grads = _forward_backward(op, tensors, state, impl)
        kernel = "chunk_rwkv7" if op == "wkv7" else "chunk_rwkv6"
        names = ("r", "w", "k", "v", "a", "b") if op == "wkv7" else ("r", "k", "v", "w", "u")
        assert [c[0] for c in fake_fla.calls] == [kernel]
        _check_call(fake_fla.calls[0][1], state, torch.float32, names)
        assert y.dtype == torch.float32 and s.dtype == torch.float32 and s.is_contiguous()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)  # [value, key]
        for g, g_want in zip(grads, g_ref, strict=True):
            torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-4)


def test_fla_positional_tensors_reach_the_right_parameters(fake_fla: FakeFla) -> None:
    """chunk_rwkv6 takes (r, k, v, w, u): w and k swapped would run, so check the values land right."""
    (r, w, k, v, u), state = _inputs("wkv6")
    wkv.wkv6(r, w, k, v, u, state, impl="fla")
    args = fake_fla.calls[0][1]
    for name, x in (("r", r), ("k", k), ("v", v), ("w", w), ("u", u)):
        assert torch.equal(args[name], x), name
    (r, w, k, v, a, b), state = _inputs("wkv7")
    wkv.wkv7(r, w, k, v, a, b, state, impl="fla")
    args = fake_fla.calls[1][1]
    for name, x in (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        assert torch.equal(args[name], x), name


def test_fla_without_state_and_rwkv5_expanded_decay(fake_fla: FakeFla) -> None:
    """RWKV-5.2's constant decay comes as a stride-0 (H, N) -> (B, T, H, N) view: fla gets it per step,
    contiguous; no initial state passes None."""
    (r, _, k, v, u), _ = _inputs("wkv6")
    w = (-torch.exp(torch.randn(H, N))).expand(B, T, H, N)
    y, s = wkv.wkv6(r, w, k, v, u, impl="fla")
    args = fake_fla.calls[0][1]
    assert args["initial_state"] is None
    assert args["w"].is_contiguous() and args["w"].stride()[1] != 0
    y_ref, s_ref = wkv.wkv6(r, w, k, v, u, impl="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["wkv7", "wkv6"])
def test_fla_bf16_inputs(op: str, fake_fla: FakeFla) -> None:
    """bf16 inputs: the kernel gets r, k, v, (a, b, u) in bf16, w and the state in float32; y comes back
    bf16, the final state float32 [value, key]."""
    tensors, state = _inputs(op, dtype=torch.bfloat16)
    y, s = getattr(wkv, op)(*tensors, state, impl="fla")
    names = ("r", "w", "k", "v", "a", "b") if op == "wkv7" else ("r", "k", "v", "w", "u")
    _check_call(fake_fla.calls[0][1], state, torch.bfloat16, names)
    y_ref, s_ref = getattr(wkv, op)(*tensors, state, impl="reference")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


def test_fla_is_never_chosen_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With fla importable but a CPU tensor, auto runs the chunked form and impl='fla' says why not;
    the device is checked before fla is imported."""
    fake = FakeFla("0.6.0")
    fake.install(monkeypatch)
    tensors, state = _inputs("wkv7")
    y, _ = wkv.wkv7(*tensors, state)
    assert torch.equal(y, wkv.wkv7(*tensors, state, impl="chunked")[0])
    with pytest.raises(ValueError, match="impl='fla' cannot run these inputs: fla's kernels run on CUDA"):
        wkv.wkv7(*tensors, state, impl="fla")
    assert fake.calls == []
    assert fla_backend.load_fla.cache_info().misses == 0  # never imported


def _reason(op: str, tensors: list[torch.Tensor], state: torch.Tensor | None) -> str | None:
    form = fla_backend.FLA_WKV7 if op == "wkv7" else fla_backend.FLA_WKV6
    return form.unavailable(tensors, state)


def test_fla_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fla: a reason with the install hint, and auto falls back to the chunked form."""
    monkeypatch.setitem(sys.modules, "fla", None)  # makes `import fla` fail as if it were absent
    _fake_cuda(monkeypatch)
    tensors, state = _inputs("wkv6")
    assert _reason("wkv6", tensors, state) == "fla is not installed (pip install 'rwkvkit[gpu]')"
    with pytest.raises(ValueError, match=r"fla is not installed \(pip install 'rwkvkit\[gpu\]'\)"):
        wkv.wkv6(*tensors, state, impl="fla")
    y, _ = wkv.wkv6(*tensors, state)
    assert torch.equal(y, wkv.wkv6(*tensors, state, impl="chunked")[0])


@pytest.mark.parametrize("version", ["0.5.3", "0.7.0", "1.6.0"])
def test_fla_wrong_version(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeFla(version)
    fake.install(monkeypatch)
    _fake_cuda(monkeypatch)
    tensors, state = _inputs("wkv7")
    reason = _reason("wkv7", tensors, state)
    assert (
        reason
        == f"fla {version} is installed, rwkvkit's adapter needs fla 0.6.x (pip install 'rwkvkit[gpu]')"
    )
    y, _ = wkv.wkv7(*tensors, state)  # auto: chunked
    assert fake.calls == []
    assert torch.equal(y, wkv.wkv7(*tensors, state, impl="chunked")[0])


def test_fla_inputs_outside_its_contract(fake_fla: FakeFla) -> None:
    tensors, state = _inputs("wkv7")
    assert _reason("wkv7", tensors, state) is None
    assert "float64" in _reason("wkv7", [x.double() for x in tensors], state)
    assert "float64" in _reason("wkv7", tensors, state.double())
    wide = [torch.zeros(1, 4, 1, 272) for _ in range(6)]
    assert _reason("wkv7", wide, None) == "head size N=272 is above fla's limit of 256"
    empty = [torch.zeros(1, 0, 1, 16) for _ in range(6)]
    assert _reason("wkv7", empty, None) == "fla needs T >= 1"
    tensors6, state6 = _inputs("wkv6")
    tensors6[4] = tensors6[4].double()  # u
    assert "float64" in _reason("wkv6", tensors6, state6)
    with pytest.raises(
        ValueError, match="impl='fla' cannot run these inputs: fla runs float16, bfloat16 or float32"
    ):
        wkv.wkv7(*[x.double() for x in tensors], state, impl="fla")
    assert fake_fla.calls == []


def test_fla_call_is_excluded_from_torch_compile(fake_fla: FakeFla) -> None:
    """The fla call runs eagerly inside a compiled function (torch.compiler.disable)."""
    seen: list[bool] = []
    call = fake_fla.chunk_rwkv7

    def spy(*args, **kwargs):
        seen.append(torch.compiler.is_compiling())
        return call(*args, **kwargs)

    sys.modules["fla.ops.rwkv7"].chunk_rwkv7 = spy
    tensors, state = _inputs("wkv7")
    compiled = torch.compile(lambda *xs: wkv.wkv7(*xs, impl="fla"), backend="eager")
    y, s = compiled(*tensors, state)
    assert seen and not any(seen)
    y_ref, s_ref = wkv.wkv7(*tensors, state, impl="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_import_rwkvkit_does_not_import_fla() -> None:
    code = "import sys, rwkvkit, rwkvkit.wkv, rwkvkit.wkv.fla_backend; assert 'fla' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
