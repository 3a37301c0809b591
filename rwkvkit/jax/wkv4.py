"""The RWKV-4 WKV operator in JAX: reference scan, one-token step, chunk-parallel form.

This module owns ``wkv4`` for JAX, with the contract of :mod:`rwkvkit.wkv.v4`: k, v (B, T, C); w, u
(C,), per channel, for t = 0 .. T-1:

    wkv_t   = (A_t + e^{u + k_t} v_t) / (B_t + e^{u + k_t})        (the output reads the OLD sums)
    A_{t+1} = e^{w} A_t + e^{k_t} v_t,   B_{t+1} = e^{w} B_t + e^{k_t}

``w`` is the LOG-DECAY, w = -exp(time_decay) <= 0 (NOT the raw checkpoint ``time_decay``); ``u`` is
``time_first`` as stored. The state is (aa, bb, pp), each (B, C), holding A = aa e^{pp}, B = bb e^{pp}
(pp a running maximum of the exponents); a fresh sequence is aa = bb = 0, pp = -1e38. Initial states:
``state`` / ``state_map`` as in :func:`rwkvkit.jax.state.initial_state_v4` (None, per row, shared
(1, C) parts, or a bank picked by ``state_map``). The state is float32 (float64 for float64 k); y comes
back in k's dtype. Two states are equal when (aa, bb) agree after rescaling to a common pp, so the
chunked form's final state may differ element by element from the reference's while meaning the same.

Forms (``impl``, static): "reference" (the stable step recurrence of the official inference code as a
``lax.scan``, autodiff through it) and "chunked" (:func:`wkv4_chunked`: chunk-parallel with the
(aa, bb, pp) log-sum-exp state and a hand-written ``custom_vjp``). :func:`wkv4_step` runs one token.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rwkvkit.jax.state import initial_state_v4

__all__ = ["DEFAULT_CHUNK_SIZE", "wkv4", "wkv4_chunked", "wkv4_reference", "wkv4_step"]

Array = Any  # jax.Array
State4 = tuple[Array, Array, Array]  # (aa, bb, pp), each (B, C)

# Chunk length of the chunked form; it holds B * T * chunk_size * C intermediates.
DEFAULT_CHUNK_SIZE = 16

_HI = jax.lax.Precision.HIGHEST
_IMPLS = ("chunked", "reference")


def _check(op: str, w: Array, u: Array, k: Array, v: Array, step: bool) -> tuple[int, ...]:
    """Shapes and dtypes of (w, u, k, v); returns k's shape. One-line ValueErrors."""
    names = {"w": w, "u": u, "k": k, "v": v}
    for name, x in names.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{op}: {name} must be an array, got {type(x).__name__}")
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise ValueError(f"{op}: {name} must be a floating-point array, got {jnp.asarray(x).dtype}")
    lead = "(B, C)" if step else "(B, T, C)"
    if k.ndim != (2 if step else 3):
        raise ValueError(f"{op}: k must be {lead}, got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v has shape {tuple(v.shape)}, k has {tuple(k.shape)}")
    C = k.shape[-1]
    for name in ("w", "u"):
        if names[name].shape != (C,):
            raise ValueError(f"{op}: {name} must be (C,) = ({C},), got {tuple(names[name].shape)}")
    return tuple(k.shape)


