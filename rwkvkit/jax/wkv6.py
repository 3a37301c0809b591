"""The RWKV-5.2 / RWKV-6 WKV operator in JAX: reference scan, one-token step, chunk-parallel form.

This module owns ``wkv6`` and ``wkv5`` for JAX, with the contract of :mod:`rwkvkit.wkv.v6`. Per batch
element and head, with the state S laid out [value, key] (B, H, N, N):

    y_t = S_{t-1} r_t + (r_t . (u * k_t)) v_t          (the output reads the OLD state)
    S_t = S_{t-1} diag(exp(w_t)) + v_t k_t^T

r, w, k, v are (B, T, H, N), u is (H, N), ``w`` is the LOG of the per-step decay (w <= 0). RWKV-5.2's w
is one constant (H, N): :func:`wkv5` takes it so and broadcasts it over B and T inside (no copy is
needed from the caller). The state is computed in float32 (float64 for float64 r); y comes back in r's
dtype, the final state in the state dtype. Initial states: ``state`` / ``state_map`` as in
:mod:`rwkvkit.jax.state` (None, per row, shared (1, H, N, N), or a bank picked by ``state_map``).

Forms (``impl``, a static choice): "reference" (a ``lax.scan`` over tokens, autodiff through it) and
"chunked" (see :func:`wkv6_chunked`: chunk-parallel with a hand-written ``custom_vjp``, exact for any
w <= 0). :func:`wkv6_step` / :func:`wkv5_step` run one token (decode). All matmuls use
``Precision.HIGHEST`` (no TF32 / bf16 passes on accelerators).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rwkvkit.jax.state import initial_state

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "wkv5",
    "wkv5_chunked",
    "wkv5_reference",
    "wkv5_step",
    "wkv6",
    "wkv6_chunked",
    "wkv6_reference",
    "wkv6_step",
]

Array = Any  # jax.Array

# Chunk length of the chunked form. Its intra-chunk part holds an exact (n, n, N) decay tensor per chunk
# (B * H * T * n * N numbers), so the chunk stays short.
DEFAULT_CHUNK_SIZE = 16

_HI = jax.lax.Precision.HIGHEST
_IMPLS = ("chunked", "reference")


# ---------------------------------------------------------------------------------------------- checks


def _is_float(x: Array) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _check(
    op: str, r: Array, w: Array, k: Array, v: Array, u: Array, w_const: bool, step: bool
) -> tuple[int, ...]:
    """Shapes and dtypes of (r, w, k, v, u); returns r's shape. One-line ValueErrors."""
    lead = "(B, H, N)" if step else "(B, T, H, N)"
    ndim = 3 if step else 4
    names = {"r": r, "w": w, "k": k, "v": v, "u": u}
    for name, x in names.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{op}: {name} must be an array, got {type(x).__name__}")
        if not _is_float(x):
            raise ValueError(f"{op}: {name} must be a floating-point array, got {jnp.asarray(x).dtype}")
    if r.ndim != ndim:
        raise ValueError(f"{op}: r must be {lead}, got shape {tuple(r.shape)}")
    H, N = r.shape[-2:]
    per_step = ("k", "v") if w_const else ("w", "k", "v")
    for name in per_step:
        if names[name].shape != r.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(names[name].shape)}, r has {tuple(r.shape)}")
    if w_const and w.shape != (H, N):
        raise ValueError(f"{op}: w (RWKV-5.2's constant log-decay) must be (H, N) = {(H, N)}, got {w.shape}")
    if u.shape != (H, N):
        raise ValueError(f"{op}: u must be (H, N) = {(H, N)}, got {tuple(u.shape)}")
    return tuple(r.shape)


