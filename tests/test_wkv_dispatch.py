"""Tests for the WKV dispatch (rwkvkit.wkv.dispatch): the implementation switch is per context.

A ``use_impl`` switch in one thread must not change what another thread's operators run (the engine
runs its model in its own thread while a test or a caller switches implementations in another).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import threading

import pytest
import torch

import rwkvkit.wkv as wkv
from rwkvkit.wkv import use_impl, wkv6


def _inputs(T: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(1, T, 2, 8, generator=gen) for _ in range(3))
    w = -torch.rand(1, T, 2, 8, generator=gen)
    u = torch.randn(2, 8, generator=gen)
    return [r, w, k, v], u


def test_switch_in_one_thread_is_not_seen_by_another() -> None:
    (r, w, k, v), u = _inputs(20)
    y_chunked, _ = wkv6(r, w, k, v, u, impl="chunked")
    y_reference, _ = wkv6(r, w, k, v, u, impl="reference")
    assert not torch.equal(y_chunked, y_reference)  # the two forms are told apart by their rounding

    switched, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def switcher() -> None:
        with use_impl("reference"):
            seen["switcher"] = wkv.get_default_impl()
            seen["switcher_y"] = wkv6(r, w, k, v, u)[0]
            switched.set()
            release.wait(timeout=30)

    thread = threading.Thread(target=switcher)
    thread.start()
    try:
        assert switched.wait(timeout=30)
        # the other thread is inside its `with use_impl("reference")` block now
        assert wkv.get_default_impl() is None
        y_auto, _ = wkv6(r, w, k, v, u)  # auto: chunked for T = 20
        assert torch.equal(y_auto, y_chunked)
    finally:
        release.set()
        thread.join(timeout=30)
    assert seen["switcher"] == "reference"
    assert torch.equal(seen["switcher_y"], y_reference)


def test_switch_in_this_thread_is_not_seen_by_a_worker_thread() -> None:
    (r, w, k, v), u = _inputs(20)
    y_chunked, _ = wkv6(r, w, k, v, u, impl="chunked")
    seen: dict[str, object] = {}

    def worker() -> None:
        seen["impl"] = wkv.get_default_impl()
        seen["y"] = wkv6(r, w, k, v, u)[0]

    with use_impl("reference"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(timeout=30)
        assert wkv.get_default_impl() == "reference"
    assert seen["impl"] is None
    assert torch.equal(seen["y"], y_chunked)


def test_use_impl_nests_and_restores() -> None:
    assert wkv.get_default_impl() is None
    with use_impl("chunked"):
        with use_impl("reference"):
            assert wkv.get_default_impl() == "reference"
        assert wkv.get_default_impl() == "chunked"
        with use_impl(None):  # back to auto inside the block
            assert wkv.get_default_impl() is None
    assert wkv.get_default_impl() is None
    with pytest.raises(ValueError, match="unknown impl"):
        with use_impl("cuda"):
            pass


def test_set_default_impl_is_deprecated_and_per_context() -> None:
    seen: dict[str, object] = {}

    def worker() -> None:
        with pytest.warns(DeprecationWarning):
            seen["previous"] = wkv.set_default_impl("reference")
        seen["impl"] = wkv.get_default_impl()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert seen == {"previous": None, "impl": "reference"}
    assert wkv.get_default_impl() is None  # the worker's setting stayed in the worker


# ---------------------------------------------------------------------------------------------------
# The op table: every op's recurrent form (its step kernel per token) against its reference, and the
# rule for "auto".
# ---------------------------------------------------------------------------------------------------


def _op_inputs(name: str, B: int, T: int, seed: int = 0) -> tuple[list[torch.Tensor], object]:
    """Float64 tensors in the op's argument order, and a carried state."""
    gen = torch.Generator().manual_seed(seed)
    H, N = 2, 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if name == "wkv4":
        C = H * N
        w = -torch.exp(torch.linspace(-5.0, 3.0, C, dtype=torch.float64))
        state = [randn(B, C), torch.rand(B, C, generator=gen, dtype=torch.float64) + 0.5, randn(B, C)]
        return [w, randn(C) * 0.5, randn(B, T, C), randn(B, T, C)], state
    state = randn(B, H, N, N) * 0.5
    w = -torch.rand(B, T, H, N, generator=gen, dtype=torch.float64)
    if name == "wkv6":
        return [randn(B, T, H, N), w, randn(B, T, H, N), randn(B, T, H, N), randn(H, N)], state
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    return [randn(B, T, H, N), w * 0.6, randn(B, T, H, N), randn(B, T, H, N), -kk, kk * 0.5], state


