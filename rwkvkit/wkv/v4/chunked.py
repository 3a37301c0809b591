"""The chunk-parallel WKV-4: all tokens of a chunk at once, the chunks linked by a short scan.

Every exponent is formed as a difference against a per-row maximum, so it is safe for any decay in
(0, 1], any k, and any initial state including pp = -1e38; backward by autograd. Same contract as
:func:`rwkvkit.wkv.v4.reference.wkv4_reference` plus ``chunk_size``; the form holds
B * T * chunk_size * C intermediates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rwkvkit.wkv.v4.state import WKV4State, in_compute_dtype

__all__ = ["DEFAULT_CHUNK_SIZE", "chunk_length", "wkv4_chunked"]

DEFAULT_CHUNK_SIZE = 8  # fastest fwd+bwd on CPU (B=1, C=768): 8 > 16 > 32; the intermediates grow with it


def chunk_length(T: int, chunk_size: int, tensors: Sequence[Tensor] = ()) -> int:
    """The chunk length :func:`wkv4_chunked` uses for a sequence of T steps."""
    return max(1, min(chunk_size, T))


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
    w: Tensor, summaries: tuple[Tensor, Tensor, Tensor], state: WKV4State, L: int, resets: Tensor | None
) -> tuple[WKV4State, WKV4State]:
    """Carry the state across chunks of length L: the state entering every chunk, and the final one.

    One step per chunk: S_end = e^{L w} S_in + (chunk summary), both in log-max form; a chunk that
    ``resets`` (B, n) marks enters with ``state`` instead.
    Returns ((aa_in, bb_in, pp_in) each (B, n, C), (aa, bb, pp) each (B, C)).
    """
    a_c, b_c, p_c = summaries  # (B, n, C)
    aa, bb, pp = state  # (B, C)
    lw = w * L  # (C,) log-decay over a whole chunk
    entering: list[WKV4State] = []
    for j in range(p_c.shape[1]):
        if resets is not None:
            again = resets[:, j, None]  # (B, 1)
            aa, bb, pp = (torch.where(again, s0, s) for s0, s in zip(state, (aa, bb, pp), strict=True))
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


def _chunk_outputs(w: Tensor, u: Tensor, k: Tensor, v: Tensor, entering: WKV4State) -> Tensor:
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
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKV4State, resets: Tensor | None = None
) -> tuple[torch.Tensor, WKV4State]:
    """k, v (B, n, L, C) of n whole chunks. Returns y (B, n, L, C) and the state after them."""
    summaries = _chunk_summaries(w, k, v)
    entering, final = _scan_chunks(w, summaries, state, k.shape[2], resets)
    return _chunk_outputs(w, u, k, v, entering), final


def wkv4_chunked(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    state: Sequence[Tensor] | Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    resets: Tensor | None = None,
) -> tuple[Tensor, WKV4State]:
    """Chunk-parallel WKV-4. w, u (C,); k, v (B, T, C); state (aa, bb, pp) or None.

    The whole chunks run together; a last partial chunk (T not a multiple of chunk_size) runs as one
    shorter chunk from the state they leave. Returns y (B, T, C) in k's dtype and the final (aa, bb, pp).
    ``resets`` (B, T / L) bool or None: chunk c of a row starts again from ``state`` instead of the state
    the chunk before left (the variable-length form, :mod:`rwkvkit.wkv.varlen`; T must be whole chunks).
    """
    B, T, C = k.shape
    out_dtype = k.dtype
    (w, u, k, v), state = in_compute_dtype(w, u, k, v, state)

    L = chunk_length(T, chunk_size)
    n_full, rest = divmod(T, L)
    if resets is not None and (rest or resets.shape != (B, n_full)):
        raise ValueError(
            f"wkv4: resets must be (B, T / {L}) for whole chunks of {L}, got {tuple(resets.shape)}"
        )
    ys = []
    if n_full:
        head = n_full * L
        k_c = k[:, :head].reshape(B, n_full, L, C)  # (B, n, L, C)
        v_c = v[:, :head].reshape(B, n_full, L, C)
        y, state = _run_chunks(w, u, k_c, v_c, state, resets)
        ys.append(y.reshape(B, head, C))
    if rest:
        y, state = _run_chunks(w, u, k[:, T - rest :].unsqueeze(1), v[:, T - rest :].unsqueeze(1), state)
        ys.append(y.squeeze(1))
    y = torch.cat(ys, dim=1) if ys else k.new_zeros(B, 0, C)  # (B, T, C)
    return y.to(out_dtype), state
