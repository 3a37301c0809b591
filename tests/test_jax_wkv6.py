"""Tests for rwkvkit.jax.wkv6 (RWKV-5.2 / 6 in JAX): parity with rwkvkit's torch reference (forward,
final state and every gradient, via torch autograd), chunked == reference in JAX, the step, jit, checks."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from rwkvkit.jax.wkv6 import (  # noqa: E402
    wkv5,
    wkv5_reference,
    wkv5_step,
    wkv6,
    wkv6_chunked,
    wkv6_reference,
    wkv6_step,
)
from rwkvkit.wkv.v6 import wkv6_reference as torch_wkv6_reference  # noqa: E402

B, H, N = 2, 2, 8
W_MIN = -float(np.exp(3.8))  # the strongest decay per token RWKV-6 produces (~ -44.7)


def make_inputs(T: int, decay: str, seed: int = 0, n: int = N) -> dict[str, np.ndarray]:
    """float64 numpy r, w, k, v (B, T, H, n), u (H, n), a state (B, H, n, n) and loss cotangents."""
    rng = np.random.default_rng(seed)
    r, k, v = (rng.standard_normal((B, T, H, n)) for _ in range(3))
    if decay == "mild":
        w = -np.exp(rng.standard_normal((B, T, H, n)) - 1.0)
    elif decay == "strong":  # from near 0 to the strongest, mixed in every chunk
        w = -np.exp(rng.uniform(-14.0, 3.8, (B, T, H, n)))
    else:  # extremes only: w = -exp(3.8) or -1e-6
        w = np.where(rng.random((B, T, H, n)) < 0.5, W_MIN, -1e-6)
    return {
        "r": r,
        "w": w,
        "k": 0.5 * k,
        "v": v,
        "u": rng.standard_normal((H, n)),
        "state": 0.5 * rng.standard_normal((B, H, n, n)),
        "cy": rng.standard_normal((B, T, H, n)),
        "cs": rng.standard_normal((B, H, n, n)),
    }


def torch_run(x: dict, state: np.ndarray | None, state_map: np.ndarray | None, w_const: bool = False):
    """rwkvkit's torch reference in float64: y, final state and the gradients of sum(y cy) + sum(S cs)
    w.r.t. r, w, k, v, u and ``state`` (a bank / shared state reaches each row by indexing)."""
    leaves = {n: torch.tensor(x[n], requires_grad=True) for n in ("r", "w", "k", "v", "u")}
    S0 = None
    if state is not None:
        leaves["state"] = torch.tensor(state, requires_grad=True)
        S0 = leaves["state"]
        S0 = S0[torch.as_tensor(state_map)] if state_map is not None else S0.expand(B, *S0.shape[1:])
    w = leaves["w"].expand(x["r"].shape) if w_const else leaves["w"]
    y, S = torch_wkv6_reference(leaves["r"], w, leaves["k"], leaves["v"], leaves["u"], S0)
    ((y * torch.tensor(x["cy"])).sum() + (S * torch.tensor(x["cs"])).sum()).backward()
    grads = {n: t.grad.numpy() for n, t in leaves.items()}
    return y.detach().numpy(), S.detach().numpy(), grads


_COMPILED: dict = {}


def _loss_and_grad(fn, kw: tuple):
    """The jitted value_and_grad of sum(y cy) + sum(S cs) for ``fn``, one per (fn, kwargs), so cases of
    the same shapes share one compilation."""
    key = (fn, kw)
    if key not in _COMPILED:

        def loss(args: dict, cy, cs, state_map):
            y, S = fn(
                args["r"],
                args["w"],
                args["k"],
                args["v"],
                args["u"],
                args.get("state"),
                state_map,
                **dict(kw),
            )
            return jnp.sum(y * cy) + jnp.sum(S * cs), (y, S)

        _COMPILED[key] = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return _COMPILED[key]


def jax_run(fn, x: dict, state, state_map, dtype, **kw):
    """The same with a JAX form ``fn`` on inputs cast to ``dtype``."""
    names = ["r", "w", "k", "v", "u"] + (["state"] if state is not None else [])
    vals = {n: jnp.asarray(x[n] if n != "state" else state, dtype) for n in names}
    cy, cs = jnp.asarray(x["cy"], dtype), jnp.asarray(x["cs"], dtype)
    (_, (y, S)), grads = _loss_and_grad(fn, tuple(sorted(kw.items())))(vals, cy, cs, state_map)
    return np.asarray(y), np.asarray(S), {n: np.asarray(g) for n, g in grads.items()}


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all()
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def assert_parity(got, want, tol: float) -> None:
    (y, S, g), (y_t, S_t, g_t) = got, want
    errs = {"y": max_rel(y, y_t), "state": max_rel(S, S_t)}
    errs.update({f"d{n}": max_rel(g[n], g_t[n]) for n in g_t})
    assert set(g) == set(g_t)
    assert max(errs.values()) < tol, errs


def state_case(mode: str, x: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(state, state_map) for a state mode: none, per row, shared (1, H, N, N), a bank of 3 with
    state_map [2, 0] (entry 1 unused: its gradient must be 0)."""
    rng = np.random.default_rng(6)
    return {
        "none": (None, None),
        "row": (x["state"], None),
        "shared": (rng.standard_normal((1, H, N, N)), None),
        "bank": (rng.standard_normal((3, H, N, N)), np.array([2, 0], np.int32)),
    }[mode]


