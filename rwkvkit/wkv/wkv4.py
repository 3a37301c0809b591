"""The WKV-4 operator: RWKV-4's per-channel (no heads) weighted key-value average.

This module owns RWKV-4's WKV: the public contract, argument validation, the step-by-step reference
(the ground truth) and a chunk-parallel form for long sequences. Pure PyTorch, device agnostic, and both
implementations are differentiable through autograd.

    y, (aa, bb, pp) = wkv4(w, u, k, v, state=None, *, impl=None, chunk_size=None)

Arguments: k, v (B, T, C); w, u (C,). Per batch element and channel, for t = 0 .. T-1:

    wkv_t = (A_t + e^{u + k_t} v_t) / (B_t + e^{u + k_t})        (the output reads the OLD sums)
    A_{t+1} = e^{w} A_t + e^{k_t} v_t,   B_{t+1} = e^{w} B_t + e^{k_t}

so with no initial state  A_t = sum_{i<t} e^{(t-1-i) w + k_i} v_i  (B_t likewise without v).

``w`` is the per-channel LOG-DECAY, w = -exp(time_decay) <= 0, NOT the raw checkpoint ``time_decay``
(use :func:`wkv4_log_decay` to convert). ``u`` is ``time_first`` as stored (the log of the bonus for the
current token).

The state is (aa, bb, pp), each (B, C), holding A = aa * e^{pp} and B = bb * e^{pp}: pp is a running
maximum of the exponents, so aa and bb stay O(1). A fresh sequence starts at aa = bb = 0, pp = -1e38
(:func:`wkv4_zero_state`; ``state=None`` means the same). ``state`` may be a tuple/list of the three
tensors or one tensor (3, B, C). Two states are equal when their (aa, bb) agree after rescaling to a
common pp, not necessarily element by element.

The state is computed in float32 (float64 when k is float64, to verify implementations). Returns y
(B, T, C) in k's dtype and the final state as a tuple of three (B, C) tensors in the compute dtype.

``impl``: None (auto: "chunked" when gradients are needed and T > AUTO_STEP_MAX_T, else "reference",
the faster form without gradients), "reference" (the
numerically stable step recurrence of the official inference code) or "chunked" (chunk-parallel; every
exponent is formed as a difference against a per-row maximum, so it is safe for any decay in (0, 1],
any k, and any initial state including pp = -1e38). ``chunk_size`` (chunked only) defaults to
DEFAULT_CHUNK_SIZE; the chunked form holds B * T * chunk_size * C intermediates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rwkvkit.wkv.dispatch import (
    AUTO_STEP_MAX_T,
    check_chunk_size,
    check_tensors,
    compute_dtype,
    full_precision,
    resolve_impl,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "PP_INIT",
    "WKV4State",
    "wkv4",
    "wkv4_chunked",
    "wkv4_log_decay",
    "wkv4_reference",
    "wkv4_step",
    "wkv4_zero_state",
]

WKV4State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (aa, bb, pp), each (B, C)

DEFAULT_CHUNK_SIZE = 8  # fastest fwd+bwd on CPU (B=1, C=768): 8 > 16 > 32; the intermediates grow with it

# pp of a fresh sequence, as in the official inference code.
PP_INIT = -1e38


def wkv4_log_decay(time_decay: torch.Tensor) -> torch.Tensor:
    """The `w` argument of :func:`wkv4` from a checkpoint's raw ``att.time_decay``: -exp(time_decay)."""
    return -torch.exp(time_decay.to(compute_dtype(time_decay.dtype)))


def wkv4_zero_state(
    B: int, C: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> WKV4State:
    """The state of a fresh sequence: aa = bb = 0, pp = -1e38, each (B, C)."""
    aa = torch.zeros(B, C, dtype=dtype, device=device)
    bb = torch.zeros(B, C, dtype=dtype, device=device)
    pp = torch.full((B, C), PP_INIT, dtype=dtype, device=device)
    return aa, bb, pp


def _as_state(state: Sequence[torch.Tensor] | torch.Tensor | None, B: int, C: int, like: torch.Tensor):
    """(aa, bb, pp) in the compute dtype of `like` (the fresh state for None)."""
    dt = compute_dtype(like.dtype)
    if state is None:
        return wkv4_zero_state(B, C, like.device, dt)
    aa, bb, pp = state.unbind(0) if isinstance(state, torch.Tensor) else state
    return aa.to(dt), bb.to(dt), pp.to(dt)


# ----------------------------------------------------------------------------------------------------
# Reference: the step recurrence of the official inference code, one token at a time.
# ----------------------------------------------------------------------------------------------------


def wkv4_reference(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, WKV4State]:
    """Run the stable recurrence step by step. w, u (C,); k, v (B, T, C); state (aa, bb, pp) or None.

    Returns y (B, T, C) in k's dtype and the final (aa, bb, pp), each (B, C), in the compute dtype.
    """
    B, T, C = k.shape
    out_dtype = k.dtype
    aa, bb, pp = _as_state(state, B, C, k)
    dt = compute_dtype(k.dtype)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))

    ys = []
    for k_t, v_t in zip(k.unbind(1), v.unbind(1), strict=True):  # each (B, C)
        ww = u + k_t
        p = torch.maximum(pp, ww)
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        ys.append((e1 * aa + e2 * v_t) / (e1 * bb + e2))
        ww = w + pp
        p = torch.maximum(ww, k_t)
        e1 = torch.exp(ww - p)
        e2 = torch.exp(k_t - p)
        aa = e1 * aa + e2 * v_t
        bb = e1 * bb + e2
        pp = p

    y = torch.stack(ys, dim=1) if T > 0 else k.new_zeros(B, 0, C)  # (B, T, C)
    return y.to(out_dtype), (aa, bb, pp)


