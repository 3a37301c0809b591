// rk_v4_step: one RWKV-4 token for B sequences, every layer, ln_out and the head, in one call.
//
// The same arithmetic as rwkvkit/models/rwkv4.py (the reference the tests compare against), in fp32:
//   x{k,v,r} = x * time_mix_{k,v,r} + prev * (1 - time_mix_{k,v,r})
//   k, v = Wk xk, Wv xv;  r = sigmoid(Wr xr)                       (A = dim_att channels, no heads)
//   WKV-4 per channel with w = -exp(time_decay), u = time_first, the stable recurrence of
//   rwkvkit/wkv/v4/step.py on the state (aa, bb, pp) (B, 3, A):
//     p = max(pp, u + k); y = (e^(pp-p) aa + e^(u+k-p) v) / (e^(pp-p) bb + e^(u+k-p))
//     q = max(w + pp, k); aa = e^(w+pp-q) aa + e^(k-q) v; bb = e^(w+pp-q) bb + e^(k-q); pp = q
//   out = Wo(r * y);  ffn: sigmoid(Wr xr) * Wv(relu(Wk xk)^2), x{k,r} mixed the same way
// The torch model scales sub-block outputs by powers of two and back (fp16 range); in fp32 that is exact,
// so it is left out here.
// This file holds the layer struct and the time mix; the rest of the step (ln0, the residual, the channel
// mix, ln_out and the head) is rk::run_step's (layer.h).
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "layer.h"
#include "native.h"
#include "ops.h"

extern "C" {

struct V4Layer {
    const float *ln1_w, *ln1_b, *time_mix_k, *time_mix_v, *time_mix_r, *time_decay, *time_first;
    RkMatrix key, value, receptance, output;  // (A, C) and output (C, A)
    rk::ChannelMix ffn;
};

}  // extern "C"

namespace {

using V4Model = rk::StepModel<V4Layer>;  // H = 1, N = A (dim_att): no heads

// WKV-4 for one row of A channels: state (3, A) (aa, bb, pp) from s_in to s_out (may be the same);
// y = sigmoid(r) * wkv.
void wkv4_row(int A, const float* time_decay, const float* u, const float* k, const float* v, const float* r,
              const float* s_in, float* s_out, float* y) {
    for (int c = 0; c < A; ++c) {
        const float aa = s_in[c], bb = s_in[A + c], pp = s_in[2 * A + c];
        const float w = -std::exp(time_decay[c]);
        float ww = u[c] + k[c];
        float p = std::max(pp, ww);
        float e1 = std::exp(pp - p), e2 = std::exp(ww - p);
        y[c] = rk::sigmoid(r[c]) * ((e1 * aa + e2 * v[c]) / (e1 * bb + e2));
        ww = w + pp;
        p = std::max(ww, k[c]);
        e1 = std::exp(ww - p), e2 = std::exp(k[c] - p);
        s_out[c] = e1 * aa + e2 * v[c];
        s_out[A + c] = e1 * bb + e2;
        s_out[2 * A + c] = p;
    }
}

int32_t step(const V4Model& m, int B, const rk::StepIO& io) {
    const int C = m.C, A = m.N;
    if (B < 1 || A < 1) return 1;
    float *mv, *k, *v, *r, *y;  // (B, max(C, A)) each: the value's mix (k's and r's: bf.mk, bf.mr), k v r, y
    const rk::StepScratch bf = rk::step_scratch(B, std::max(C, A), m.F, {&mv, &k, &v, &r, &y});

    // time mix: norm, token shift, projections, then the WKV a row at a time
    const auto time_mix = [&](const V4Layer& ly, int, const rk::LayerState& st) {
        rk::norm_and_shift<rk::lerp_mix>(B, C, m.ln_eps, bf.x, ly.ln1_w, ly.ln1_b, st.a_prev, bf.xa,
                                         {ly.time_mix_k, ly.time_mix_v, ly.time_mix_r}, {bf.mk, mv, bf.mr});
        if (rk_matmul(&ly.key, B, bf.mk, k) || rk_matmul(&ly.value, B, mv, v) ||
            rk_matmul(&ly.receptance, B, bf.mr, r))
            return 2;
#pragma omp parallel for schedule(static) if (B > 1)
        for (int b = 0; b < B; ++b) {
            const size_t o = static_cast<size_t>(b) * A;
            wkv4_row(A, ly.time_decay, ly.time_first, k + o, v + o, r + o, st.s_in + 3 * o, st.s_out + 3 * o, y + o);
        }
        return rk_matmul(&ly.output, B, y, bf.out) ? 2 : 0;
    };
    return rk::run_step<rk::lerp_mix>(m, B, io, 3 * static_cast<size_t>(A), bf, time_mix);
}

}  // namespace

RK_STEP_ENTRY(rk_v4_step, V4Model, step)