# Every T of interest once in float64, each state mode at some of them (one compilation per case).
F64_CASES = [(1, "row"), (15, "shared"), (16, "none"), (17, "bank"), (100, "row")]
REFERENCE_T = (1, 17, 100)  # the JAX reference form too (the chunked form at every case)


@pytest.mark.parametrize(("T", "mode"), F64_CASES)
def test_float64_parity_with_torch(T: int, mode: str) -> None:
    """Both JAX forms == torch's reference to 1e-10 in float64 (forward, final state, every gradient
    incl. u and the initial state; a bank's gradient = the sum over its rows), mild and strong decays."""
    with jax.enable_x64(True):
        for decay in ("mild", "strong"):
            x = make_inputs(T, decay, seed=T)
            state, state_map = state_case(mode, x)
            want = torch_run(x, state, state_map)
            smap = None if state_map is None else jnp.asarray(state_map)
            for fn in (wkv6_chunked, wkv6_reference) if T in REFERENCE_T else (wkv6_chunked,):
                got = jax_run(fn, x, state, smap, jnp.float64)
                assert_parity(got, want, 1e-10)
            if mode == "bank":
                assert np.all(got[2]["state"][1] == 0.0) and np.abs(got[2]["state"][[0, 2]]).min() > 0


@pytest.mark.parametrize("T", [17, 1000])
def test_float32_parity_with_torch(T: int) -> None:
    """The chunked form in float32 (fp32 state) == torch's float64 reference to 1e-5 relative."""
    for decay in ("mild", "strong") if T < 1000 else ("strong",):
        x = make_inputs(T, decay, seed=T + 1)
        want = torch_run(x, x["state"], None)
        assert_parity(jax_run(wkv6_chunked, x, x["state"], None, jnp.float32), want, 1e-5)


def test_extreme_decays_float32() -> None:
    """w = -exp(3.8) and w = -1e-6 side by side (every chunk): finite, and equal to torch's reference."""
    x = make_inputs(17, "extreme", seed=3)
    want = torch_run(x, x["state"], None)
    assert_parity(jax_run(wkv6_chunked, x, x["state"], None, jnp.float32), want, 1e-5)


def test_wkv5_constant_decay() -> None:
    """RWKV-5.2: w (H, N) broadcast over B and T == torch's reference on w.expand; dw sums over B, T."""
    x = make_inputs(20, "mild", seed=7)
    x["w"] = -np.exp(np.random.default_rng(8).standard_normal((H, N)) - 1.0)
    want = torch_run(x, x["state"], None, w_const=True)
    with jax.enable_x64(True):
        for impl in ("chunked", "reference"):
            assert_parity(
                jax_run(wkv5, x, x["state"], None, jnp.float64, impl=impl, chunk_size=8), want, 1e-10
            )


