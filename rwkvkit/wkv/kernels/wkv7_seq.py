"""The Triton WKV-7 over a whole sequence, forward and backward, as torch custom ops with autograd.

Contract of :func:`rwkvkit.wkv.wkv7` (``impl="triton"``): r, w, k, v, a, b (B, T, H, N) float32 /
bfloat16 / float16, state (B, H, N, N) float32 [value, key] or None; returns y (B, T, H, N) in r's dtype
and the final state float32. Gradients reach every input and the initial state; the final state's
gradient flows back too (state tuning, chunked prefill).

Design. One program per (batch, head, block of BV value rows); its (BV, N) slice of the state stays in
float32 registers for the whole sequence (each value row evolves on its own in the forward). The
forward also stores the state at the start of every chunk of C steps (checkpoints, (B, H, NC, N, N)).
The backward walks the chunks from the last: it recomputes the chunk's states from its checkpoint into
a per-program scratch buffer (exact, no division by the decay, so no precondition on w), then runs the
adjoint recurrence backwards over the chunk with G = dL/dS (BV, N) in registers:

    G += dy_t r_t^T; dr_t = S_t^T dy_t; dv_t = G k_t; dk_t = G^T v_t; db_t = G^T sa_t; dsa = G b_t;
    dw_t = exp(w_t) colsum(G * S_{t-1}); da_t = S_{t-1}^T dsa; G <- G diag(exp(w_t)) + dsa a_t^T

The per-key gradients (dr, dw, dk, da, db) sum over value rows, so each row block writes its partial
sum and the host adds the NB blocks (deterministic, no atomics). The tail T % C is masked (zero inputs
leave the state and G unchanged). The ops are ``rwkvkit::wkv7_fwd`` and ``rwkvkit::wkv7_bwd``, with
fake implementations, joined by ``register_autograd``: torch.compile and FSDP2 trace through them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["CHUNK", "wkv7_triton"]

CHUNK = 16  # steps between state checkpoints (the backward's recompute length)


def _block_rows(N: int) -> int:
    """Value rows per program."""
    return min(N, 16)


@triton.jit
def _fwd_kernel(
    r, w, k, v, a, b, s0, y, s_final, ckpt,
    T, NC, H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)  # b * H + h
    rows = tl.program_id(1) * BV + tl.arange(0, BV)  # (BV,)
    cols = tl.arange(0, N)  # (N,)
    bidx = bh // H
    h = bh % H
    tile = rows[:, None] * N + cols[None, :]  # (BV, N) inside one (N, N) state
    S = tl.load(s0 + bh * N * N + tile)  # (BV, N) fp32
    for c in range(NC):
        tl.store(ckpt + (bh * NC + c) * N * N + tile, S)
        for j in range(C):
            t = c * C + j
            base = ((bidx * T + t) * H + h) * N
            m = (cols * 0 + t) < T  # (N,) live step
            r_t = tl.load(r + base + cols, mask=m, other=0.0).to(tl.float32)
            d_t = tl.exp(tl.load(w + base + cols, mask=m, other=0.0).to(tl.float32))
            k_t = tl.load(k + base + cols, mask=m, other=0.0).to(tl.float32)
            a_t = tl.load(a + base + cols, mask=m, other=0.0).to(tl.float32)
            b_t = tl.load(b + base + cols, mask=m, other=0.0).to(tl.float32)
            mr = (rows * 0 + t) < T
            v_t = tl.load(v + base + rows, mask=mr, other=0.0).to(tl.float32)  # (BV,)
            sa = tl.sum(S * a_t[None, :], axis=1)  # (BV,)
            S = S * d_t[None, :] + sa[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]
            y_t = tl.sum(S * r_t[None, :], axis=1)  # (BV,)
            tl.store(y + base + rows, y_t.to(y.dtype.element_ty), mask=mr)
    tl.store(s_final + bh * N * N + tile, S)


@triton.jit
def _bwd_kernel(
    r, w, k, v, a, b, ckpt, dy, ds_final,
    dr, dw, dk, dv, da, db, ds0, scratch,
    T, NC, B, H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    rows = blk * BV + tl.arange(0, BV)  # (BV,)
    cols = tl.arange(0, N)  # (N,)
    bidx = bh // H
    h = bh % H
    tile = rows[:, None] * N + cols[None, :]  # (BV, N)
    own = (bh * tl.num_programs(1) + blk) * C * BV * N  # this program's scratch (C, BV, N)
    local = tl.arange(0, BV)[:, None] * N + cols[None, :]  # (BV, N) inside one scratch slot
    part = blk * B * T * H * N  # this block's slice of the partial per-key gradients (NB, B, T, H, N)
    G = tl.load(ds_final + bh * N * N + tile)  # (BV, N)
    for cc in range(NC):
        c = NC - 1 - cc
        tl.debug_barrier()  # the previous chunk's scratch reads are done
        S = tl.load(ckpt + (bh * NC + c) * N * N + tile)
        for j in range(C):  # recompute the chunk: scratch[j] = S_{t-1}
            t = c * C + j
            base = ((bidx * T + t) * H + h) * N
            m = (cols * 0 + t) < T  # (N,) live step
            tl.store(scratch + own + j * BV * N + local, S)
            d_t = tl.exp(tl.load(w + base + cols, mask=m, other=0.0).to(tl.float32))
            k_t = tl.load(k + base + cols, mask=m, other=0.0).to(tl.float32)
            a_t = tl.load(a + base + cols, mask=m, other=0.0).to(tl.float32)
            b_t = tl.load(b + base + cols, mask=m, other=0.0).to(tl.float32)
            v_t = tl.load(v + base + rows, mask=(rows * 0 + t) < T, other=0.0).to(tl.float32)
            sa = tl.sum(S * a_t[None, :], axis=1)
            S = S * d_t[None, :] + sa[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]
        tl.debug_barrier()  # the scratch writes are visible
        for jj in range(C):  # S is S_t; walk back
            j = C - 1 - jj
            t = c * C + j
            base = ((bidx * T + t) * H + h) * N
            m = (cols * 0 + t) < T  # (N,) live step
            mr = (rows * 0 + t) < T
            S_prev = tl.load(scratch + own + j * BV * N + local)
            r_t = tl.load(r + base + cols, mask=m, other=0.0).to(tl.float32)
            d_t = tl.exp(tl.load(w + base + cols, mask=m, other=0.0).to(tl.float32))
            k_t = tl.load(k + base + cols, mask=m, other=0.0).to(tl.float32)
            a_t = tl.load(a + base + cols, mask=m, other=0.0).to(tl.float32)
            b_t = tl.load(b + base + cols, mask=m, other=0.0).to(tl.float32)
            v_t = tl.load(v + base + rows, mask=mr, other=0.0).to(tl.float32)  # (BV,)
            dy_t = tl.load(dy + base + rows, mask=mr, other=0.0).to(tl.float32)  # (BV,)
            G = G + dy_t[:, None] * r_t[None, :]
            sa = tl.sum(S_prev * a_t[None, :], axis=1)  # (BV,)
            dsa = tl.sum(G * b_t[None, :], axis=1)  # (BV,)
            tl.store(dr + part + base + cols, tl.sum(S * dy_t[:, None], axis=0), mask=m)
            tl.store(dk + part + base + cols, tl.sum(G * v_t[:, None], axis=0), mask=m)
            tl.store(db + part + base + cols, tl.sum(G * sa[:, None], axis=0), mask=m)
            tl.store(dw + part + base + cols, d_t * tl.sum(G * S_prev, axis=0), mask=m)
            tl.store(da + part + base + cols, tl.sum(S_prev * dsa[:, None], axis=0), mask=m)
            tl.store(dv + base + rows, tl.sum(G * k_t[None, :], axis=1), mask=mr)
            G = G * d_t[None, :] + dsa[:, None] * a_t[None, :]
            S = S_prev
    tl.store(ds0 + bh * N * N + tile, G)


@torch.library.custom_op("rwkvkit::wkv7_fwd", mutates_args=())
def wkv7_fwd(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(y (B, T, H, N) in r's dtype, final state (B, H, N, N) fp32, checkpoints (B, H, NC, N, N) fp32)."""
    B, T, H, N = r.shape
    NC = triton.cdiv(T, CHUNK)
    BV = _block_rows(N)
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    s0 = s0.float().contiguous()
    y = torch.empty_like(r)
    s_final = torch.empty_like(s0)
    ckpt = torch.empty(B, H, NC, N, N, dtype=torch.float32, device=r.device)
    if B * H > 0:
        _fwd_kernel[(B * H, N // BV)](r, w, k, v, a, b, s0, y, s_final, ckpt, T, NC, H=H, N=N, BV=BV, C=CHUNK)
    return y, s_final, ckpt


@wkv7_fwd.register_fake
def _(r, w, k, v, a, b, s0):  # noqa: ANN001, ANN202
    B, T, H, N = r.shape
    NC = (T + CHUNK - 1) // CHUNK
    s = r.new_empty(B, H, N, N, dtype=torch.float32)
    return torch.empty_like(r), s, r.new_empty(B, H, NC, N, N, dtype=torch.float32)


@torch.library.custom_op("rwkvkit::wkv7_bwd", mutates_args=())
def wkv7_bwd(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    ckpt: Tensor,
    dy: Tensor,
    ds_final: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients (dr, dw, dk, dv, da, db in the inputs' dtypes, ds0 fp32) from dy and the final
    state's gradient."""
    B, T, H, N = r.shape
    NC = ckpt.shape[2]
    BV = _block_rows(N)
    NB = N // BV
    r, w, k, v, a, b, dy = (x.contiguous() for x in (r, w, k, v, a, b, dy))
    ds_final = ds_final.float().contiguous()
    f32 = dict(dtype=torch.float32, device=r.device)
    parts = [torch.zeros(NB, B, T, H, N, **f32) for _ in range(5)]  # dr, dw, dk, da, db per row block
    dv = torch.zeros(B, T, H, N, **f32)
    ds0 = torch.empty(B, H, N, N, **f32)
    scratch = torch.empty(B * H * NB, CHUNK, BV, N, **f32)
    if B * H > 0:
        _bwd_kernel[(B * H, NB)](
            r, w, k, v, a, b, ckpt, dy, ds_final, parts[0], parts[1], parts[2], dv, parts[3], parts[4],
            ds0, scratch, T, NC, B, H=H, N=N, BV=BV, C=CHUNK,
        )  # fmt: skip
    dr, dw, dk, da, db = (p.sum(0) for p in parts)
    return dr.to(r.dtype), dw.to(w.dtype), dk.to(k.dtype), dv.to(v.dtype), da.to(a.dtype), db.to(b.dtype), ds0


@wkv7_bwd.register_fake
def _(r, w, k, v, a, b, ckpt, dy, ds_final):  # noqa: ANN001, ANN202
    grads = tuple(torch.empty_like(x) for x in (r, w, k, v, a, b))
    return (*grads, ds_final.new_empty(ds_final.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    r, w, k, v, a, b, s0 = inputs
    ctx.save_for_backward(r, w, k, v, a, b, output[2])
    ctx.s0_dtype = s0.dtype
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, dy, ds_final, _dckpt):  # noqa: ANN001, ANN202
    r, w, k, v, a, b, ckpt = ctx.saved_tensors
    B, T, H, N = r.shape
    if dy is None:
        dy = torch.zeros_like(r)
    if ds_final is None:
        ds_final = r.new_zeros(B, H, N, N, dtype=torch.float32)
    dr, dw, dk, dv, da, db, ds0 = wkv7_bwd(r, w, k, v, a, b, ckpt, dy, ds_final)
    return dr, dw, dk, dv, da, db, ds0.to(ctx.s0_dtype)


wkv7_fwd.register_autograd(_backward, setup_context=_setup_context)


def wkv7_triton(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """WKV-7 over (B, T, H, N) inputs from `state` (B, H, N, N) fp32 [value, key] or None (zeros):
    y (B, T, H, N) in r's dtype and the final state fp32 (see the module docstring)."""
    B, T, H, N = r.shape
    if state is None:
        state = r.new_zeros(B, H, N, N, dtype=torch.float32)
    y, s_final, _ = wkv7_fwd(r, w, k, v, a, b, state)
    return y, s_final