def _check_impl(op: str, impl: str, chunk_size: int) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be one of {_IMPLS}, got {impl!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a static int >= 1, got {chunk_size!r}")


# ------------------------------------------------------------------------------------ reference, step


def _step(S: Array, r: Array, w: Array, k: Array, v: Array, u: Array) -> tuple[Array, Array]:
    """One token in the state dtype: S (B, H, V, K); r, w, k, v (B, H, N); u (H, N)."""
    bonus = jnp.sum(r * u * k, axis=-1, keepdims=True)  # (B, H, 1)
    y = jnp.einsum("bhvk,bhk->bhv", S, r, precision=_HI) + bonus * v  # (B, H, V), OLD state
    S = S * jnp.exp(w)[..., None, :] + v[..., :, None] * k[..., None, :]  # (B, H, V, K)
    return y, S


def _reference(r: Array, w: Array, k: Array, v: Array, u: Array, S: Array) -> tuple[Array, Array]:
    """The scan over tokens; r, k, v (B, T, H, N), w (B, T, H, N) or (H, N), all in the state dtype."""
    const_w = w.ndim == 2

    def body(S: Array, x: tuple[Array, ...]) -> tuple[Array, Array]:
        r_t, w_t, k_t, v_t = x if not const_w else (x[0], w, x[1], x[2])
        y_t, S = _step(S, r_t, w_t, k_t, v_t, u)
        return S, y_t

    xs = (r, k, v) if const_w else (r, w, k, v)
    S, ys = jax.lax.scan(body, S, tuple(jnp.moveaxis(x, 1, 0) for x in xs))  # ys (T, B, H, V)
    return jnp.moveaxis(ys, 0, 1), S


def _run_reference(op: str, r, w, k, v, u, state, state_map, checked, w_const) -> tuple[Array, Array]:
    B, T, H, N = _check(op, r, w, k, v, u, w_const, step=False)
    S = initial_state(state, state_map, (B, H, N), r.dtype, checked)  # (B, H, V, K)
    dt = S.dtype
    y, S = _reference(*(jnp.asarray(x).astype(dt) for x in (r, w, k, v, u)), S)
    return y.astype(r.dtype), S


def wkv6_reference(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    u: Array,
    state: Array | None = None,
    state_map: Array | None = None,
    *,
    checked: bool = False,
) -> tuple[Array, Array]:
    """The recurrence token by token (``lax.scan``; autodiff through it): the JAX ground truth.

    r, w, k, v (B, T, H, N); u (H, N); state / state_map as in :mod:`rwkvkit.jax.state`.
    Returns y (B, T, H, N) in r's dtype and the final state (B, H, N, N) [value, key] in the state dtype.
    """
    return _run_reference("wkv6", r, w, k, v, u, state, state_map, checked, w_const=False)


def wkv5_reference(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    u: Array,
    state: Array | None = None,
    state_map: Array | None = None,
    *,
    checked: bool = False,
) -> tuple[Array, Array]:
    """:func:`wkv6_reference` with RWKV-5.2's constant log-decay w (H, N), the same for every B and T."""
    return _run_reference("wkv5", r, w, k, v, u, state, state_map, checked, w_const=True)


def _run_step(op: str, r, w, k, v, u, state, state_map, checked, w_const) -> tuple[Array, Array]:
    B, H, N = _check(op, r, w, k, v, u, w_const, step=True)
    S = initial_state(state, state_map, (B, H, N), r.dtype, checked)  # (B, H, V, K)
    dt = S.dtype
    y, S = _step(S, *(jnp.asarray(x).astype(dt) for x in (r, w, k, v, u)))
    return y.astype(r.dtype), S


def wkv6_step(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    u: Array,
    state: Array | None = None,
    state_map: Array | None = None,
    *,
    checked: bool = False,
) -> tuple[Array, Array]:
    """One token (decode): r, w, k, v (B, H, N); u (H, N); state / state_map as for :func:`wkv6`.

    Returns y (B, H, N) in r's dtype and the new state (B, H, N, N) in the state dtype.
    """
    return _run_step("wkv6_step", r, w, k, v, u, state, state_map, checked, w_const=False)


def wkv5_step(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    u: Array,
    state: Array | None = None,
    state_map: Array | None = None,
    *,
    checked: bool = False,
) -> tuple[Array, Array]:
    """One RWKV-5.2 token: :func:`wkv6_step` with the constant log-decay w (H, N)."""
    return _run_step("wkv5_step", r, w, k, v, u, state, state_map, checked, w_const=True)


# -------------------------------------------------------------------------------------------- chunked


def _excl_cumsum(x: Array, axis: int) -> Array:
    """out_t = sum_{s<t} x_s along ``axis``."""
    return _shift(jnp.cumsum(x, axis=axis), axis)


def _shift(c: Array, axis: int) -> Array:
    """c shifted one step later along ``axis``, zero first: turns an inclusive cumsum exclusive exactly."""
    c = jnp.moveaxis(c, axis, 0)
    c = jnp.concatenate([jnp.zeros_like(c[:1]), c[:-1]], axis=0)
    return jnp.moveaxis(c, 0, axis)


def _after_sum(x: Array) -> Array:
    """(..., n, K): out_t = sum_{s>t} x_s along the step axis (a reverse exclusive cumsum)."""
    return jnp.flip(_excl_cumsum(jnp.flip(x, -2), -2), -2)


def _pair_segsum(w: Array) -> Array:
    """(..., n, K) -> (..., n_i, n_j, K): sum_{j<t<i} w_t for j < i, -inf for j >= i (exp gives 0).

    Each entry is summed over its own range (a masked cumulative sum), never as the difference of two
    cumulative sums, so it is exactly <= 0 and exp() never overflows for any w <= 0.
    """
    n = w.shape[-2]
    t = jnp.arange(n)
    later = (t[:, None] > t[None, :])[..., None]  # (n_t, n_j, 1): t > j
    z = jnp.where(later, w[..., :, None, :], 0.0)  # (..., n_t, n_j, K)
    seg = _excl_cumsum(z, -3)  # [i, j]: sum_{t<i, t>j} w_t
    return jnp.where(later, seg, -jnp.inf)  # rows i, columns j: valid where i > j


def _chunk_handoff(w: Array, k: Array, v: Array) -> tuple[Array, Array]:
    """What each chunk adds to the state and its total decay: w, k, v (B, H, NC, n, N) ->
    incr (B, H, NC, V, K) = sum_j v_j (k_j * exp(W(j+1..n-1)))^T, decay (B, H, NC, 1, K) = exp(W(0..n-1))."""
    k_out = k * jnp.exp(_after_sum(w))  # (B, H, NC, n, K)
    incr = jnp.einsum("...jv,...jk->...vk", v, k_out, precision=_HI)  # (B, H, NC, V, K)
    return incr, jnp.exp(jnp.sum(w, axis=-2, keepdims=True))


def _chunk_out(r: Array, w: Array, k: Array, v: Array, u: Array, S0: Array) -> Array:
    """Outputs of every chunk given the state entering it: (B, H, NC, n, N) inputs, u (H, N), S0
    (B, H, NC, V, K) -> y (B, H, NC, n, V)."""
    q = r * jnp.exp(_excl_cumsum(w, -2))  # (B, H, NC, n, K): r_i exp(W(0..i-1))
    y = jnp.einsum("...ik,...vk->...iv", q, S0, precision=_HI)  # inter-chunk part
    y = y + jnp.sum(r * u[:, None, None, :] * k, axis=-1, keepdims=True) * v  # the bonus
    E = jnp.exp(_pair_segsum(w))  # (B, H, NC, n_i, n_j, K), 0 where j >= i
    A = jnp.einsum("...id,...jd,...ijd->...ij", r, k, E, precision=_HI)  # (B, H, NC, n, n)
    return y + jnp.einsum("...ij,...jv->...iv", A, v, precision=_HI)  # intra-chunk part


def _handoff_scan(S: Array, incr: Array, decay: Array) -> tuple[Array, Array]:
    """The states entering every chunk (B, H, NC, V, K) and the final one, S_next = S * decay + incr."""

    def body(S: Array, x: tuple[Array, Array]) -> tuple[Array, Array]:
        inc, d = x
        return S * d + inc, S

    S, starts = jax.lax.scan(body, S, (jnp.moveaxis(incr, 2, 0), jnp.moveaxis(decay, 2, 0)))
    return jnp.moveaxis(starts, 0, 2), S


@jax.custom_vjp
def _chunked_core(r: Array, w: Array, k: Array, v: Array, u: Array, S: Array) -> tuple[Array, Array]:
    """Whole chunks: r, w, k, v (B, H, NC, n, N), u (H, N), S (B, H, V, K) -> y (B, H, NC, n, V), S_T."""
    incr, decay = _chunk_handoff(w, k, v)
    S0, S = _handoff_scan(S, incr, decay)
    return _chunk_out(r, w, k, v, u, S0), S


def _chunked_fwd(r, w, k, v, u, S):
    incr, decay = _chunk_handoff(w, k, v)
    S0, S_T = _handoff_scan(S, incr, decay)
    return (_chunk_out(r, w, k, v, u, S0), S_T), (r, w, k, v, u, S0, decay)


def _chunked_bwd(res, cot):
    """The backward: the chunk-parallel parts by their VJPs (recomputed from the inputs and the saved
    chunk-entry states), the state hand-off by a hand-written reverse scan over the chunks."""
    r, w, k, v, u, S0, decay = res
    dy, dS_T = cot
    _, out_vjp = jax.vjp(_chunk_out, r, w, k, v, u, S0)
    dr, dw, dk, dv, du, dS0 = out_vjp(dy)  # dS0: what the outputs of chunk c send to its entry state

    def body(g: Array, x: tuple[Array, Array, Array]) -> tuple[Array, tuple[Array, Array]]:
        dS0_c, d_c, S0_c = x  # g: the cotangent of the state leaving chunk c
        d_decay = jnp.sum(g * S0_c, axis=-2, keepdims=True)  # (B, H, 1, K)
        return dS0_c + g * d_c, (g, d_decay)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (dS0, decay, S0))
    dS, (d_incr, d_decay) = jax.lax.scan(body, dS_T, xs, reverse=True)
    _, hand_vjp = jax.vjp(_chunk_handoff, w, k, v)
    dw2, dk2, dv2 = hand_vjp((jnp.moveaxis(d_incr, 0, 2), jnp.moveaxis(d_decay, 0, 2)))
    return dr, dw + dw2, dk + dk2, dv + dv2, du, dS


