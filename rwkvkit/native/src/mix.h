// The end of the matrix-state time mix that RWKV-5.2 and 6 share (header-only, inlined into
// step_v5/6.cpp), over B rows at once (the products take all rows; per-row work runs in parallel when
// B > 1). What every version shares is in layer.h.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "native.h"
#include "ops.h"

namespace rk {

// WKV-5/6 for one row and head (as rwkvkit.wkv.v6.step.wkv6_step): y = S r + (r . (u * k)) v, then
// S = S diag(decay) + v k^T, with decay = exp(w) per key channel; state (N, N) [value i, key j] read from
// s_in and written to s_out (may be the same: row i of the new state needs only row i of the old one).
inline void wkv6_head(int N, const float* r, const float* decay, const float* k, const float* v,
                      const float* u, const float* s_in, float* s_out, float* y) {
    float bonus = 0.0f;
    for (int j = 0; j < N; ++j) bonus += r[j] * u[j] * k[j];
    for (int i = 0; i < N; ++i) {
        const float* si = s_in + static_cast<int64_t>(i) * N;
        float* so = s_out + static_cast<int64_t>(i) * N;
        const float vi = v[i];
        float yi = 0.0f;
#pragma omp simd reduction(+ : yi)
        for (int j = 0; j < N; ++j) {
            yi += si[j] * r[j];
            so[j] = si[j] * decay[j] + vi * k[j];
        }
        y[i] = yi + bonus * vi;
    }
}

// Scratch of matrix_state_mix: r, k, v, g, y, each (B, C).
struct MatrixStateScratch {
    float *r, *k, *v, *g, *y;
};

// From the token-shifted inputs xr, xk, xv, xg (B, C) and the decay factors exp(w) (row b at
// decay + b * decay_stride: 0 when every row has the same, v5.2): r, k, v = Wr xr, Wk xk, Wv xv,
// g = silu(Wg xg), the WKV per head (state (B, H, N, N) s_in -> s_out), then
// out (B, C) = Wo(GroupNorm_H(y) * g), with the weights of w: a V5Layer or V6Layer (the same names: the
// (C, C) projections receptance, key, value, gate, output, the bonus u = time_faaaa (C = H * N) and the
// per-head norm lnx_w, lnx_b). Returns 0, or 2 when a product fails.
template <typename Layer>
inline int matrix_state_mix(const Layer& w, int B, int H, int N, float gn_eps, const float* xr,
                            const float* xk, const float* xv, const float* xg, const float* decay,
                            size_t decay_stride, const float* s_in, float* s_out, const MatrixStateScratch& t,
                            float* out) {
    const int C = H * N;
    if (rk_matmul(&w.receptance, B, xr, t.r) || rk_matmul(&w.key, B, xk, t.k) ||
        rk_matmul(&w.value, B, xv, t.v) || rk_matmul(&w.gate, B, xg, t.g))
        return 2;
    const size_t state_size = static_cast<size_t>(H) * N * N;
#pragma omp parallel for schedule(static) if (B > 1)
    for (int b = 0; b < B; ++b) {
        const size_t o = static_cast<size_t>(b) * C;
        const float* dec = decay + b * decay_stride;
        for (int h = 0; h < H; ++h) {
            const size_t hn = o + static_cast<size_t>(h) * N;
            const size_t sh = b * state_size + static_cast<size_t>(h) * N * N;
            wkv6_head(N, t.r + hn, dec + h * N, t.k + hn, t.v + hn, w.time_faaaa + h * N, s_in + sh, s_out + sh,
                      t.y + hn);
        }
        group_norm(t.y + o, w.lnx_w, w.lnx_b, H, N, gn_eps);
        for (int c = 0; c < C; ++c) t.y[o + c] *= silu(t.g[o + c]);
    }
    return rk_matmul(&w.output, B, t.y, out) ? 2 : 0;
}

}  // namespace rk