def _check_impl(op: str, impl: str, chunk_size: int) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be one of {_IMPLS}, got {impl!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a static int >= 1, got {chunk_size!r}")


def _inputs(op, w, u, k, v, state, state_map, checked, step) -> tuple[tuple[Array, ...], State4]:
    """(w, u, k, v) in the state dtype and the initial (aa, bb, pp)."""
    shape = _check(op, w, u, k, v, step)
    st = initial_state_v4(state, state_map, (shape[0], shape[-1]), k.dtype, checked)
    dt = st[0].dtype
    return tuple(jnp.asarray(x).astype(dt) for x in (w, u, k, v)), st


# ------------------------------------------------------------------------------------ reference, step


def _advance(w: Array, u: Array, k: Array, v: Array, st: State4) -> tuple[Array, State4]:
    """One token of the stable recurrence: w, u (C,); k, v and the state parts (B, C)."""
    aa, bb, pp = st
    ww = u + k
    p = jnp.maximum(pp, ww)
    e1, e2 = jnp.exp(pp - p), jnp.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = w + pp
    p = jnp.maximum(ww, k)
    e1, e2 = jnp.exp(ww - p), jnp.exp(k - p)
    return y, (e1 * aa + e2 * v, e1 * bb + e2, p)


def wkv4_reference(
    w: Array,
    u: Array,
    k: Array,
    v: Array,
    state: State4 | None = None,
    state_map: Array | None = None,
    *,
    checked: bool = False,
) -> tuple[Array, State4]:
    """The stable recurrence token by token (``lax.scan``; autodiff through it): the JAX ground truth.

    w, u (C,); k, v (B, T, C); state (aa, bb, pp) / state_map as in :mod:`rwkvkit.jax.state`.
    Returns y (B, T, C) in k's dtype and the final (aa, bb, pp), each (B, C), in the state dtype.
    """
    (w, u, kk, vv), st = _inputs("wkv4", w, u, k, v, state, state_map, checked, step=False)

    def body(st: State4, x: tuple[Array, Array]) -> tuple[State4, Array]:
        y, st = _advance(w, u, x[0], x[1], st)
        return st, y

    st, ys = jax.lax.scan(body, st, (jnp.moveaxis(kk, 1, 0), jnp.moveaxis(vv, 1, 0)))  # ys (T, B, C)
    return jnp.moveaxis(ys, 0, 1).astype(k.dtype), st


def wkv4_step(
    w: Array,
    u: Array,
    k: Array,
    v: Array,
    state: State4 | None = None,
    state_map: Array | None = None,
    *,
    checked: bool = False,
) -> tuple[Array, State4]:
    """One token (decode): w, u (C,); k, v (B, C); state as for :func:`wkv4`.

    Returns y (B, C) in k's dtype and the new (aa, bb, pp).
    """
    (w, u, kk, vv), st = _inputs("wkv4_step", w, u, k, v, state, state_map, checked, step=True)
    y, st = _advance(w, u, kk, vv, st)
    return y.astype(k.dtype), st


# -------------------------------------------------------------------------------------------- chunked


def _summaries(w: Array, k: Array, v: Array) -> State4:
    """What each chunk alone adds to the state at its end: w (C,); k, v (B, NC, L, C) -> (a, b, p) each
    (B, NC, C). Token i enters the end state with exponent (L-1-i) w + k_i; p is their maximum (a
    representation choice: it carries no gradient, A = a e^p does not depend on it)."""
    L = k.shape[2]
    steps_to_end = jnp.arange(L - 1, -1, -1, dtype=k.dtype)  # (L,)
    logits = steps_to_end[:, None] * w + k  # (B, NC, L, C)
    p = jax.lax.stop_gradient(jnp.max(logits, axis=2))  # (B, NC, C)
    e = jnp.exp(logits - p[:, :, None])  # every exponent <= 0
    return jnp.sum(e * v, axis=2), jnp.sum(e, axis=2), p


def _combine(w: Array, L: int, st: State4, summ: State4) -> State4:
    """The state leaving a chunk of length L: e^{L w} (state entering) + (its summary), log-max form."""
    aa, bb, pp = st
    a_c, b_c, p_c = summ
    q = w * L + pp
    p = jnp.maximum(q, p_c)
    e1, e2 = jnp.exp(q - p), jnp.exp(p_c - p)
    return e1 * aa + e2 * a_c, e1 * bb + e2 * b_c, p


def _outputs(w: Array, u: Array, k: Array, v: Array, entering: State4) -> Array:
    """Outputs of every chunk given the state entering it: w, u (C,); k, v (B, NC, L, C); entering parts
    (B, NC, C) -> y (B, NC, L, C).

    Row t mixes token i < t with exponent (t-1-i) w + k_i, itself with u + k_t, the entering state with
    t w + pp_in; all are taken relative to the row's maximum (no gradient: it cancels between numerator
    and denominator), so every exp() argument is <= 0.
    """
    aa_in, bb_in, pp_in = entering
    L = k.shape[2]
    t = jnp.arange(L)
    gap = (t[:, None] - 1 - t[None, :]).astype(k.dtype)  # (L_t, L_i): t-1-i
    diag = t[:, None] == t[None, :]
    past = t[None, :] < t[:, None]
    bias = jnp.where(diag, u[:, None, None], jnp.where(past, gap * w[:, None, None], -jnp.inf))  # (C, L, L)
    kc = jnp.swapaxes(k, 2, 3)  # (B, NC, C, L)
    logits = bias + kc[..., None, :]  # (B, NC, C, L_t, L_i), -inf above the diagonal
    from_state = t.astype(k.dtype) * w[:, None] + pp_in[..., None]  # (B, NC, C, L)
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(logits, axis=-1), from_state))  # (B, NC, C, L)
    e = jnp.exp(logits - m[..., None])  # (B, NC, C, L, L), 0 above the diagonal
    e_s = jnp.exp(from_state - m)  # (B, NC, C, L)
    vc = jnp.swapaxes(v, 2, 3)  # (B, NC, C, L)
    num = jnp.einsum("...ti,...i->...t", e, vc, precision=_HI) + e_s * aa_in[..., None]
    den = jnp.sum(e, axis=-1) + e_s * bb_in[..., None]
    return jnp.swapaxes(num / den, 2, 3)  # (B, NC, L, C)


