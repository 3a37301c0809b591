"""Chunk-parallel RWKV-7 WKV in pure PyTorch (any device), with a hand-written backward.

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
is, per chunk, U = W S0^T + U0 and the S_next line: two (N x N x n) matmuls. Y then comes from the
gathered per-chunk S0 and U in batched matmuls. (Folding W^T b_out into an N x N transition matrix
A_c, S_next = S0 A_c + B_c, costs an extra N^3 per chunk and measured ~25% slower on CPU.) Terms that
touch S0 or the outgoing state only use exponents <= 0. m cancels exactly in every product, so the
backward treats it as a constant.

Backward (:class:`_ChunkedWKV7`, checked against autograd of the step-by-step reference and by
gradcheck in tests/test_wkv7.py). It reuses the forward's chunk matrices (saved, not recomputed) and
has one sequential part, the reverse-time recurrence for dS (the gradient of the state leaving a chunk):

    dU = lower-incl(r~ b~^T)^T dY + b_out dS^T,    dS_prev = dS diag(exp(g_last)) + dY^T r exp(g) + dU^T W

Then, batched over chunks, with dZ = (I - L)^{-T} dU: since W only feeds U = W S0^T + U0,
d(a exp(gx)) = dZ S0 and dL = dZ U^T, so the gradient of all four masked n x n blocks is one matmul,
[dZ; dY] [U; V]^T, and the gradients of [a~; r~] and [b~; k~] are two more. The log-decay gradient
collects dx~ * x~ per scaled input; g_last gets sum_V dS * S_next (every term of S_next carries
exp(g_last) exactly once), and dw is the reverse cumulative sum over the chunk.
The backward is once-differentiable (no double backward / create_graph through it).

Valid range of w: the factors exp(+-(g - m)) reach exp(max|w| * n / 2), and the (masked-away) upper
triangle of a~ b~^T reaches exp(max|w| * n). To keep every intermediate finite in float32 the
precondition is ``max(-w) * chunk_size <= W_CHUNK_LIMIT`` (80; exp(80) ~ 5.5e34 < 3.4e38). RWKV-7
passes w = -exp(-0.5) * sigmoid(z) in [-0.6066, 0], so chunk sizes up to 131 are safe (64 has a 2x
margin). The entry :func:`rwkvkit.wkv.wkv7` checks this on CPU tensors (:func:`check_w_range`); on
accelerators it is a documented precondition (no device sync in the hot path).

Any T works: the tail is zero-padded (w = 0, k = v = a = b = r = 0 leave the state unchanged), and a
sequence shorter than the chunk size uses one chunk of length T.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkvkit.wkv.common import compute_dtype, full_precision, start_state

__all__ = ["DEFAULT_CHUNK_SIZE", "W_CHUNK_LIMIT", "check_w_range", "chunk_length", "wkv7_chunked"]

# Measured on CPU (2 cores, B=1, H=12, N=64, forward+backward): see benchmarks/RESULTS.md.
DEFAULT_CHUNK_SIZE = 32

# max(-w) * chunk_size must not exceed this (see the module docstring).
W_CHUNK_LIMIT = 80.0


def _chunk_view(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, NC*n, H, N) -> the view (NC, B, H, n, N)."""
    return x.unflatten(1, (-1, n)).permute(1, 0, 3, 2, 4)


def _to_chunks(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, NC*n, H, N) -> chunk-major (NC, B*H, n, N) (a view when possible)."""
    x = _chunk_view(x, n)
    return x.reshape(x.shape[0], -1, n, x.shape[-1])


def _gram_mask(n: int, device: torch.device) -> torch.Tensor:
    """(2n, 2n) bool: strictly-lower in the top n rows (a~ rows), lower-incl-diagonal in the bottom n (r~)."""
    strict = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)
    incl = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.cat([strict, strict], dim=1), torch.cat([incl, incl], dim=1)], dim=0)


def _in_full_precision(backward):
    """Run a backward with autocast off (it may be called inside a torch.autocast region)."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        with full_precision(grads[0].device):
            return backward(ctx, *grads)

    return wrapped


