"""The chunk-parallel WKV-5.2/6 (pure PyTorch, any device, backward by autograd).

Exact for any w <= 0, from decays near 0 (w = -20 and below) to decays near 1 (w = -1e-6): every
exponent is a range sum of log-decays (see :func:`wkv6_chunked`). Same contract as
:func:`rwkvkit.wkv.v6.reference.wkv6_reference` plus ``chunk_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkvkit.wkv.common import compute_dtype, start_state

__all__ = ["DEFAULT_CHUNK_SIZE", "FAST_LIMIT", "SUB_CHUNK", "chunk_length", "chunk_plan", "wkv6_chunked"]

# Chunk length of the chunked form (state passed sequentially between chunks); benchmarks/bench_wkv.py.
DEFAULT_CHUNK_SIZE = 64

# The fast intra-chunk form (one masked matmul) runs when max(-w) * chunk_len <= FAST_LIMIT; every float32
# intermediate then stays below exp(FAST_LIMIT) ~ 1e26. Otherwise the exact sub-chunk form runs.
FAST_LIMIT = 60.0

# Largest sub-chunk inside a chunk; pairs within one sub-chunk use an exact (s, s, N) exponent tensor.
SUB_CHUNK = 16


def _sub_chunk_size(n: int) -> int:
    """The largest divisor of the chunk length n that is <= SUB_CHUNK."""
    return max(s for s in range(1, min(SUB_CHUNK, n) + 1) if n % s == 0)


def _excl_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Exclusive cumulative sum along `dim` (dim < 0): out_t = sum_{s<t} x_s."""
    c = torch.cumsum(x, dim=dim).narrow(dim, 0, x.shape[dim] - 1)
    return F.pad(c, (0, 0) * (-dim - 1) + (1, 0))


