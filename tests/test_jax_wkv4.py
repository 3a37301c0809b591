"""Tests for rwkvkit.jax.wkv4 (RWKV-4 in JAX): parity with rwkvkit's torch reference (forward, final
state and every gradient, via torch autograd), chunked == reference in JAX, the step, jit, checks.

The (aa, bb, pp) state is not unique (any common rescaling of aa, bb with pp), so final states are
compared, and differentiated, through what they mean: aa / bb and log(bb) + pp.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from rwkvkit.jax.wkv4 import wkv4, wkv4_chunked, wkv4_reference, wkv4_step  # noqa: E402
from rwkvkit.wkv.v4 import wkv4_reference as torch_wkv4_reference  # noqa: E402

B, C = 2, 16
PARTS = ("aa", "bb", "pp")


def make_inputs(T: int, decay: str, seed: int = 0) -> dict[str, np.ndarray]:
    """float64 numpy w, u (C,), k, v (B, T, C), a state (aa, bb, pp) and loss cotangents."""
    rng = np.random.default_rng(seed)
    if decay == "mild":
        w = -np.exp(rng.standard_normal(C) - 1.0)
    else:  # from ~1e-6 to -exp(3.8) per token, across channels
        w = -np.exp(np.linspace(-14.0, 3.8, C))
    k_scale = 20.0 if decay == "extreme" else 1.0  # exponents far outside float32's exp range
    return {
        "w": w,
        "u": rng.standard_normal(C),
        "k": k_scale * rng.standard_normal((B, T, C)),
        "v": rng.standard_normal((B, T, C)),
        "aa": rng.standard_normal((B, C)),
        "bb": np.exp(rng.standard_normal((B, C))),
        "pp": 3.0 * rng.standard_normal((B, C)),
        "cy": rng.standard_normal((B, T, C)),
        "c1": rng.standard_normal((B, C)),
        "c2": rng.standard_normal((B, C)),
    }


def meaning(aa, bb, pp, lib):
    """What a state means: aa / bb (the running average) and log(bb) + pp (the log of B)."""
    return aa / bb, lib.log(bb) + pp


def torch_run(x: dict, state: tuple | None, state_map: np.ndarray | None):
    """rwkvkit's torch reference in float64: y, the final state's meaning, the raw final state and the
    gradients of sum(y cy) + sum(ratio c1) + sum(logB c2) w.r.t. w, u, k, v and the state parts."""
    leaves = {n: torch.tensor(x[n], requires_grad=True) for n in ("w", "u", "k", "v")}
    st = None
    if state is not None:
        for name, part in zip(PARTS, state, strict=True):
            leaves[name] = torch.tensor(part, requires_grad=True)
        st = tuple(
            leaves[n][torch.as_tensor(state_map)] if state_map is not None else leaves[n].expand(B, C)
            for n in PARTS
        )
    y, final = torch_wkv4_reference(leaves["w"], leaves["u"], leaves["k"], leaves["v"], st)
    ratio, log_b = meaning(*final, torch)
    c = {n: torch.tensor(x[n]) for n in ("cy", "c1", "c2")}
    ((y * c["cy"]).sum() + (ratio * c["c1"]).sum() + (log_b * c["c2"]).sum()).backward()
    grads = {n: t.grad.numpy() for n, t in leaves.items()}
    out = (y.detach().numpy(), ratio.detach().numpy(), log_b.detach().numpy())
    return out, tuple(p.detach().numpy() for p in final), grads


_COMPILED: dict = {}


def _loss_and_grad(fn, kw: tuple):
    """The jitted value_and_grad of the loss for ``fn``, one per (fn, kwargs): same shapes, one compile."""
    key = (fn, kw)
    if key not in _COMPILED:

        def loss(args: dict, cots: dict, state_map):
            st = tuple(args[n] for n in PARTS) if "aa" in args else None
            y, final = fn(args["w"], args["u"], args["k"], args["v"], st, state_map, **dict(kw))
            ratio, log_b = meaning(*final, jnp)
            total = jnp.sum(y * cots["cy"]) + jnp.sum(ratio * cots["c1"]) + jnp.sum(log_b * cots["c2"])
            return total, ((y, ratio, log_b), final)

        _COMPILED[key] = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return _COMPILED[key]


def jax_run(fn, x: dict, state, state_map, dtype, **kw):
    """The same with a JAX form ``fn`` on inputs cast to ``dtype``."""
    vals = {n: jnp.asarray(x[n], dtype) for n in ("w", "u", "k", "v")}
    if state is not None:
        vals.update({n: jnp.asarray(p, dtype) for n, p in zip(PARTS, state, strict=True)})
    cots = {n: jnp.asarray(x[n], dtype) for n in ("cy", "c1", "c2")}
    (_, (out, final)), grads = _loss_and_grad(fn, tuple(sorted(kw.items())))(vals, cots, state_map)
    out = tuple(np.asarray(o) for o in out)
    return out, tuple(np.asarray(p) for p in final), {n: np.asarray(g) for n, g in grads.items()}


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all()
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def assert_parity(got, want, tol: float, same_state: bool = False) -> None:
    (out, final, g), (out_t, final_t, g_t) = got, want
    errs = {name: max_rel(a, b) for name, a, b in zip(("y", "aa/bb", "logB"), out, out_t, strict=True)}
    errs.update({f"d{n}": max_rel(g[n], g_t[n]) for n in g_t})
    if same_state:  # the reference runs the same steps: the same (aa, bb, pp) element by element
        errs.update({n: max_rel(a, b) for n, a, b in zip(PARTS, final, final_t, strict=True)})
    assert set(g) == set(g_t)
    assert max(errs.values()) < tol, errs


def state_case(mode: str, x: dict) -> tuple[tuple | None, np.ndarray | None]:
    """(state, state_map) for a state mode: none (a fresh sequence, pp = -1e38), per row, shared
    (1, C) parts, a bank of 3 with state_map [2, 0] (entry 1 unused: its gradient must be 0)."""
    rng = np.random.default_rng(6)
    bank = (rng.standard_normal((3, C)), np.exp(rng.standard_normal((3, C))), rng.standard_normal((3, C)))
    return {
        "none": (None, None),
        "row": ((x["aa"], x["bb"], x["pp"]), None),
        "shared": (tuple(p[:1] for p in bank), None),
        "bank": (bank, np.array([2, 0], np.int32)),
    }[mode]


F64_CASES = [(1, "row"), (15, "shared"), (16, "none"), (17, "bank"), (100, "row")]
REFERENCE_T = (1, 17, 100)  # the JAX reference form too (the chunked form at every case)


@pytest.mark.parametrize(("T", "mode"), F64_CASES)
def test_float64_parity_with_torch(T: int, mode: str) -> None:
    """Both JAX forms == torch's reference to 1e-10 in float64 (y, the final state, every gradient incl.
    u and the initial state; a bank's gradient = the sum over its rows), mild and strong decays."""
    with jax.enable_x64(True):
        for decay in ("mild", "strong"):
            x = make_inputs(T, decay, seed=T)
            state, state_map = state_case(mode, x)
            want = torch_run(x, state, state_map)
            smap = None if state_map is None else jnp.asarray(state_map)
            if T in REFERENCE_T:
                ref = jax_run(wkv4_reference, x, state, smap, jnp.float64)
                assert_parity(ref, want, 1e-10, same_state=True)
            got = jax_run(wkv4_chunked, x, state, smap, jnp.float64)
            assert_parity(got, want, 1e-10)
            if mode == "bank":
                for n in PARTS:
                    assert np.all(got[2][n][1] == 0.0)


