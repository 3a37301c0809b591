"""Chunk-parallel RWKV-7 WKV in pure PyTorch (any device, trains through autograd).

This module owns the chunked evaluation of the v7 recurrence (state S as [value, key])

    S_t = S_{t-1} (diag(exp(w_t)) + a_t b_t^T) + v_t k_t^T,    y_t = S_t r_t.

The sequence is cut into chunks of n steps. Inside a chunk, with per-key log-decays w_t (w <= 0), the
inclusive cumulative sum g_t = sum_{s<=t} w_s, the exclusive one gx_t = g_t - w_t, and S0 the state
entering the chunk, the substitution P_t = S_t diag(exp(-g_t)) turns the decay into a plain delta rule
("similarity transform"). With a reference point m per chunk and key channel (g at the chunk middle)

    a~ = a exp(gx - m),  b~ = b exp(m - g),  k~ = k exp(m - g),  r~ = r exp(g - m)
    L  = strictly-lower(a~ b~^T)                                         (n x n)
    W  = (I - L)^{-1} (a exp(gx))                                        (n x K)
    U0 = (I - L)^{-1} strictly-lower(a~ k~^T) V                          (n x V)
    U  = W S0^T + U0                        (row i of U is S_{i-1} a_i, the "sa" term)
    S_next = S0 diag(exp(g_last)) + U^T (b exp(g_last - g)) + V^T (k exp(g_last - g))
    Y  = r exp(g) S0^T + lower-incl(r~ b~^T) U + lower-incl(r~ k~^T) V

Everything that does not depend on S0 (the four n x n blocks in one matmul, (I - L)^{-1} by one
unit-triangular solve, W, U0, V^T k_out) is computed for all chunks at once. The only sequential part
is, per chunk, U^T = S0 W^T + U0^T and the S_next line: two (N x N x n) matmuls. Y then comes from the
gathered per-chunk S0 and U in batched matmuls. (Folding W^T b_out into an N x N transition matrix
A_c, S_next = S0 A_c + B_c, costs an extra N^3 per chunk and measured ~25% slower on CPU.) Terms that
touch S0 or the outgoing state only use exponents <= 0. m cancels exactly in every product, so it is
detached from autograd.

Valid range of w: the factors exp(+-(g - m)) reach exp(max|w| * n / 2), and the (masked-away) upper
triangle of a~ b~^T reaches exp(max|w| * n). To keep every intermediate finite in float32 the
precondition is ``max(-w) * chunk_size <= W_CHUNK_LIMIT`` (80; exp(80) ~ 5.5e34 < 3.4e38). RWKV-7
passes w = -exp(-0.5) * sigmoid(z) in [-0.6066, 0], so chunk sizes up to 131 are safe (64 has a 2x
margin). The dispatcher :func:`rwkvkit.wkv.wkv7` checks this on CPU tensors; on accelerators it is a
documented precondition (no device sync in the hot path).

Any T works: the tail is zero-padded (w = 0, k = v = a = b = r = 0 leave the state unchanged), and a
sequence shorter than the chunk size uses one chunk of length T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkvkit.wkv.wkv7_reference import compute_dtype

# Measured on CPU (2 cores, B=1, H=12, N=64, forward+backward): see benchmarks/RESULTS.md.
DEFAULT_CHUNK_SIZE = 32

# max(-w) * chunk_size must not exceed this (see the module docstring).
W_CHUNK_LIMIT = 80.0


def _to_chunks(x: torch.Tensor, n: int, pad: int) -> torch.Tensor:
    """(B, T, H, N) -> contiguous (B*H, NC, n, N), zero-padding the time axis by `pad` steps."""
    B, T, H, N = x.shape
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    x = x.reshape(B, (T + pad) // n, n, H, N).permute(0, 3, 1, 2, 4)  # (B, H, NC, n, N)
    return x.reshape(B * H, (T + pad) // n, n, N)


def _gram_mask(n: int, device: torch.device) -> torch.Tensor:
    """(2n, 2n) bool: strictly-lower in the top n rows (a~ rows), lower-incl-diagonal in the bottom n (r~)."""
    strict = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)
    incl = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.cat([strict, strict], dim=1), torch.cat([incl, incl], dim=1)], dim=0)


def wkv7_chunked(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-parallel evaluation; same contract as :func:`wkv7_reference` plus `chunk_size`.

    Precondition (not checked here): max(-w) * chunk_size <= W_CHUNK_LIMIT.
    """
    B, T, H, N = r.shape
    out_dtype = r.dtype
    dt = compute_dtype(r.dtype)
    if state is None:
        S = torch.zeros(B * H, N, N, dtype=dt, device=r.device)  # (BH, V, K)
    else:
        S = state.to(dt).reshape(B * H, N, N)  # (BH, V, K)
    if T == 0:
        return r.new_zeros(B, 0, H, N), S.view(B, H, N, N)

    n = min(chunk_size, T)
    NC = -(-T // n)
    pad = NC * n - T
    r, w, k, v, a, b = (_to_chunks(x.to(dt), n, pad) for x in (r, w, k, v, a, b))  # (BH, NC, n, N)

    # Log-decays relative to the chunk's reference point m (g at the middle; m cancels exactly).
    g = torch.cumsum(w, dim=-2)  # (BH, NC, n, K) inclusive; the exclusive gx = g - w
    mid = max(n // 2 - 1, 0)
    m = g[..., mid : mid + 1, :].detach()  # (BH, NC, 1, K)
    h = g - m  # (BH, NC, n, K), |h| <= max|w| * n / 2
    e_h = torch.exp(h)
    e_neg_h = torch.exp(-h)
    a_t = a * torch.exp(h - w)  # a~ = a exp(gx - m)
    r_t = r * e_h  # r~ = r exp(g - m)
    b_t = b * e_neg_h  # b~ = b exp(m - g)
    k_t = k * e_neg_h  # k~ = k exp(m - g)
    e_m = torch.exp(m)  # (BH, NC, 1, K), <= 1
    g_last = g[..., -1:, :]  # (BH, NC, 1, K)
    e_last_m = torch.exp(g_last - m)  # <= 1
    decay_chunk = torch.exp(g_last)  # (BH, NC, 1, K): total decay of the chunk per key

    # One (2n x 2n) matmul gives the four intra-chunk blocks [[a~b~^T, a~k~^T], [r~b~^T, r~k~^T]];
    # keep strictly-lower (top) / lower-incl-diagonal (bottom). `where` selects, so the large
    # masked-away upper entries never meet a multiplication by zero.
    G = torch.cat([a_t, r_t], dim=-2) @ torch.cat([b_t, k_t], dim=-2).transpose(-1, -2)  # (BH, NC, 2n, 2n)
    G = torch.where(_gram_mask(n, r.device), G, 0.0)
    G_top, R = G.split(n, dim=-2)  # R = [lower-incl(r~b~^T) | lower-incl(r~k~^T)]  (BH, NC, n, 2n)
    L, Mk = G_top.split(n, dim=-1)  # strictly-lower(a~b~^T), strictly-lower(a~k~^T)  (BH, NC, n, n)

    # (I - L)^{-1} by one unit-lower-triangular solve, then  U = W S0^T + U0  (row i = S_{i-1} a_i).
    eye = torch.eye(n, dtype=dt, device=r.device)
    L_inv = torch.linalg.solve_triangular(eye - L, eye.expand_as(L), upper=False, unitriangular=True)
    W = L_inv @ (a_t * e_m)  # (BH, NC, n, K): (I - L)^{-1} (a exp(gx))
    U0 = (L_inv @ Mk) @ v  # (BH, NC, n, V)
    b_out = b_t * e_last_m  # (BH, NC, n, K): b exp(g_last - g), <= |b|
    VK = v.transpose(-1, -2) @ (k_t * e_last_m)  # (BH, NC, V, K): V^T (k exp(g_last - g))

    # The only sequential part, two small matmuls per chunk:
    #   U^T = S0 W^T + U0^T,   S_next = S0 diag(exp(g_last)) + U^T b_out + V^T k_out.
    S0s, Us = [], []
    chunks = zip(W.unbind(1), U0.unbind(1), b_out.unbind(1), VK.unbind(1), decay_chunk.unbind(1), strict=True)
    for W_c, U0_c, b_out_c, VK_c, decay_c in chunks:
        S0s.append(S)
        Ut = torch.baddbmm(U0_c.transpose(-1, -2), S, W_c.transpose(-1, -2))  # (BH, V, n)
        S = torch.addcmul(torch.baddbmm(VK_c, Ut, b_out_c), S, decay_c)  # (BH, V, K)
        Us.append(Ut.transpose(-1, -2))
    S0 = torch.stack(S0s, dim=1)  # (BH, NC, V, K)
    U = torch.stack(Us, dim=1)  # (BH, NC, n, V)

    # All outputs in parallel: Y = r exp(g) S0^T + lower-incl(r~b~^T) U + lower-incl(r~k~^T) V.
    Y = (r_t * e_m) @ S0.transpose(-1, -2) + R @ torch.cat([U, v], dim=-2)  # (BH, NC, n, V)
    y = Y.view(B, H, NC * n, N).transpose(1, 2)[:, :T]  # (B, T, H, V)
    return y.to(out_dtype).contiguous(), S.view(B, H, N, N)