def _pair_segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., m, K) -> (..., m_i, m_j, K): sum_{j<t<i} x_t for j < i, -inf for j >= i (exp gives 0)."""
    m = x.shape[-2]
    later = torch.ones(m, m, dtype=torch.bool, device=x.device).tril(-1).unsqueeze(-1)  # [t, j]: t > j
    z = x.unsqueeze(-2).expand(*x.shape[:-1], m, x.shape[-1]).masked_fill(~later, 0.0)  # z[t, j]
    return _excl_cumsum(z, dim=-3).masked_fill(~later, -math.inf)  # [i, j]: sum_{t<i, t>j} x_t


def _intra_pairwise(
    r_: torch.Tensor, w_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, s: int
) -> torch.Tensor:
    """Exact intra-chunk part, safe for any w <= 0: (B, H, NC, n, N) inputs -> (B, H, NC, n, V)."""
    # Intra-chunk part, same sub-chunk: exp(sum_{j<t<i} w_t) for j < i, an exact (s, s, K) tensor.
    ns = r_.shape[-2] // s
    rs, ws, ks, vs = (x.unflatten(-2, (ns, s)) for x in (r_, w_, k_, v_))  # (B, H, NC, ns, s, N)
    E = torch.exp(_pair_segsum(ws))  # (B, H, NC, ns, s_i, s_j, K), 0 where j >= i
    A_diag = torch.einsum("...id,...jd,...ijd->...ij", rs, ks, E)  # (B, H, NC, ns, s, s)
    y_intra = A_diag @ vs  # (B, H, NC, ns, s, V)

    # Intra-chunk part, key j in an earlier sub-chunk b < a (the query's): the range j < t < i splits at
    # the start of sub-chunk a into r_i exp(sum_{start_a<=t<i} w_t) and k_j exp(sum_{j<t<start_a} w_t).
    if ns > 1:
        q_off = rs * torch.exp(_excl_cumsum(ws, dim=-2))  # (B, H, NC, ns, s, K)
        after_in_sub = _excl_cumsum(ws.flip(-2), dim=-2).flip(-2)  # (B, H, NC, ns_b, s, K): t > j in b
        # sum of the sub-chunk totals strictly between b and a: (B, H, NC, ns_a, ns_b, K), -inf for b >= a
        between = _pair_segsum(ws.sum(-2))
        ex = between.unsqueeze(-2) + after_in_sub.unsqueeze(-4)  # (B, H, NC, ns_a, ns_b, s, K)
        k_off = ks.unsqueeze(-4) * torch.exp(ex)  # 0 where b >= a
        A_off = q_off @ k_off.flatten(-3, -2).transpose(-1, -2)  # (B, H, NC, ns, s, n)
        y_intra = y_intra + A_off @ v_.unsqueeze(-3)  # (B, H, NC, ns, s, V)

    return y_intra.flatten(-3, -2)  # (B, H, NC, n, V)


def _intra_fast(r_: torch.Tensor, w_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
    """Intra-chunk part by one masked matmul, for max(-w) * n <= FAST_LIMIT: -> (B, H, NC, n, V)."""
    n = r_.shape[-2]
    G = torch.cumsum(w_, dim=-2)  # (B, H, NC, n, K) inclusive cumulative log-decay
    Gx = F.pad(G[..., :-1, :], (0, 0, 1, 0))  # exclusive: Gx_t = G_{t-1} exactly
    mid = max(n // 2 - 1, 0)
    m = G[..., mid : mid + 1, :]  # (B, H, NC, 1, K) reference point; |exponents| <= max(-w) * n / 2
    rq = r_ * torch.exp(Gx - m)  # (B, H, NC, n, K)
    kq = k_ * torch.exp(m - G)  # (B, H, NC, n, K)
    strict = torch.ones(n, n, dtype=torch.bool, device=r_.device).tril(-1)  # [i, j]: j < i
    A = (rq @ kq.transpose(-1, -2)).masked_fill(~strict, 0.0)  # (B, H, NC, n, n), upper part <= e^LIMIT
    return A @ v_  # (B, H, NC, n, V)


def chunk_plan(T: int, chunk_size: int, w: Tensor, pairwise: bool | None = None) -> tuple[int, bool]:
    """(chunk length, whether the exact pairwise intra-chunk form runs) for a sequence of T steps with
    log-decays ``w``: chunk_size, or T rounded up to a multiple of SUB_CHUNK when that is shorter, and
    shorter still (down to one sub-chunk) when strong decays would overflow the one-matmul form."""
    n = min(chunk_size, math.ceil(T / SUB_CHUNK) * SUB_CHUNK)  # chunk length
    if pairwise is None:
        # The one-matmul form is exact while max(-w) * n <= FAST_LIMIT: with strong decays, shorter
        # chunks (down to one sub-chunk) keep it (~10x faster than the pairwise form at T = 2048).
        strongest = -float(w.detach().amin()) if w.numel() else 0.0
        if not math.isfinite(strongest):  # -inf / NaN decays: only the pairwise form is safe
            strongest = math.inf
        fits = int(FAST_LIMIT / strongest) // SUB_CHUNK * SUB_CHUNK if strongest > 0 else n
        pairwise = fits < min(n, SUB_CHUNK)
        if not pairwise:
            n = min(n, fits)
    return n, pairwise


def chunk_length(T: int, chunk_size: int, tensors: Sequence[Tensor]) -> int:
    """The chunk length :func:`wkv6_chunked` uses for r, w, k, v, u = ``tensors`` (varlen layouts)."""
    return chunk_plan(T, chunk_size, tensors[1])[0]


def wkv6_chunked(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    pairwise: bool | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel evaluation of the recurrence; backward by autograd.

    The sequence is cut into chunks of n steps (n = chunk_size, or T rounded up to a multiple of
    SUB_CHUNK when that is shorter; the tail is zero-padded: w = 0 and r = k = v = 0 leave the state
    unchanged). Write W(a..b) = sum_{a<=t<=b} w_t per key channel (the log of the decay over those
    steps; an empty range gives 0). With S0 the state entering the chunk ([value, key]), rows = steps:

        y_i    = S0 (r_i * exp(W(0..i-1)))                           inter-chunk part
               + sum_{j<i} A_ij v_j,  A_ij = sum_d r_id k_jd exp(W(j+1..i-1)_d)     intra-chunk part
               + (r_i . (u * k_i)) v_i                               the bonus on the diagonal
        S_next = S0 diag(exp(W(0..n-1))) + sum_j v_j (k_j * exp(W(j+1..n-1)))^T

    (the doc's Gx_i - G_j and G_last - G_j, with G the cumulative log-decay). Every exponent is a range
    sum of w, formed by masked / exclusive / reverse cumulative sums and never as a difference of two
    cumulative sums: it is <= 0, so nothing overflows for any w <= 0 (terms below float range underflow
    to 0, as do their gradients), and the gradient of w_t only collects terms whose range contains t
    (a difference would leave +c - c rounding noise in dw, larger than the true dw for w ~ -20).
    A is built in sub-chunks of s steps (s = the largest divisor of n <= SUB_CHUNK):
      - i, j in the same sub-chunk: the exact (s, s, N) tensor exp(W(j+1..i-1)), 0 for j >= i;
      - j in sub-chunk b before i's sub-chunk a (starting at step p): the range splits at p into
        r_i exp(W(p..i-1)) and k_j exp(W(j+1..p-1)) = k_j exp(W(j+1..end of b) + totals of the
        sub-chunks strictly between b and a), so A's off-diagonal blocks are matmuls.
    Everything but the state hand-off is batched over all chunks; the hand-off is one elementwise
    update of (B, H, N, N) per chunk.

    Args: r, w, k, v (B, T, H, N); u (H, N); state (B, H, N, N) as [value, key] or None; chunk_size >= 1;
    resets (B, NC) bool or None: chunk c of a row starts again from ``state`` instead of the state the
    chunk before left (the variable-length form, :mod:`rwkvkit.wkv.varlen`; T must then be NC chunks).
    Returns: y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in the compute dtype.
    """
    B, T, H, N = r.shape
    out_dtype = r.dtype
    dt = compute_dtype(r.dtype)
    S = start_state(state, r, dt)  # (B, H, V, K)
    if T == 0:
        return r.new_zeros(B, 0, H, N), S

    n, pairwise = chunk_plan(T, chunk_size, w, pairwise)
    s = _sub_chunk_size(n)  # sub-chunk length
    NC = math.ceil(T / n)  # number of chunks
    pad = NC * n - T

    def chunks(x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, N) -> (B, H, NC, n, N) in the compute dtype, zero-padded in time."""
        x = x.to(dt).transpose(1, 2)  # (B, H, T, N)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.unflatten(2, (NC, n))

    r_, w_, k_, v_ = (chunks(x) for x in (r, w, k, v))  # (B, H, NC, n, N)
    u_ = u.to(dt)[None, :, None, None, :]  # (1, H, 1, 1, N)

    # Every exponent below is a sum of log-decays over a range of steps, formed by (masked) cumulative
    # sums, never as a difference of two cumulative sums: it is <= 0, and the gradient of w_t only
    # collects terms whose range contains t (differences would leave +c - c rounding noise in dw).
    Gx = _excl_cumsum(w_, dim=-2)  # (B, H, NC, n, K): sum_{s<t} w_s in the chunk
    G_after = _excl_cumsum(w_.flip(-2), dim=-2).flip(-2)  # (B, H, NC, n, K): sum_{s>t} w_s in the chunk
    G_total = w_.sum(-2, keepdim=True)  # (B, H, NC, 1, K)

    # State hand-off between chunks: S_next = S0 * exp(G_total) (per key column) + V^T k_out.
    k_out = k_ * torch.exp(G_after)  # (B, H, NC, n, K)
    incr = v_.transpose(-1, -2) @ k_out  # (B, H, NC, V, K)
    chunk_decay = torch.exp(G_total)  # (B, H, NC, 1, K)
    if resets is not None and resets.shape != (B, NC):
        raise ValueError(
            f"wkv6: resets must be (B, NC) = {(B, NC)} for chunks of {n}, got {tuple(resets.shape)}"
        )
    S_init = S
    starts = []
    for c, (d_c, inc_c) in enumerate(
        zip(chunk_decay.unbind(2), incr.unbind(2), strict=True)
    ):  # (B, H, 1, K), (B, H, V, K)
        if resets is not None:
            S = torch.where(resets[:, c, None, None, None], S_init, S)
        starts.append(S)
        S = S * d_c + inc_c
    S0 = torch.stack(starts, dim=2)  # (B, H, NC, V, K): the state entering each chunk

    # Inter-chunk part: y_t += S0 (r_t * exp(Gx_t)).
    y = (r_ * torch.exp(Gx)) @ S0.transpose(-1, -2)  # (B, H, NC, n, V)
    # Bonus on the diagonal.
    y = y + (r_ * u_ * k_).sum(-1, keepdim=True) * v_

    if not pairwise:
        y = y + _intra_fast(r_, w_, k_, v_)
    else:
        y = y + _intra_pairwise(r_, w_, k_, v_, s)
    y = y.flatten(2, 3)[:, :, :T].transpose(1, 2)  # (B, T, H, V)
    return y.to(out_dtype), S