@pytest.mark.parametrize("T", [17, 1000])
def test_float32_parity_with_torch(T: int) -> None:
    """The chunked form in float32 (fp32 state) == torch's float64 reference to 1e-5 relative."""
    for decay in ("mild", "strong") if T < 1000 else ("strong",):
        x = make_inputs(T, decay, seed=T + 1)
        state = (x["aa"], x["bb"], x["pp"])
        assert_parity(jax_run(wkv4_chunked, x, state, None, jnp.float32), torch_run(x, state, None), 1e-5)


def test_extreme_exponents_float32() -> None:
    """k ~ 20 N(0, 1) (e^k far outside float32) with decays down to -exp(3.8): finite, == torch."""
    x = make_inputs(17, "extreme", seed=3)
    state = (x["aa"], x["bb"], x["pp"])
    assert_parity(jax_run(wkv4_chunked, x, state, None, jnp.float32), torch_run(x, state, None), 1e-5)


def test_chunked_matches_reference_and_chunk_sizes() -> None:
    """In JAX float32: the chunked form at other chunk sizes == the scan reference (values, grads)."""
    x = make_inputs(17, "strong", seed=9)
    state = (x["aa"], x["bb"], x["pp"])
    ref = jax_run(wkv4_reference, x, state, None, jnp.float32)
    for cs in (5,):
        assert_parity(jax_run(wkv4_chunked, x, state, None, jnp.float32, chunk_size=cs), ref, 2e-5)