# ----------------------------------------------------------------------------------------------------
# Chunked: all tokens of a chunk at once, the chunks linked by a short scan over their summaries.
# ----------------------------------------------------------------------------------------------------


def _chunk_summaries(
    w: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each chunk alone adds to the state at its end, in the (aa, bb, pp) form.

    w (C,); k, v (B, n, L, C). Token i of a chunk of length L enters the end state with the exponent
    (L-1-i) w + k_i. Returns (a, b, p), each (B, n, C), with p the largest such exponent.
    """
    L = k.shape[2]
    steps_to_end = torch.arange(L - 1, -1, -1, dtype=k.dtype, device=k.device)  # (L,)
    logits = steps_to_end[:, None] * w + k  # (B, n, L, C)
    p = logits.amax(dim=2)  # (B, n, C)
    e = torch.exp(logits - p.unsqueeze(2))  # (B, n, L, C), every exponent <= 0
    return (e * v).sum(2), e.sum(2), p


def _scan_chunks(
    w: torch.Tensor,
    summaries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    state: WKV4State,
    L: int,
) -> tuple[WKV4State, WKV4State]:
    """Carry the state across chunks of length L: the state entering every chunk, and the final one.

    One step per chunk: S_end = e^{L w} S_in + (chunk summary), both in log-max form.
    Returns ((aa_in, bb_in, pp_in) each (B, n, C), (aa, bb, pp) each (B, C)).
    """
    a_c, b_c, p_c = summaries  # (B, n, C)
    aa, bb, pp = state  # (B, C)
    lw = w * L  # (C,) log-decay over a whole chunk
    entering: list[WKV4State] = []
    for j in range(p_c.shape[1]):
        entering.append((aa, bb, pp))
        q = lw + pp
        p = torch.maximum(q, p_c[:, j])
        e1 = torch.exp(q - p)
        e2 = torch.exp(p_c[:, j] - p)
        aa = e1 * aa + e2 * a_c[:, j]
        bb = e1 * bb + e2 * b_c[:, j]
        pp = p
    aa_in, bb_in, pp_in = (torch.stack(xs, dim=1) for xs in zip(*entering, strict=True))
    return (aa_in, bb_in, pp_in), (aa, bb, pp)


def _chunk_outputs(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    entering: WKV4State,
) -> torch.Tensor:
    """The outputs of every chunk given the state entering it. w, u (C,); k, v (B, n, L, C).

    Row t of a chunk mixes token i < t with exponent (t-1-i) w + k_i, itself with u + k_t and the
    entering state with t w + pp_in. All exponents are taken relative to the row's maximum (detached: it
    cancels between numerator and denominator), so every exp() argument is <= 0. The (L, L) mixing runs
    as one batched matmul per channel, with channels ahead of time in the layout.
    Returns y (B, n, L, C).
    """
    aa_in, bb_in, pp_in = entering  # (B, n, C)
    L = k.shape[2]
    t = torch.arange(L, device=k.device)
    gap = (t[:, None] - 1 - t[None, :]).to(k.dtype)  # (L, L): t-1-i
    bias = torch.where(
        t[None, :] == t[:, None],
        u[:, None, None],  # the current token's bonus on the diagonal
        torch.where(t[None, :] < t[:, None], gap * w[:, None, None], float("-inf")),
    )  # (C, L, L) rows t, columns i; -inf above the diagonal
    k_t = k.transpose(2, 3)  # (B, n, C, L)
    logits = bias + k_t.unsqueeze(3)  # (B, n, C, L, L)
    from_state = t.to(k.dtype) * w[:, None] + pp_in.unsqueeze(3)  # (B, n, C, L)
    m = torch.maximum(logits.amax(dim=4), from_state).detach()  # (B, n, C, L)
    e = torch.exp(logits - m.unsqueeze(4))  # (B, n, C, L, L), 0 above the diagonal
    e_s = torch.exp(from_state - m)  # (B, n, C, L)
    v1 = torch.stack((v.transpose(2, 3), torch.ones_like(k_t)), dim=4)  # (B, n, C, L, 2): v and 1
    num_den = e @ v1  # (B, n, C, L, 2)
    num = num_den[..., 0] + e_s * aa_in.unsqueeze(3)  # (B, n, C, L)
    den = num_den[..., 1] + e_s * bb_in.unsqueeze(3)
    return (num / den).transpose(2, 3)  # (B, n, L, C)


def _run_chunks(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: WKV4State
) -> tuple[torch.Tensor, WKV4State]:
    """k, v (B, n, L, C) of n whole chunks. Returns y (B, n, L, C) and the state after them."""
    summaries = _chunk_summaries(w, k, v)
    entering, final = _scan_chunks(w, summaries, state, k.shape[2])
    return _chunk_outputs(w, u, k, v, entering), final


def wkv4_chunked(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, WKV4State]:
    """Chunk-parallel WKV-4. w, u (C,); k, v (B, T, C); state (aa, bb, pp) or None.

    The whole chunks run together; a last partial chunk (T not a multiple of chunk_size) runs as one
    shorter chunk from the state they leave. Returns y (B, T, C) in k's dtype and the final (aa, bb, pp).
    """
    B, T, C = k.shape
    out_dtype = k.dtype
    state = _as_state(state, B, C, k)
    dt = compute_dtype(k.dtype)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))

    L = max(1, min(chunk_size, T))
    n_full, rest = divmod(T, L)
    ys = []
    if n_full:
        head = n_full * L
        k_c = k[:, :head].reshape(B, n_full, L, C)  # (B, n, L, C)
        v_c = v[:, :head].reshape(B, n_full, L, C)
        y, state = _run_chunks(w, u, k_c, v_c, state)
        ys.append(y.reshape(B, head, C))
    if rest:
        y, state = _run_chunks(w, u, k[:, T - rest :].unsqueeze(1), v[:, T - rest :].unsqueeze(1), state)
        ys.append(y.squeeze(1))
    y = torch.cat(ys, dim=1) if ys else k.new_zeros(B, 0, C)  # (B, T, C)
    return y.to(out_dtype), state


# ----------------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------------


def _validate(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Sequence[torch.Tensor] | torch.Tensor | None,
) -> None:
    check_tensors("wkv4", {"k": k, "v": v, "w": w, "u": u})
    if k.dim() != 3:
        raise ValueError(f"wkv4: k must have shape (B, T, C), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"wkv4: v has shape {tuple(v.shape)}, expected k's shape {tuple(k.shape)}")
    B, _, C = k.shape
    for name, x in (("w", w), ("u", u)):
        if x.shape != (C,):
            raise ValueError(f"wkv4: {name} has shape {tuple(x.shape)}, expected (C,) = ({C},)")
    if state is None:
        return
    if isinstance(state, torch.Tensor):
        if state.shape != (3, B, C):
            raise ValueError(f"wkv4: state tensor has shape {tuple(state.shape)}, expected (3, B, C)")
        parts: Sequence[object] = state.unbind(0)
    elif isinstance(state, (tuple, list)) and len(state) == 3:
        parts = state
    else:
        raise ValueError("wkv4: state must be (aa, bb, pp), a tensor (3, B, C), or None")
    check_tensors(
        "wkv4", {"k": k, **{f"state {n}": x for n, x in zip(("aa", "bb", "pp"), parts, strict=True)}}
    )
    for name, x in zip(("aa", "bb", "pp"), parts, strict=True):
        if x.shape != (B, C):
            raise ValueError(f"wkv4: state {name} has shape {tuple(x.shape)}, expected (B, C) = {(B, C)}")


def wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, WKV4State]:
    """Run the RWKV-4 WKV (see the module docstring for the exact contract).

    Args:
        w: (C,) log-decay, -exp(time_decay) (<= 0); NOT the raw checkpoint time_decay.
        u: (C,) time_first.
        k, v: (B, T, C).
        state: (aa, bb, pp) each (B, C), a tensor (3, B, C), or None for a fresh sequence.
        impl: None (auto by T), "reference" or "chunked".
        chunk_size: chunk length for the chunked form (default DEFAULT_CHUNK_SIZE).
    Returns:
        y (B, T, C) in k's dtype, final (aa, bb, pp) each (B, C) float32 (float64 for float64 k).
    """
    _validate(w, u, k, v, state)
    # Without gradients the step form is the faster one at every T (benchmarks/RESULTS.md); with them the
    # chunked form is (its backward does not replay T small steps).
    inputs = [w, u, k, v, *(() if state is None else state)]
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    impl = resolve_impl("wkv4", impl, k.shape[1], AUTO_STEP_MAX_T if needs_grad else math.inf)
    chunk_size = check_chunk_size("wkv4", chunk_size, DEFAULT_CHUNK_SIZE)
    with full_precision(k.device):
        if impl == "reference":
            return wkv4_reference(w, u, k, v, state)
        return wkv4_chunked(w, u, k, v, state, chunk_size=chunk_size)


def wkv4_step(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for B sequences (the decode fast path): w, u (C,); k, v (B, C) fp32; state (B, 3, C)
    stacked (aa, bb, pp). Returns y (B, C) fp32 and the new state (B, 3, C), written into ``out`` when
    given (a slice of the whole model's next state: no copy afterwards).

    The same stable recurrence as :func:`wkv4_reference` for T = 1, without the argument checks.
    """
    aa, bb, pp = state.unbind(1)
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = w + pp
    p = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return y, torch.stack((e1 * aa + e2 * v, e1 * bb + e2, p), dim=1, out=out)
