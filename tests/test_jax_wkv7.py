"""Tests for rwkvkit.jax.wkv7: parity with rwkvkit's torch WKV-7 (forward, final state, every gradient),
chunked == reference in JAX, strong decays, state modes, jit, the step, and bad state_map indices."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from rwkvkit.jax.wkv7 import wkv7, wkv7_chunked, wkv7_reference, wkv7_step  # noqa: E402
from rwkvkit.wkv.v7 import wkv7_reference as torch_reference  # noqa: E402

B, H = 2, 2


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def inputs(T: int, N: int = 8, strong: bool = False, seed: int = 0, n_state: int = B) -> list[np.ndarray]:
    """r, w, k, v, a, b (B, T, H, N) like the model (a = -kk, b = kk * iclr); a state (n_state, H, N, N)."""
    rng = np.random.default_rng(seed)
    r, k, v = (rng.standard_normal((B, T, H, N)) for _ in range(3))
    if strong:  # down to -exp(3.8) ~ -44.7 per token
        w = -np.exp(rng.uniform(-3.0, 3.8, (B, T, H, N)))
    else:  # RWKV-7's range
        w = -0.6066 * rng.uniform(0.0, 1.0, (B, T, H, N))
    kk = rng.standard_normal((B, T, H, N))
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    a, b = -kk, kk * rng.uniform(0.0, 1.0, (B, T, H, N))
    S = 0.5 * rng.standard_normal((n_state, H, N, N))
    return [r, w, k, v, a, b, S]


def probe(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def torch_grads(xs, state_map=None):
    """y, final state and the gradients of <y, Py> + <S, PS> from torch autograd through the reference."""
    ts = [torch.tensor(x, requires_grad=True) for x in xs]
    S0 = ts[6] if state_map is None else ts[6][torch.as_tensor(np.asarray(state_map))]
    y, S = torch_reference(*ts[:6], S0)
    loss = (y * torch.tensor(probe(y.shape))).sum() + (S * torch.tensor(probe(S.shape, 2))).sum()
    loss.backward()
    return y.detach().numpy(), S.detach().numpy(), [t.grad.numpy() for t in ts]


def jax_grads(xs, dtype, impl, state_map=None, chunk_size=16):
    def f(*z):
        return wkv7(*z[:6], z[6], state_map, impl=impl, chunk_size=chunk_size)

    def loss(*z):
        y, S = f(*z)
        py, ps = (jnp.asarray(probe(y.shape), y.dtype), jnp.asarray(probe(S.shape, 2), S.dtype))
        return jnp.sum(y * py) + jnp.sum(S * ps)

    z = [jnp.asarray(x, dtype) for x in xs]
    y, S = f(*z)
    g = jax.grad(loss, argnums=tuple(range(7)))(*z)
    return np.asarray(y), np.asarray(S), [np.asarray(x) for x in g]


def rel(x, y):
    return float(np.abs(np.asarray(x, np.float64) - y).max() / max(np.abs(y).max(), 1e-30))


def compare(got, want, tol):
    for a_, b_ in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]], strict=True):
        assert rel(a_, b_) < tol, rel(a_, b_)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])  # T = 1000: float32 below
@pytest.mark.parametrize("strong", [False, True])
def test_float64_matches_torch(x64, T, strong):
    xs = inputs(T, strong=strong, seed=T)
    want = torch_grads(xs)
    for impl in ("chunked", "reference") if T in (1, 17) else ("chunked",):
        compare(jax_grads(xs, jnp.float64, impl), want, 1e-10)


@pytest.mark.parametrize("T,strong", [(17, False), (100, True), (1000, False)])
def test_float32_matches_torch(T, strong):
    xs = inputs(T, N=16, strong=strong, seed=T + 1)
    want = torch_grads(xs)
    got = jax_grads(xs, jnp.float32, "chunked")
    compare(got, want, 1e-5)
    assert got[0].dtype == np.float32 and got[1].dtype == np.float32


def test_state_modes(x64):
    xs = inputs(20, seed=3)
    # None: zeros; per row is covered above.
    none = inputs(20, seed=3)
    none[6] = np.zeros_like(none[6])
    y, S = wkv7(*(jnp.asarray(x) for x in xs[:6]))
    ref = torch_grads(none)
    assert rel(y, ref[0]) < 1e-10 and rel(S, ref[1]) < 1e-10
    # Shared (1, H, N, N) and a bank with state_map: torch through the gathered state.
    shared = inputs(20, seed=3, n_state=1)
    compare(jax_grads(shared, jnp.float64, "chunked"), torch_grads(shared, state_map=[0, 0]), 1e-10)
    bank = inputs(20, seed=3, n_state=3)
    smap = np.array([2, 0], np.int32)
    got = jax_grads(bank, jnp.float64, "chunked", state_map=smap)
    compare(got, torch_grads(bank, state_map=smap), 1e-10)
    assert np.all(got[2][6][1] == 0.0)  # unused bank entry gets no gradient
    # Two rows on one entry: the bank gradient is the sum of the per-row gradients.
    both = jax_grads(bank, jnp.float64, "chunked", state_map=np.array([1, 1], np.int32))
    per_row = bank[:6] + [bank[6][[1, 1]]]
    rows = jax_grads(per_row, jnp.float64, "chunked")
    assert rel(both[2][6][1], rows[2][6].sum(0)) < 1e-12


def test_strong_decay_chunk_sizes_finite():
    np_xs = inputs(100, strong=True, seed=5)
    np_xs[1][:, :50] = -44.7  # the strongest decay, constant over whole chunks
    y_ref, S_ref = (x.numpy() for x in torch_reference(*(torch.tensor(x) for x in np_xs)))  # float64
    xs = [jnp.asarray(x, jnp.float32) for x in np_xs]
    for n in (16, 32, 64):
        y, S = wkv7(*xs[:6], xs[6], chunk_size=n)
        assert np.isfinite(np.asarray(y)).all() and rel(y, y_ref) < 1e-4  # float32 rounding
        assert rel(S, S_ref) < 1e-4


def test_step_repeated_equals_reference():
    xs = [jnp.asarray(x, jnp.float32) for x in inputs(9, seed=6)]
    y_ref, S_ref = wkv7_reference(*xs)
    S, ys = xs[6], []
    for t in range(9):
        y, S = wkv7_step(*(x[:, t] for x in xs[:6]), S)
        ys.append(y)
    assert rel(jnp.stack(ys, 1), np.asarray(y_ref)) < 1e-6 and rel(S, np.asarray(S_ref)) < 1e-6


def test_jit_several_T():
    f = jax.jit(lambda *z: wkv7(*z, chunk_size=8))
    for T in (5, 13, 5, 13):
        xs = [jnp.asarray(x, jnp.float32) for x in inputs(T, seed=T)]
        y, S = f(*xs)
        y_ref, S_ref = wkv7_reference(*xs)
        assert rel(y, np.asarray(y_ref)) < 1e-5 and rel(S, np.asarray(S_ref)) < 1e-5
    assert f._cache_size() == 2  # one compile per shape, reused for a repeated T
    xs = [jnp.asarray(x, jnp.float32) for x in inputs(10, seed=0)]
    g = jax.jit(jax.grad(lambda r: wkv7_chunked(r, *xs[1:], chunk_size=4)[0].sum()))(xs[0])
    g_ref = jax.grad(lambda r: wkv7_reference(r, *xs[1:])[0].sum())(xs[0])
    assert rel(g, np.asarray(g_ref)) < 1e-5


def test_bad_inputs():
    xs = [jnp.asarray(x, jnp.float32) for x in inputs(4, seed=0, n_state=3)]
    with pytest.raises(ValueError, match=r"state_map\[1\] = 3"):
        wkv7(*xs[:6], xs[6], jnp.array([0, 3], jnp.int32))
    with pytest.raises(ValueError, match="w has shape"):
        wkv7(xs[0], xs[1][:, :2], *xs[2:6])
    with pytest.raises(ValueError, match="impl"):
        wkv7(*xs[:6], impl="fast")
    with pytest.raises(ValueError, match="float"):
        wkv7(xs[0].astype(jnp.int32), *xs[1:6])