def _scan_chunks(w: Array, L: int, st: State4, summ: State4) -> tuple[State4, State4]:
    """The states entering every chunk (parts (B, NC, C)) and the one after the last."""

    def body(st: State4, s: State4) -> tuple[State4, State4]:
        return _combine(w, L, st, s), st

    st, entering = jax.lax.scan(body, st, tuple(jnp.moveaxis(x, 1, 0) for x in summ))
    return tuple(jnp.moveaxis(x, 0, 1) for x in entering), st


@jax.custom_vjp
def _chunked_core(w: Array, u: Array, k: Array, v: Array, st: State4) -> tuple[Array, State4]:
    """Whole chunks: k, v (B, NC, L, C), state parts (B, C) -> y (B, NC, L, C) and the state after."""
    summ = _summaries(w, k, v)
    entering, st = _scan_chunks(w, k.shape[2], st, summ)
    return _outputs(w, u, k, v, entering), st


def _chunked_fwd(w, u, k, v, st):
    summ = _summaries(w, k, v)
    entering, st_T = _scan_chunks(w, k.shape[2], st, summ)
    return (_outputs(w, u, k, v, entering), st_T), (w, u, k, v, entering, summ)


def _chunked_bwd(res, cot):
    """The backward: the chunk-parallel parts by their VJPs (recomputed from the inputs and the saved
    chunk-entry states), the chunk-to-chunk state hand-off by a hand-written reverse scan whose steps
    are the VJPs of one :func:`_combine`."""
    w, u, k, v, entering, summ = res
    dy, d_st = cot
    L = k.shape[2]
    _, out_vjp = jax.vjp(_outputs, w, u, k, v, entering)
    dw, du, dk, dv, d_entering = out_vjp(dy)

    def body(g: State4, x: tuple[State4, State4, State4]) -> tuple[State4, tuple[Array, State4]]:
        st_c, summ_c, d_ent_c = x  # g: the cotangent of the state leaving chunk c
        _, comb_vjp = jax.vjp(lambda w_, s_, m_: _combine(w_, L, s_, m_), w, st_c, summ_c)
        dw_c, d_in, d_summ = comb_vjp(g)
        return tuple(a + b for a, b in zip(d_in, d_ent_c, strict=True)), (dw_c, d_summ)

    xs = tuple(tuple(jnp.moveaxis(x, 1, 0) for x in part) for part in (entering, summ, d_entering))
    d_st0, (dw_chunks, d_summ) = jax.lax.scan(body, d_st, xs, reverse=True)
    _, summ_vjp = jax.vjp(_summaries, w, k, v)
    dw2, dk2, dv2 = summ_vjp(tuple(jnp.moveaxis(x, 0, 1) for x in d_summ))
    return dw + dw2 + jnp.sum(dw_chunks, axis=0), du, dk + dk2, dv + dv2, d_st0