def _forward_backward(form, tensors: list[torch.Tensor], state) -> list[torch.Tensor]:
    leaves = [x.clone().requires_grad_() for x in tensors]
    s = (
        [x.clone().requires_grad_() for x in state]
        if isinstance(state, list)
        else state.clone().requires_grad_()
    )
    y, s_out = form(*leaves, s)
    s_out = torch.stack(list(s_out)) if isinstance(s_out, tuple) else s_out
    loss = (y * torch.cos(y)).sum() + (s_out * torch.sin(s_out)).sum()
    inputs = leaves + (s if isinstance(s, list) else [s])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)  # T = 0: zeros
    return [y.detach(), s_out.detach(), *grads]


@pytest.mark.parametrize("T", [0, 1, 3, 9])
@pytest.mark.parametrize("op", wkv.OPS, ids=lambda op: op.name)
def test_recurrent_matches_reference(op: wkv.WKVOp, T: int) -> None:
    """The recurrent form (the step kernel once per token, the short-T production path) gives the
    reference's outputs, final state and gradients of every input and of the state."""
    tensors, state = _op_inputs(op.name, 2, T)
    got = _forward_backward(op.recurrent, tensors, state)
    want = _forward_backward(op.reference, tensors, state)
    for x, ref in zip(got, want, strict=True):
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", wkv.OPS, ids=lambda op: op.name)
def test_auto_rule(op: wkv.WKVOp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto: "recurrent" for T <= AUTO_STEP_MAX_T, "chunked" above; the WKV-4 record says "recurrent" at
    any T when no input needs a gradient. The reference runs only when asked for."""
    calls: list[str] = []

    def spy(name: str, form):
        return lambda *x, **kw: calls.append(name) or form(*x, **kw)

    table = importlib.import_module("rwkvkit.wkv.ops")
    key = op.name.upper()
    spied = dataclasses.replace(
        op, **{name: spy(name, getattr(op, name)) for name in ("reference", "recurrent", "chunked")}
    )
    monkeypatch.setattr(table, key, spied)
    entry = getattr(wkv, op.name)
    short, _ = _op_inputs(op.name, 1, wkv.AUTO_STEP_MAX_T)
    long, _ = _op_inputs(op.name, 1, 20)
    entry(*short)
    entry(*long, impl="auto")
    entry(*[x.requires_grad_() for x in long])
    with torch.no_grad():
        entry(*long)
    no_grad_rule = "recurrent" if op.recurrent_max_t_no_grad == math.inf else "chunked"
    assert calls == ["recurrent", no_grad_rule, "chunked", no_grad_rule]
    entry(*short, impl="reference")
    assert calls[-1] == "reference"


def _fake_fused(calls: list[str], reason: str | None) -> wkv.FusedForm:
    """A fused form that runs the reference (so its answers are right) and records each call."""

    def run(*tensors_and_state):
        calls.append("fake")
        return wkv.OPS[2].reference(*tensors_and_state)  # wkv7

    return wkv.FusedForm(name="triton", unavailable=lambda tensors, state: reason, run=run)


def test_fused_forms_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused form runs when asked for by name and can run the inputs; auto picks it on a CUDA device
    only (faked here), never for packed rows or short T; asked for where it cannot run, a clear error."""
    table = importlib.import_module("rwkvkit.wkv.ops")
    dispatch = importlib.import_module("rwkvkit.wkv.dispatch")
    calls: list[str] = []
    monkeypatch.setattr(table, "WKV7", dataclasses.replace(table.WKV7, fused=(_fake_fused(calls, None),)))
    long, _ = _op_inputs("wkv7", 2, 20)
    want, _ = wkv.wkv7(*long, impl="reference")
    got, _ = wkv.wkv7(*long, impl="triton")
    torch.testing.assert_close(got, want)
    assert calls == ["fake"]
    wkv.wkv7(*long)  # CPU: auto never picks a fused kernel
    assert calls == ["fake"]
    monkeypatch.setattr(dispatch, "on_fused_device", lambda lead: True)
    wkv.wkv7(*long)
    assert calls == ["fake", "fake"]
    short, _ = _op_inputs("wkv7", 1, 1)
    wkv.wkv7(*short)  # one token: the recurrent form
    resets = torch.zeros(2, 20, dtype=torch.bool)
    resets[:, 7] = True
    wkv.wkv7(*long, resets=resets)  # packed rows: the chunked varlen form
    assert calls == ["fake", "fake"]
    with pytest.raises(ValueError, match="no 'fla' kernel"):
        wkv.wkv7(*long, impl="fla")
    monkeypatch.setattr(
        table, "WKV7", dataclasses.replace(table.WKV7, fused=(_fake_fused(calls, "not a CUDA tensor"),))
    )
    with pytest.raises(ValueError, match="impl='triton' cannot run these inputs: not a CUDA tensor"):
        wkv.wkv7(*long, impl="triton")
    wkv.wkv7(*long)  # auto passes over a form that cannot run the inputs
    assert calls == ["fake", "fake"]