def test_chunked_matches_reference_and_chunk_sizes() -> None:
    """In JAX float32: the chunked form at several chunk sizes == the scan reference (values, grads)."""
    x = make_inputs(17, "strong", seed=9)
    ref = jax_run(wkv6_reference, x, x["state"], None, jnp.float32)
    for cs in (5,):
        assert_parity(jax_run(wkv6_chunked, x, x["state"], None, jnp.float32, chunk_size=cs), ref, 2e-5)


def test_step_repeated_matches_reference() -> None:
    """wkv6_step / wkv5_step once per token == the reference (y and final state)."""
    x = make_inputs(9, "mild", seed=10)
    r, w, k, v = (jnp.asarray(x[n], jnp.float32) for n in "rwkv")
    u, S0 = jnp.asarray(x["u"], jnp.float32), jnp.asarray(x["state"], jnp.float32)
    w5 = w[0, 0]  # (H, N)
    for step, full, ww in ((wkv6_step, wkv6_reference, w), (wkv5_step, wkv5_reference, w5)):
        y_ref, S_ref = full(r, ww, k, v, u, S0)
        step = jax.jit(step)
        S, ys = S0, []
        for t in range(r.shape[1]):
            y_t, S = step(r[:, t], ww[:, t] if ww.ndim == 4 else ww, k[:, t], v[:, t], u, S)
            ys.append(y_t)
        assert max_rel(np.asarray(jnp.stack(ys, 1)), np.asarray(y_ref)) < 1e-5
        assert max_rel(np.asarray(S), np.asarray(S_ref)) < 1e-5
    y1, S1 = wkv6_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], u)  # state=None: zeros
    assert np.allclose(
        np.asarray(y1), np.asarray(jnp.sum(r[:, 0] * u * k[:, 0], -1, keepdims=True) * v[:, 0])
    )


def test_jit_several_lengths_and_dtypes() -> None:
    """One jitted entry over several T (static shapes), bf16 inputs: y in bf16, the state in fp32."""
    f = jax.jit(lambda r, w, k, v, u: wkv6(r, w, k, v, u, chunk_size=8))
    for T in (3, 21):
        x = make_inputs(T, "mild", seed=T)
        args = [jnp.asarray(x[n], jnp.bfloat16) for n in ("r", "w", "k", "v", "u")]
        y, S = f(*args)
        y_ref, S_ref = wkv6_reference(*args)
        assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32 and y.shape == (B, T, H, N)
        assert max_rel(np.asarray(S), np.asarray(S_ref)) < 1e-5
    x = make_inputs(0, "mild")
    y, S = wkv6(*(jnp.asarray(x[n], jnp.float32) for n in ("r", "w", "k", "v", "u")))
    assert y.shape == (B, 0, H, N) and np.all(np.asarray(S) == 0)


def test_bad_arguments() -> None:
    x = make_inputs(4, "mild")
    r, w, k, v, u = (jnp.asarray(x[n], jnp.float32) for n in ("r", "w", "k", "v", "u"))
    with pytest.raises(ValueError, match="u must be"):
        wkv6(r, w, k, v, u[0])
    with pytest.raises(ValueError, match="k has shape"):
        wkv6(r, w, k[:, :2], v, u)
    with pytest.raises(ValueError, match="floating-point"):
        wkv6(r, w, k.astype(jnp.int32), v, u)
    with pytest.raises(ValueError, match=r"w \(RWKV-5.2"):
        wkv5(r, w, k, v, u)
    with pytest.raises(ValueError, match="impl"):
        wkv6(r, w, k, v, u, impl="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        wkv6(r, w, k, v, u, chunk_size=0)
    with pytest.raises(ValueError, match="outside the state bank"):
        wkv6(r, w, k, v, u, jnp.zeros((3, H, N, N)), jnp.array([0, 3], jnp.int32))
    with pytest.raises(ValueError, match="state has 3 rows"):
        wkv6(r, w, k, v, u, jnp.zeros((3, H, N, N)))