_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)


def _chunked(r: Array, w: Array, k: Array, v: Array, u: Array, S: Array, n: int) -> tuple[Array, Array]:
    """(B, T, H, N) inputs in the state dtype (w may be (H, N)) -> y (B, T, H, V), S_T; chunk length n."""
    B, T, H, N = r.shape
    if T == 0:
        return jnp.zeros((B, 0, H, N), r.dtype), S
    n = min(n, T)
    NC = -(-T // n)
    pad = NC * n - T
    w = jnp.broadcast_to(w, r.shape)

    def chunks(x: Array) -> Array:
        """(B, T, H, N) -> (B, H, NC, n, N), zero-padded in time (w = 0, r = k = v = 0: state unchanged)."""
        x = jnp.swapaxes(x, 1, 2)  # (B, H, T, N)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
        return x.reshape(B, H, NC, n, N)

    y, S = _chunked_core(*(chunks(x) for x in (r, w, k, v)), u, S)  # y (B, H, NC, n, V)
    return jnp.swapaxes(y.reshape(B, H, NC * n, N)[:, :, :T], 1, 2), S


def _run_chunked(op, r, w, k, v, u, state, state_map, chunk_size, checked, w_const) -> tuple[Array, Array]:
    _check_impl(op, "chunked", chunk_size)
    B, T, H, N = _check(op, r, w, k, v, u, w_const, step=False)
    S = initial_state(state, state_map, (B, H, N), r.dtype, checked)  # (B, H, V, K)
    dt = S.dtype
    y, S = _chunked(*(jnp.asarray(x).astype(dt) for x in (r, w, k, v, u)), S, chunk_size)
    return y.astype(r.dtype), S


def wkv6_chunked(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    u: Array,
    state: Array | None = None,
    state_map: Array | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checked: bool = False,
) -> tuple[Array, Array]:
    """Chunk-parallel evaluation with a hand-written backward (``jax.custom_vjp``); jit-able, any T.

    T is cut into chunks of n = min(chunk_size, T) steps (static), the tail zero-padded (w = 0 and
    r = k = v = 0 leave the state unchanged) and sliced off. With W(a..b) = sum_{a<=t<=b} w_t per key
    channel and S0 the state entering a chunk:

        y_i    = S0 (r_i * exp(W(0..i-1))) + sum_{j<i} A_ij v_j + (r_i . (u * k_i)) v_i,
                 A_ij = sum_d r_id k_jd exp(W(j+1..i-1)_d)
        S_next = S0 diag(exp(W(0..n-1))) + sum_j v_j (k_j * exp(W(j+1..n-1)))^T

    Every exponent is a range sum of w formed by an exclusive / reverse / masked cumulative sum (the
    pairwise one an exact (n, n, N) tensor per chunk), never exp(cumsum) * exp(-cumsum): all are <= 0,
    so nothing overflows for any w <= 0 (w = -exp(3.8) per token underflows harmlessly to 0, as do its
    gradients), and w near 0 loses nothing. The chunks' hand-off terms and outputs are computed for all
    chunks at once; only S_next = S0 * decay + incr runs sequentially (``lax.scan``). Backward: VJPs of
    the chunk-parallel parts (recomputed from the inputs and the saved chunk-entry states) and a
    reverse scan for the state cotangent; gradients reach r, w, k, v, u and the initial state.

    Args/returns as :func:`wkv6_reference`, plus ``chunk_size`` (a static int >= 1).
    """
    return _run_chunked("wkv6", r, w, k, v, u, state, state_map, chunk_size, checked, w_const=False)


def wkv5_chunked(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    u: Array,
    state: Array | None = None,
    state_map: Array | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checked: bool = False,
) -> tuple[Array, Array]:
    """:func:`wkv6_chunked` with RWKV-5.2's constant log-decay w (H, N), broadcast over B and T inside
    (its gradient sums over them)."""
    return _run_chunked("wkv5", r, w, k, v, u, state, state_map, chunk_size, checked, w_const=True)


# ---------------------------------------------------------------------------------------------- entries


def _entry(op, forms, r, w, k, v, u, state, state_map, impl, chunk_size, checked) -> tuple[Array, Array]:
    _check_impl(op, impl, chunk_size)
    if impl == "reference":
        return forms[0](r, w, k, v, u, state, state_map, checked=checked)
    return forms[1](r, w, k, v, u, state, state_map, chunk_size=chunk_size, checked=checked)


def wkv6(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    u: Array,
    state: Array | None = None,
    state_map: Array | None = None,
    *,
    impl: str = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checked: bool = False,
) -> tuple[Array, Array]:
    """Run the RWKV-6 WKV (the contract of :func:`rwkvkit.wkv.wkv6`; see this module's docstring).

    Args:
        r, w, k, v: (B, T, H, N); w is the log of the per-step decay (w <= 0).
        u: (H, N) the current token's bonus (time_faaaa).
        state: None (zeros), (B, H, N, N) per row, (1, H, N, N) shared, or a bank (n_state, H, N, N)
            with state_map (B,) int32; [value, key].
        impl: "chunked" (default) or "reference"; static. chunk_size: static chunk length (chunked).
        checked: under jit, also raise (host callback) for a state_map index outside the bank.
    Returns:
        y (B, T, H, N) in r's dtype, final state (B, H, N, N) float32 (float64 for float64 r).
    """
    forms = (wkv6_reference, wkv6_chunked)
    return _entry("wkv6", forms, r, w, k, v, u, state, state_map, impl, chunk_size, checked)


def wkv5(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    u: Array,
    state: Array | None = None,
    state_map: Array | None = None,
    *,
    impl: str = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checked: bool = False,
) -> tuple[Array, Array]:
    """Run the RWKV-5.2 WKV: :func:`wkv6` with a constant log-decay w (H, N) = -exp(time_decay), the
    same for every batch row and token (broadcast inside: pass it as stored, no (B, T, H, N) copy)."""
    forms = (wkv5_reference, wkv5_chunked)
    return _entry("wkv5", forms, r, w, k, v, u, state, state_map, impl, chunk_size, checked)
