"""The WKV-7 operator for JAX: step-by-step reference, single-token step, and the chunked form.

This module owns RWKV-7's time-mix recurrence in JAX with the contract of :mod:`rwkvkit.wkv.v7`
(state S as [value, key], per batch element and head):

    S_t = S_{t-1} (diag(exp(w_t)) + a_t b_t^T) + v_t k_t^T,    y_t = S_t r_t

``w`` is the LOG decay (w <= 0). The state is float32 (float64 for float64 inputs), y comes back in r's
dtype, the final state is always returned. Initial states (None, per row, shared, a bank with
``state_map``) come from :func:`rwkvkit.jax.state.initial_state`.

Chunked form (:func:`wkv7_chunked`). Per chunk of n steps, with g the inclusive cumulative log-decay,
gx = g - w the exclusive one, gl = g at the chunk's last step and S0 the entering state:

    L[t,s]  = sum_j a_t b_s exp(gx_t - g_s)   (s < t)      Mk[t,s] = same with k_s for b_s
    Rb[t,s] = sum_j r_t b_s exp(g_t - g_s)    (s <= t)     Rk[t,s] = same with k_s for b_s
    U = (I - L)^{-1} ((a exp(gx)) S0^T + Mk V)             (row t of U is S_{t-1} a_t)
    Y = (r exp(g)) S0^T + Rb U + Rk V
    S_next = S0 diag(exp(gl)) + U^T (b exp(gl - g)) + V^T (k exp(gl - g))

Every decay factor is exp of a difference of cumulative log-decays that is <= 0 (the pairwise ones are
masked before the exp), so the form is exact for any w <= 0: no overflow and no chunk-size limit. The
sequential part is a ``lax.scan`` over chunks (U and S_next); everything else is batched over chunks. The
backward is hand-written (``jax.custom_vjp``): a reverse scan for the state gradient, then batched
per-chunk gradients through the triangular solve, the masked pairwise products and the decays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rwkvkit.jax.state import initial_state, state_dtype

__all__ = ["wkv7", "wkv7_chunked", "wkv7_reference", "wkv7_step"]

Array = Any  # jax.Array
HI = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes in float32 matmuls on accelerators
IMPLS = ("reference", "chunked")


def _mm(x: Array, y: Array) -> Array:
    return jnp.matmul(x, y, precision=HI)


def _es(spec: str, *xs: Array) -> Array:
    return jnp.einsum(spec, *xs, precision=HI)


def _tr(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


# ----------------------------------------------------------------------------------------------- step


def _step(S: Array, r: Array, w: Array, k: Array, v: Array, a: Array, b: Array) -> tuple[Array, Array]:
    """One step in the compute dtype: S (..., V, K), inputs (..., N); returns (new S, y (..., V))."""
    sa = _es("...ij,...j->...i", S, a)  # (..., V): S_{t-1} a_t
    S = S * jnp.exp(w)[..., None, :] + sa[..., :, None] * b[..., None, :] + v[..., :, None] * k[..., None, :]
    return S, _es("...ij,...j->...i", S, r)


def wkv7_step(
    r: Array, w: Array, k: Array, v: Array, a: Array, b: Array, state: Array
) -> tuple[Array, Array]:
    """One token for B sequences (decode): inputs (B, H, N), state (B, H, N, N) [value, key].

    Returns y (B, H, N) in r's dtype and the new state in the state dtype (float32, float64 for float64).
    No argument checks (callers pass well-formed arrays; tests compare it with the reference).
    """
    dt = state_dtype(r.dtype)
    S, y = _step(state.astype(dt), *(x.astype(dt) for x in (r, w, k, v, a, b)))
    return y.astype(r.dtype), S


# ------------------------------------------------------------------------------------------ reference


def wkv7_reference(
    r: Array, w: Array, k: Array, v: Array, a: Array, b: Array, state0: Array
) -> tuple[Array, Array]:
    """The recurrence one step at a time (``lax.scan`` over T), differentiable by JAX autodiff.

    Args: r, w, k, v, a, b (B, T, H, N); state0 (B, H, N, N) [value, key].
    Returns: y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in the state dtype.
    """
    dt = state_dtype(r.dtype)
    xs = tuple(jnp.moveaxis(x.astype(dt), 1, 0) for x in (r, w, k, v, a, b))  # (T, B, H, N)

    def body(S, x):
        return _step(S, *x)

    S, ys = jax.lax.scan(body, state0.astype(dt), xs)  # ys (T, B, H, V)
    return jnp.moveaxis(ys, 0, 1).astype(r.dtype), S


# -------------------------------------------------------------------------------------------- chunked


def _masks(n: int) -> tuple[Array, Array]:
    """(n, n) bool: strictly lower (s < t) and lower including the diagonal (s <= t), [t, s]."""
    t = jnp.arange(n)
    return t[None, :] < t[:, None], t[None, :] <= t[:, None]


def _chunk_parts(r, w, k, a, b):
    """Everything of a chunk that does not depend on S0; inputs chunk-major (..., n, N).

    Returns a dict of: the pairwise decays Daa (s < t: exp(gx_t - g_s)) and Drr (s <= t: exp(g_t - g_s))
    as (..., n, n, K); the n x n blocks L, Mk, Rb, Rk; (I - L)^{-1}; and the per-step factors.
    """
    n = r.shape[-2]
    strict, incl = _masks(n)
    g = jnp.cumsum(w, axis=-2)  # (..., n, K) inclusive
    gx = g - w  # exclusive
    gl = g[..., -1:, :]  # (..., 1, K)
    diff_a = gx[..., :, None, :] - g[..., None, :, :]  # (..., t, s, K), <= 0 where s < t
    diff_r = g[..., :, None, :] - g[..., None, :, :]  # <= 0 where s <= t
    Daa = jnp.exp(jnp.where(strict[:, :, None], diff_a, -jnp.inf))
    Drr = jnp.exp(jnp.where(incl[:, :, None], diff_r, -jnp.inf))
    L = _es("...tj,...sj,...tsj->...ts", a, b, Daa)
    Mk = _es("...tj,...sj,...tsj->...ts", a, k, Daa)
    Rb = _es("...tj,...sj,...tsj->...ts", r, b, Drr)
    Rk = _es("...tj,...sj,...tsj->...ts", r, k, Drr)
    eye = jnp.eye(n, dtype=r.dtype)
    I_L = jnp.broadcast_to(eye, L.shape) - L
    Linv = jax.lax.linalg.triangular_solve(
        I_L, jnp.broadcast_to(eye, L.shape), left_side=True, lower=True, unit_diagonal=True
    )
    ea, er, eo = jnp.exp(gx), jnp.exp(g), jnp.exp(gl - g)
    return dict(Daa=Daa, Drr=Drr, L=L, Mk=Mk, Rb=Rb, Rk=Rk, Linv=Linv, ea=ea, er=er, eo=eo, dl=jnp.exp(gl))


def _forward(r, w, k, v, a, b, S_init):
    """Chunk-major inputs (NC, B, H, n, N), S_init (B, H, V, K). Returns Y, S_final and the residuals."""
    p = _chunk_parts(r, w, k, a, b)
    W = _mm(p["Linv"], a * p["ea"])  # (NC, B, H, n, K)
    U0 = _mm(p["Linv"], _mm(p["Mk"], v))  # (NC, B, H, n, V)
    bo, ko = b * p["eo"], k * p["eo"]
    VK = _mm(_tr(v), ko)  # (NC, B, H, V, K)

    def body(S0, x):
        W_c, U0_c, bo_c, VK_c, dl_c = x
        U = _mm(W_c, _tr(S0)) + U0_c  # (B, H, n, V)
        S_next = S0 * dl_c + _mm(_tr(U), bo_c) + VK_c
        return S_next, (S0, U)

    S_fin, (S0s, U) = jax.lax.scan(body, S_init, (W, U0, bo, VK, p["dl"]))
    Y = _mm(r * p["er"], _tr(S0s)) + _mm(p["Rb"], U) + _mm(p["Rk"], v)  # (NC, B, H, n, V)
    return Y, S_fin, (S0s, U)


@jax.custom_vjp
def _chunked_core(r, w, k, v, a, b, S_init):
    Y, S_fin, _ = _forward(r, w, k, v, a, b, S_init)
    return Y, S_fin


def _core_fwd(r, w, k, v, a, b, S_init):
    Y, S_fin, (S0s, U) = _forward(r, w, k, v, a, b, S_init)
    return (Y, S_fin), (r, w, k, v, a, b, S0s, U)


def _core_bwd(res, grads):
    r, w, k, v, a, b, S0s, U = res
    dY, dS_fin = grads
    p = _chunk_parts(r, w, k, a, b)  # recomputed (cheap, no state dependence)
    strict, incl = _masks(r.shape[-2])
    W = _mm(p["Linv"], a * p["ea"])
    bo, ko = b * p["eo"], k * p["eo"]
    re = r * p["er"]
    dU_y = _mm(_tr(p["Rb"]), dY)  # the part of dU from Y
    dS_y = _mm(_tr(dY), re)  # the part of dS0 from Y's S0 term

    # Reverse scan: dSn is the gradient of the state leaving the chunk.
    def body(dSn, x):
        dU_y_c, bo_c, dS_y_c, W_c, dl_c = x
        dU = dU_y_c + _mm(bo_c, _tr(dSn))  # (B, H, n, V)
        dS0 = dSn * dl_c + dS_y_c + _mm(_tr(dU), W_c)
        return dS0, (dSn, dU)

    dS_init, (dSn, dU) = jax.lax.scan(body, dS_fin, (dU_y, bo, dS_y, W, p["dl"]), reverse=True)

    # U = (I - L)^{-1} Z with Z = (a exp(gx)) S0^T + Mk V.
    dZ = _mm(_tr(p["Linv"]), dU)
    dL = jnp.where(strict, _mm(dZ, _tr(U)), 0.0)
    dMk = jnp.where(strict, _mm(dZ, _tr(v)), 0.0)
    dRb = jnp.where(incl, _mm(dY, _tr(U)), 0.0)
    dRk = jnp.where(incl, _mm(dY, _tr(v)), 0.0)
    dA = _mm(dZ, S0s)  # d(a exp(gx))
    dre = _mm(dY, S0s)  # d(r exp(g))
    dbo, dko = _mm(U, dSn), _mm(v, dSn)
    dv = _mm(_tr(p["Mk"]), dZ) + _mm(_tr(p["Rk"]), dY) + _mm(ko, _tr(dSn))

    # Pairwise blocks: X[t,s] = sum_j x_t y_s D[t,s,j]; the exponent's gradient is dx * x (per side).
    Daa, Drr = p["Daa"], p["Drr"]
    da_p = _es("...ts,...sj,...tsj->...tj", dL, b, Daa) + _es("...ts,...sj,...tsj->...tj", dMk, k, Daa)
    db_L = _es("...ts,...tj,...tsj->...sj", dL, a, Daa)
    dk_M = _es("...ts,...tj,...tsj->...sj", dMk, a, Daa)
    dr_p = _es("...ts,...sj,...tsj->...tj", dRb, b, Drr) + _es("...ts,...sj,...tsj->...tj", dRk, k, Drr)
    db_R = _es("...ts,...tj,...tsj->...sj", dRb, r, Drr)
    dk_R = _es("...ts,...tj,...tsj->...sj", dRk, r, Drr)

    da = da_p + dA * p["ea"]
    dr = dr_p + dre * p["er"]
    db = db_L + db_R + dbo * p["eo"]
    dk = dk_M + dk_R + dko * p["eo"]
    # Log-decay: Daa carries +gx_t - g_s, Drr +g_t - g_s, ea +gx, er +g, eo +gl - g, dl +gl.
    dgx = a * da_p + dA * a * p["ea"]
    p_out = dbo * bo + dko * ko
    dg = r * dr_p + dre * re - b * (db_L + db_R) - k * (dk_M + dk_R) - p_out
    dgl = jnp.sum(p_out, axis=-2, keepdims=True) + jnp.sum(dSn * S0s * p["dl"], axis=-2, keepdims=True)
    dg = dg + dgx
    dg = dg.at[..., -1:, :].add(dgl)
    dw = jnp.flip(jnp.cumsum(jnp.flip(dg, -2), axis=-2), -2) - dgx  # g = cumsum(w), gx = g - w
    return dr, dw, dk, dv, da, db, dS_init


_chunked_core.defvjp(_core_fwd, _core_bwd)


def _to_chunks(x: Array, n: int) -> Array:
    """(B, NC*n, H, N) -> chunk-major (NC, B, H, n, N)."""
    B, T, H, N = x.shape
    return x.reshape(B, T // n, n, H, N).transpose(1, 0, 3, 2, 4)


def _from_chunks(y: Array) -> Array:
    """(NC, B, H, n, N) -> (B, NC*n, H, N)."""
    NC, B, H, n, N = y.shape
    return y.transpose(1, 0, 3, 2, 4).reshape(B, NC * n, H, N)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def wkv7_chunked(
    r: Array, w: Array, k: Array, v: Array, a: Array, b: Array, state0: Array, chunk_size: int = 16
) -> tuple[Array, Array]:
    """Chunk-parallel evaluation (exact for any w <= 0) with a hand-written backward; any T.

    Args: r, w, k, v, a, b (B, T, H, N); state0 (B, H, N, N) [value, key]; chunk_size static.
    Returns: y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in the state dtype.
    """
    B, T, H, N = r.shape
    dt = state_dtype(r.dtype)
    S = state0.astype(dt)
    if T == 0:
        return jnp.zeros(r.shape, r.dtype), S
    n = min(chunk_size, T)
    pad = -T % n  # padded steps: w = 0 and k = v = a = b = r = 0 leave the state unchanged
    xs = [jnp.pad(x.astype(dt), ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (r, w, k, v, a, b)]
    Y, S = _chunked_core(*(_to_chunks(x, n) for x in xs), S)
    return _from_chunks(Y)[:, :T].astype(r.dtype), S


# ---------------------------------------------------------------------------------------------- entry


def _check(arrays: tuple[Array, ...], impl: str, chunk_size: int) -> None:
    names = ("r", "w", "k", "v", "a", "b")
    shape = jnp.shape(arrays[0])
    if len(shape) != 4:
        raise ValueError(f"wkv7: r must be (B, T, H, N), got shape {tuple(shape)}")
    for name, x in zip(names, arrays, strict=True):
        if jnp.shape(x) != shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(jnp.shape(x))}, expected {tuple(shape)} like r")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"wkv7: {name} must be a float array, got {jnp.result_type(x)}")
    if impl not in IMPLS:
        raise ValueError(f"wkv7: impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"wkv7: chunk_size must be a positive int, got {chunk_size!r}")


def wkv7(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    a: Array,
    b: Array,
    state: Array | None = None,
    state_map: Array | None = None,
    *,
    impl: str = "chunked",
    chunk_size: int = 16,
    checked: bool = False,
) -> tuple[Array, Array]:
    """Run the RWKV-7 WKV recurrence (contract: this module's docstring and :mod:`rwkvkit.wkv.v7`).

    Args:
        r, w, k, v, a, b: (B, T, H, N) float arrays; w is the log decay (w <= 0).
        state: None (zeros), (B, H, N, N) per row, (1, H, N, N) shared, or a bank (n_state, H, N, N)
            with ``state_map`` (B,) int picking each row's entry (see :mod:`rwkvkit.jax.state`).
        impl: "chunked" (default) or "reference"; chunk_size: chunk length (static);
        checked: under jit, also raise (host callback) on a bad state_map index.
    Returns:
        y (B, T, H, N) in r's dtype, final state (B, H, N, N) float32 (float64 for float64 r).
    """
    arrays = tuple(jnp.asarray(x) for x in (r, w, k, v, a, b))
    _check(arrays, impl, chunk_size)
    B, _, H, N = arrays[0].shape
    S = initial_state(state, state_map, (B, H, N), arrays[0].dtype, checked)
    if impl == "reference":
        return wkv7_reference(*arrays, S)
    return wkv7_chunked(*arrays, S, chunk_size=chunk_size)