_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)


def _chunked(w: Array, u: Array, k: Array, v: Array, st: State4, L: int) -> tuple[Array, State4]:
    """k, v (B, T, C) in the state dtype. The whole chunks of length L run together, then a last partial
    chunk (T not a multiple of L: a static shape) as one shorter chunk from the state they leave."""
    B, T, C = k.shape
    L = max(1, min(L, T))
    n_full, rest = divmod(T, L)
    ys = []
    if n_full:
        head = n_full * L
        y, st = _chunked_core(
            w, u, k[:, :head].reshape(B, n_full, L, C), v[:, :head].reshape(B, n_full, L, C), st
        )
        ys.append(y.reshape(B, head, C))
    if rest:
        y, st = _chunked_core(w, u, k[:, None, T - rest :], v[:, None, T - rest :], st)
        ys.append(y.reshape(B, rest, C))
    y = jnp.concatenate(ys, axis=1) if ys else jnp.zeros((B, 0, C), k.dtype)
    return y, st


def wkv4_chunked(
    w: Array,
    u: Array,
    k: Array,
    v: Array,
    state: State4 | None = None,
    state_map: Array | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checked: bool = False,
) -> tuple[Array, State4]:
    """Chunk-parallel WKV-4 with the (aa, bb, pp) log-sum-exp state and a hand-written backward
    (``jax.custom_vjp``); jit-able, any T.

    Per chunk of L = min(chunk_size, T) tokens (static): its summary (what it alone adds to the end
    state, relative to its largest exponent), a short ``lax.scan`` carrying (aa, bb, pp) from chunk to
    chunk (e^{L w} times the entering state plus the summary, in log-max form), then all outputs at once:
    row t mixes the entering state (exponent t w + pp_in), the earlier tokens of the chunk ((t-1-i) w +
    k_i) and itself (u + k_t), every exponent taken relative to the row's maximum, so it is safe for any
    w <= 0, any k and any initial state including pp = -1e38. A last partial chunk runs as one shorter
    chunk (no padding: every RWKV-4 step decays the state). Backward: VJPs of the chunk-parallel parts
    and a reverse scan over the chunks; gradients reach w, u, k, v and the initial state.

    Args/returns as :func:`wkv4_reference`, plus ``chunk_size`` (a static int >= 1).
    """
    _check_impl("wkv4", "chunked", chunk_size)
    (w, u, kk, vv), st = _inputs("wkv4", w, u, k, v, state, state_map, checked, step=False)
    y, st = _chunked(w, u, kk, vv, st, chunk_size)
    return y.astype(k.dtype), st


def wkv4(
    w: Array,
    u: Array,
    k: Array,
    v: Array,
    state: State4 | None = None,
    state_map: Array | None = None,
    *,
    impl: str = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checked: bool = False,
) -> tuple[Array, State4]:
    """Run the RWKV-4 WKV (the contract of :func:`rwkvkit.wkv.wkv4`; see this module's docstring).

    Args:
        w: (C,) log-decay, -exp(time_decay) (<= 0). u: (C,) time_first.
        k, v: (B, T, C).
        state: None (a fresh sequence), (aa, bb, pp) each (B, C) per row, (1, C) shared, or a bank
            (n_state, C) with state_map (B,) int32.
        impl: "chunked" (default) or "reference"; static. chunk_size: static chunk length (chunked).
        checked: under jit, also raise (host callback) for a state_map index outside the bank.
    Returns:
        y (B, T, C) in k's dtype, final (aa, bb, pp) each (B, C) float32 (float64 for float64 k).
    """
    _check_impl("wkv4", impl, chunk_size)
    if impl == "reference":
        return wkv4_reference(w, u, k, v, state, state_map, checked=checked)
    return wkv4_chunked(w, u, k, v, state, state_map, chunk_size=chunk_size, checked=checked)