def test_step_repeated_matches_reference() -> None:
    """wkv4_step once per token == the reference (y and the final state element by element)."""
    x = make_inputs(9, "mild", seed=10)
    w, u, k, v = (jnp.asarray(x[n], jnp.float32) for n in ("w", "u", "k", "v"))
    y_ref, st_ref = wkv4_reference(w, u, k, v)
    step = jax.jit(wkv4_step)
    st, ys = None, []
    for t in range(k.shape[1]):
        y_t, st = step(w, u, k[:, t], v[:, t], st)
        ys.append(y_t)
    assert max_rel(np.asarray(jnp.stack(ys, 1)), np.asarray(y_ref)) < 1e-6
    for a, b in zip(st, st_ref, strict=True):
        assert max_rel(np.asarray(a), np.asarray(b)) < 1e-6


def test_jit_several_lengths_and_dtypes() -> None:
    """One jitted entry over several T (static shapes), bf16 inputs: y in bf16, the state in fp32."""
    f = jax.jit(lambda w, u, k, v: wkv4(w, u, k, v, chunk_size=8))
    for T in (3, 21):
        x = make_inputs(T, "mild", seed=T)
        args = [jnp.asarray(x[n], jnp.bfloat16) for n in ("w", "u", "k", "v")]
        y, st = f(*args)
        y_ref, st_ref = wkv4_reference(*args)
        assert y.dtype == jnp.bfloat16 and st[0].dtype == jnp.float32 and y.shape == (B, T, C)
        for a, b in zip(meaning(*st, jnp), meaning(*st_ref, jnp), strict=True):
            assert max_rel(np.asarray(a), np.asarray(b)) < 1e-5
    y, st = wkv4(*(jnp.asarray(make_inputs(0, "mild")[n], jnp.float32) for n in ("w", "u", "k", "v")))
    assert y.shape == (B, 0, C) and float(st[2][0, 0]) == float(np.float32(-1e38))


def test_bad_arguments() -> None:
    x = make_inputs(4, "mild")
    w, u, k, v = (jnp.asarray(x[n], jnp.float32) for n in ("w", "u", "k", "v"))
    with pytest.raises(ValueError, match="u must be"):
        wkv4(w, u[:3], k, v)
    with pytest.raises(ValueError, match="v has shape"):
        wkv4(w, u, k, v[:, :2])
    with pytest.raises(ValueError, match="floating-point"):
        wkv4(w, u, k.astype(jnp.int32), v)
    with pytest.raises(ValueError, match="impl"):
        wkv4(w, u, k, v, impl="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        wkv4(w, u, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="outside the state bank"):
        wkv4(w, u, k, v, (jnp.zeros((3, C)),) * 3, jnp.array([0, 3], jnp.int32))
    with pytest.raises(ValueError, match=r"\(aa, bb, pp\)"):
        wkv4(w, u, k, v, (jnp.zeros((B, C)),) * 2)
