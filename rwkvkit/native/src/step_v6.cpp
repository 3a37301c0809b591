// rk_v6_step: one RWKV-6 token for B sequences, every layer, ln_out and the head, in one call.
//
// The same arithmetic as rwkvkit/models/rwkv6.py (the reference the tests compare against), in fp32:
//   xx = prev - x; xxx = x + xx * time_maa_x
//   (mw, mk, mv, mr, mg) = tanh(xxx W1) W2[i]         (W1 (C, 5 D) holds the five branches side by side)
//   x{w,k,v,r,g} = x + xx * (time_maa_{w,k,v,r,g} + m{w,k,v,r,g})
//   w = -exp(time_decay + tanh(xw Wd1) Wd2)            (data-dependent decay, per channel)
//   r, k, v = Wr xr, Wk xk, Wv xv;  g = silu(Wg xg)
//   per head: y = S r + (r . (u k)) v;  S = S diag(exp(w)) + v k^T  (u = time_faaaa, state [value, key])
//   out = Wo(GroupNorm(y) g);  ffn: sigmoid(Wr xr) * Wv(relu(Wk xk)^2), x{k,r} = x + xx * time_maa_{k,r}
// The torch model scales sub-block outputs by powers of two and back (fp16 range); in fp32 that is exact,
// so it is left out here.
// This file holds the layer struct and the time mix; the rest of the step (ln0, the residual, the channel
// mix, ln_out and the head) is rk::run_step's (layer.h).
#include <cmath>
#include <cstddef>
#include <vector>

#include "layer.h"
#include "mix.h"
#include "native.h"
#include "ops.h"

extern "C" {

struct V6Layer {
    const float *ln1_w, *ln1_b, *maa_x, *maa_w, *maa_k, *maa_v, *maa_r, *maa_g, *time_decay, *time_faaaa;
    const float *lnx_w, *lnx_b;
    RkMatrix maa_w1, maa_w2[5], decay_w1, decay_w2;  // low rank, (in, out) layout; maa_w2[i] (D, C)
    RkMatrix receptance, key, value, gate, output;   // (C, C)
    rk::ChannelMix ffn;
};

}  // extern "C"

namespace {

using V6Model = rk::StepModel<V6Layer>;

// The data-dependent token shift and decay of one row: from x (normed) and prev, the five mixes
// (w, k, v, r, g) into mixes[0..4] and the decay factors exp(w) into decay.
void shift_and_decay_row(const V6Layer& ly, int C, const float* x, const float* prev, float* const mixes[5],
                         float* decay) {
    const int D = ly.maa_w1.cols / 5, Dd = ly.decay_w1.cols;
    thread_local std::vector<float> row_buf;
    float* xx = rk::scratch(row_buf, 3 * static_cast<size_t>(C) + 5 * D + Dd);
    float* xxx = xx + C;
    float* m = xxx + C;
    float* t = m + C;       // (5 D): the five branches' hidden
    float* td = t + 5 * D;  // (Dd): the decay's hidden
    for (int c = 0; c < C; ++c) {
        xx[c] = prev[c] - x[c];
        xxx[c] = x[c] + xx[c] * ly.maa_x[c];
    }
    rk::matvec_kn(ly.maa_w1, xxx, t);
    for (int i = 0; i < 5 * D; ++i) t[i] = std::tanh(t[i]);
    const float* maa[5] = {ly.maa_w, ly.maa_k, ly.maa_v, ly.maa_r, ly.maa_g};
    for (int i = 0; i < 5; ++i) {
        rk::matvec_kn(ly.maa_w2[i], t + i * D, m);
        for (int c = 0; c < C; ++c) mixes[i][c] = x[c] + xx[c] * (maa[i][c] + m[c]);
    }
    rk::matvec_kn(ly.decay_w1, mixes[0], td);
    for (int i = 0; i < Dd; ++i) td[i] = std::tanh(td[i]);
    rk::matvec_kn(ly.decay_w2, td, m);
    for (int c = 0; c < C; ++c) decay[c] = std::exp(-std::exp(ly.time_decay[c] + m[c]));
}

int32_t step(const V6Model& m, int B, const rk::StepIO& io) {
    const int C = m.C, H = m.H, N = m.N;
    if (B < 1 || H * N != C) return 1;
    // (B, C) each: the w, v and g mixes (k's and r's: bf.mk, bf.mr), r k v g y, the decay factors exp(w)
    float *mw, *mv, *mg, *r, *k, *v, *g, *y, *decay;
    const rk::StepScratch bf = rk::step_scratch(B, C, m.F, {&mw, &mv, &mg, &r, &k, &v, &g, &y, &decay});

    // time mix: norm and the data-dependent shift and decay a row at a time (rows in parallel when
    // there are several), then projections, WKV, GroupNorm, gate and output (mix.h)
    const auto time_mix = [&](const V6Layer& ly, int, const rk::LayerState& st) {
#pragma omp parallel for schedule(static) if (B > 1)
        for (int b = 0; b < B; ++b) {
            const size_t o = static_cast<size_t>(b) * C;
            rk::layer_norm(bf.x + o, ly.ln1_w, ly.ln1_b, C, m.ln_eps, bf.xa + o);
            float* const mixes[5] = {mw + o, bf.mk + o, mv + o, bf.mr + o, mg + o};
            shift_and_decay_row(ly, C, bf.xa + o, st.a_prev + o, mixes, decay + o);
        }
        return rk::matrix_state_mix(ly, B, H, N, m.gn_eps, bf.mr, bf.mk, mv, mg, decay, C, st.s_in, st.s_out,
                                    {r, k, v, g, y}, bf.out);
    };
    return rk::run_step<rk::shift_mix>(m, B, io, static_cast<size_t>(H) * N * N, bf, time_mix);
}

}  // namespace

RK_STEP_ENTRY(rk_v6_step, V6Model, step)