class _ChunkedWKV7(torch.autograd.Function):
    """The chunked recurrence with a hand-written backward.

    Takes r, w, k, v, a, b as (B, NC*n, H, N) and works on chunk-major views (NC, B*H, n, N); Y and the
    input gradients are written straight into (B, NC*n, H, N) buffers (no layout copies afterwards).
    """

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, S_init, n, resets):  # type: ignore[override]
        B, _, H, _ = r.shape
        r, w, k, v, a, b = (_to_chunks(x, n) for x in (r, w, k, v, a, b))
        NC, BH, n, N = r.shape
        dt, dev = r.dtype, r.device
        v = v.contiguous()  # a view of the caller's layout; the matmuls want it contiguous
        g = torch.cumsum(w, dim=-2)  # (NC, BH, n, K) inclusive; the exclusive gx = g - w
        mid = max(n // 2 - 1, 0)
        m = g[..., mid : mid + 1, :]  # (NC, BH, 1, K) reference point, cancels exactly
        h = g - m
        # Stacked pairs so that one matmul / one elementwise pass serves both halves.
        e_ar = torch.empty(NC, BH, 2 * n, N, dtype=dt, device=dev)  # [exp(gx - m); exp(g - m)]
        torch.exp(h - w, out=e_ar[..., :n, :])
        torch.exp(h, out=e_ar[..., n:, :])
        e_nh = torch.reciprocal(e_ar[..., n:, :])  # exp(m - g)
        ar = torch.empty_like(e_ar)  # [a~; r~]
        torch.mul(a, e_ar[..., :n, :], out=ar[..., :n, :])
        torch.mul(r, e_ar[..., n:, :], out=ar[..., n:, :])
        bk = torch.empty_like(e_ar)  # [b~; k~]
        torch.mul(b, e_nh, out=bk[..., :n, :])
        torch.mul(k, e_nh, out=bk[..., n:, :])
        g_last = g[..., -1:, :]
        e_m = torch.exp(m)  # <= 1
        e_lm = torch.exp(g_last - m)  # <= 1
        decay = torch.exp(g_last)  # (NC, BH, 1, K): total decay of the chunk per key

        # The four intra-chunk blocks [[a~b~^T, a~k~^T], [r~b~^T, r~k~^T]] in one matmul, masked to
        # strictly-lower (top) / lower-incl-diagonal (bottom); masked_fill selects, so the large
        # masked-away upper entries never meet a multiplication by zero.
        G = (ar @ bk.mT).masked_fill_(~_gram_mask(n, dev), 0.0)  # (NC, BH, 2n, 2n)
        L, Mk = G[..., :n, :n], G[..., :n, n:]
        # (I - L)^{-1}; unitriangular reads only the strictly-lower part, so -G's diagonal is ignored.
        eye = torch.eye(n, dtype=dt, device=dev)
        L_inv = torch.linalg.solve_triangular(-L, eye.expand_as(L), upper=False, unitriangular=True)
        are = ar * e_m  # [a exp(gx); r exp(g)]
        W = L_inv @ are[..., :n, :]  # (I - L)^{-1} (a exp(gx))                    (NC, BH, n, K)
        bk_out = bk * e_lm  # [b exp(g_last - g); k exp(g_last - g)], <= |b|, |k|
        b_out = bk_out[..., :n, :]
        VK = v.mT @ bk_out[..., n:, :]  # V^T k_out                                  (NC, BH, V, K)

        # The only sequential part, per chunk: U = W S0^T + U0 (row i = S_{i-1} a_i) and
        # S_next = S0 diag(exp(g_last)) + U^T b_out + V^T k_out. S0[c] is the state entering chunk c.
        S0 = torch.empty(NC + 1, BH, N, N, dtype=dt, device=dev)
        S0[0] = S_init
        uv = torch.empty(NC, BH, 2 * n, N, dtype=dt, device=dev)  # [U; V] per chunk
        uv[:, :, n:] = v
        U0 = (L_inv @ Mk) @ v  # (I - L)^{-1} strictly-lower(a~ k~^T) V              (NC, BH, n, V)
        # (unbind once: per-step indexing costs more than the small ops. U0 becomes U in place and is
        # copied into uv once after the loop: baddbmm_ into the strided uv view is ~2x slower, and
        # per-step copies cost more than one batched copy.)
        # With resets (varlen), S0[c + 1] stays the state chunk c leaves and S_in[c] is the state chunk c
        # enters: S_init where the chunk starts a new sequence.
        S0_l = S0.unbind(0)
        S_in = S0[:NC] if resets is None else torch.empty(NC, BH, N, N, dtype=dt, device=dev)
        S_in_l = S_in.unbind(0)
        steps = zip(U0.unbind(0), W.unbind(0), VK.unbind(0), b_out.unbind(0), decay.unbind(0), strict=True)
        for c, (U_c, W_c, VK_c, b_out_c, decay_c) in enumerate(steps):
            if resets is not None:
                torch.where(resets[c], S_init, S0_l[c], out=S_in_l[c])
            U_c.baddbmm_(W_c, S_in_l[c].mT)  # U = W S0^T + U0                        (BH, n, V)
            torch.addcmul(VK_c.baddbmm_(U_c.mT, b_out_c), S_in_l[c], decay_c, out=S0_l[c + 1])
        uv[:, :, :n] = U0

        # All outputs in parallel: Y = r exp(g) S0^T + [lower-incl(r~b~^T) | lower-incl(r~k~^T)] [U; V].
        re = are[..., n:, :]  # r exp(g)
        Y = torch.empty(B, NC * n, H, N, dtype=dt, device=dev)
        torch.add(
            (G[..., n:, :] @ uv).unflatten(1, (B, H)),
            (re @ S_in.mT).unflatten(1, (B, H)),
            out=_chunk_view(Y, n),
        )
        ctx.save_for_backward(
            v, ar, bk, e_ar, e_m, e_lm, decay, G, L_inv, W, bk_out, uv, S0, S_in, re, resets
        )
        ctx.B = B
        return Y, S0[NC].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_in_full_precision
    def backward(ctx, dY, dS_final):  # type: ignore[override]
        v, ar, bk, e_ar, e_m, e_lm, decay, G, L_inv, W, bk_out, uv, S0, S_in, re, resets = ctx.saved_tensors
        NC, BH, n, N = v.shape
        dt, dev = v.dtype, v.device
        B = ctx.B
        H = BH // B

        def grad_out():  # an input-gradient buffer (B, NC*n, H, N) and its chunk-major view (NC, B, H, n, N)
            buf = torch.empty(B, NC * n, H, N, dtype=dt, device=dev)
            return buf, _chunk_view(buf, n)

        def bh(x):  # (NC, BH, ...) -> (NC, B, H, ...)
            return x.unflatten(1, (B, H))

        # One buffer for [dZ; dY; dU] per chunk, so that [dY; dU] and [dZ; dY] are both plain views.
        zyu = torch.empty(NC, BH, 3 * n, N, dtype=dt, device=dev)
        if dY is None:
            zyu[:, :, n : 2 * n] = 0.0
        else:
            bh(zyu[:, :, n : 2 * n]).copy_(_chunk_view(dY, n))
        dY = zyu[..., n : 2 * n, :]
        R_b = G[..., n:, :n]
        b_out = bk_out[..., :n, :]

        # Reverse-time recurrence for dS (the gradient w.r.t. the state leaving each chunk):
        #   dU = R_b^T dY + b_out dS^T,   dS_prev = dS diag(exp(g_last)) + dY^T r exp(g) + dU^T W.
        dS = torch.empty(NC + 1, BH, N, N, dtype=dt, device=dev)  # dS[c] = grad of S0[c]
        dS[NC] = 0.0 if dS_final is None else dS_final
        dS_y = dY.mT @ re  # (NC, BH, V, K)
        dU_y = R_b.mT @ dY  # the part of dU from Y                               (NC, BH, n, V)
        # g_last gets sum_V dS_out * S_out: S_out = S0 exp(g_last) + U^T b_out + V^T k_out, and these
        # three terms are exactly the ones that carry exp(g_last) (via the decay, b_out and k_out).
        dg_last = torch.empty(NC, BH, 1, N, dtype=dt, device=dev)
        dS_l, S0_l, dgl_l = dS.unbind(0), S0.unbind(0), dg_last.unbind(0)
        per_chunk = (dU_y, b_out, dS_y, W, decay)
        steps = list(enumerate(zip(*(x.unbind(0) for x in per_chunk), strict=True)))
        dS_reset = None if resets is None else torch.zeros(BH, N, N, dtype=dt, device=dev)
        for c, (dU_c, b_out_c, dS_y_c, W_c, decay_c) in reversed(steps):
            dS_c = dS_l[c + 1]
            dU_c.baddbmm_(b_out_c, dS_c.mT)  # dU_y becomes dU in place (copied to zyu after the loop)
            torch.sum(dS_c * S0_l[c + 1], dim=-2, keepdim=True, out=dgl_l[c])
            torch.addcmul(dS_y_c.baddbmm_(dU_c.mT, W_c), dS_c, decay_c, out=dS_l[c])
            if dS_reset is not None and c > 0:  # a chunk entered from S_init: its state gradient goes there
                dS_reset += dS_l[c] * resets[c]
                dS_l[c].masked_fill_(resets[c], 0.0)
        zyu[:, :, 2 * n :] = dU_y
        dS_out = dS[1:]  # grad of each chunk's outgoing state
        dU = zyu[..., 2 * n :, :]

        # W = Linv A (A = a exp(gx)), U0 = Linv Z (Z = Mk V), Linv = (I - L)^{-1}, U = W S0^T + U0.
        # W only feeds U, so dW = dU S0; with dZ = Linv^T dU this gives dA = Linv^T dW = dZ S0 and
        # dL = dA W^T + dZ U0^T = dZ U^T, dMk = dZ V^T: the top row of dG is dZ [U; V]^T.
        zyu[..., :n, :] = L_inv.mT @ dU  # dZ
        dzy = zyu[..., : 2 * n, :]  # [dZ; dY]
        dA_re = dzy @ S_in  # [dA; d(r exp(g))]                                     (NC, BH, 2n, K)
        dG = (dzy @ uv.mT).masked_fill_(~_gram_mask(n, dev), 0.0)  # [[dL, dMk], [dR_b, dR_k]]
        dbk_out = uv @ dS_out  # [d b_out; d k_out]                                   (NC, BH, 2n, K)
        # dv = Mk^T dZ + R_k^T dY + k_out dS_out^T, the first two as one matmul with [Mk; R_k].
        dv, dv_c = grad_out()
        torch.add(bh(G[..., n:].mT @ dzy), bh(bk_out[..., n:, :] @ dS_out.mT), out=dv_c)

        # Gradients of the stacked scaled inputs [a~; r~] and [b~; k~].
        d_ar = (dG @ bk).addcmul_(dA_re, e_m)
        d_bk = dG.mT @ ar
        d_bk.addcmul_(dbk_out, e_lm)
        # Back to the raw inputs and to the log-decays: x~ = x exp(phi) gives dx = dx~ exp(phi) and
        # dphi = dx~ x~. a~ has phi = gx - m, r~ has g - m, b~ and k~ have m - g; the outgoing factor
        # exp(g_last - m) and the chunk decay exp(g_last) feed g_last through dg_last from the loop
        # (m is a constant that cancels).
        p_ar = d_ar * ar
        dgx = p_ar[..., :n, :]
        p = p_ar.addcmul(d_bk, bk, value=-1.0)
        dg = p[..., :n, :] + p[..., n:, :]  # dgx + dg_r - dg_b - dg_k
        (da, da_c), (dr, dr_c), (db, db_c), (dk, dk_c), (dw, dw_c) = (grad_out() for _ in range(5))
        torch.mul(bh(d_ar[..., :n, :]), bh(e_ar[..., :n, :]), out=da_c)
        torch.mul(bh(d_ar[..., n:, :]), bh(e_ar[..., n:, :]), out=dr_c)
        torch.div(bh(d_bk[..., :n, :]), bh(e_ar[..., n:, :]), out=db_c)  # times exp(m - g)
        torch.div(bh(d_bk[..., n:, :]), bh(e_ar[..., n:, :]), out=dk_c)
        dg[..., -1:, :] += dg_last
        # g = cumsum(w): dw = reverse cumsum of dg; gx = g - w adds -dgx.
        dw_t = torch.sub(dg, dgx).add_(dg.sum(-2, keepdim=True))
        torch.sub(bh(dw_t), bh(dg.cumsum(-2)), out=dw_c)
        dS_init = dS[0].clone() if dS_reset is None else dS[0] + dS_reset  # (clone: do not pin dS)
        return dr, dw, dk, dv, da, db, dS_init, None, None


def chunk_length(T: int, chunk_size: int, tensors: Sequence[Tensor] = ()) -> int:
    """The chunk length :func:`wkv7_chunked` uses for a sequence of T steps."""
    return max(1, min(chunk_size, T))


def check_w_range(tensors: Sequence[torch.Tensor], chunk_size: int) -> None:
    """Raise if the chunked form could overflow in float32 for r, w, k, v, a, b = `tensors` and this
    chunk length. Only on CPU, where it costs no device sync."""
    w = tensors[1]
    if w.device.type != "cpu" or w.numel() == 0:
        return
    max_neg = -float(w.detach().amin())
    if max_neg * chunk_size > W_CHUNK_LIMIT:
        safe = int(W_CHUNK_LIMIT // max_neg) if max_neg > 0 else chunk_size
        raise ValueError(
            f"wkv7: w reaches {-max_neg:.4g}; the chunked form needs max(-w) * chunk_size <= "
            f"{W_CHUNK_LIMIT:g} (chunk_size={chunk_size}). Use chunk_size <= {safe} or impl='reference'."
        )


def wkv7_chunked(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel evaluation; same contract as :func:`rwkvkit.wkv.v7.reference.wkv7_reference` plus
    `chunk_size` and `resets` (B, NC) bool or None: chunk c of a row starts again from ``state`` instead
    of the state the chunk before left (the variable-length form, :mod:`rwkvkit.wkv.varlen`; T must
    then be NC whole chunks).

    Precondition (not checked here): max(-w) * chunk_size <= W_CHUNK_LIMIT.
    """
    B, T, H, N = r.shape
    out_dtype = r.dtype
    dt = compute_dtype(r.dtype)
    S = start_state(state, r, dt).reshape(B * H, N, N)  # (BH, V, K)
    if T == 0:
        return r.new_zeros(B, 0, H, N), S.view(B, H, N, N)

    n = chunk_length(T, chunk_size)
    NC = -(-T // n)
    pad = NC * n - T
    if resets is not None:
        if pad or resets.shape != (B, NC):
            raise ValueError(
                f"wkv7: resets must be (B, T / {n}) for whole chunks of {n}, got {tuple(resets.shape)}"
            )
        # (NC, BH, 1, 1): per chunk, which rows start again from the initial state
        resets = resets.t().repeat_interleave(H, dim=1).view(NC, B * H, 1, 1)
    inputs = (x.to(dt) for x in (r, w, k, v, a, b))
    if pad:
        inputs = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in inputs)
    Y, S = _ChunkedWKV7.apply(*inputs, S, n, resets)  # Y: (B, NC*n, H, V)
    return Y[:, :T].to(out_dtype).contiguous(), S.view(B, H, N, N)
