// rk_v5_step: one RWKV-5.2 token for B sequences, every layer, ln_out and the head, in one call.
//
// The same arithmetic as rwkvkit/models/rwkv5.py (the reference the tests compare against), in fp32:
//   x{k,v,r,g} = x * time_mix_{k,v,r,g} + prev * (1 - time_mix_{k,v,r,g})
//   r, k, v = Wr xr, Wk xk, Wv xv;  g = silu(Wg xg)
//   per head: y = S r + (r . (u k)) v;  S = S diag(exp(w)) + v k^T  with the constant w = -exp(time_decay)
//   and u = time_faaaa (both C = H * N values; state [value i, key j]);  out = Wo(GroupNorm(y) g)
//   ffn: sigmoid(Wr xr) * Wv(relu(Wk xk)^2), x{k,r} mixed as above
// The torch model scales sub-block outputs by powers of two and back (fp16 range); in fp32 that is exact,
// so it is left out here.
// This file holds the layer struct and the time mix; the rest of the step (ln0, the residual, the channel
// mix, ln_out and the head) is rk::run_step's (layer.h).
#include <cmath>
#include <cstddef>

#include "layer.h"
#include "mix.h"
#include "native.h"
#include "ops.h"

extern "C" {

struct V5Layer {
    const float *ln1_w, *ln1_b, *time_mix_k, *time_mix_v, *time_mix_r, *time_mix_g, *time_decay, *time_faaaa;
    const float *lnx_w, *lnx_b;
    RkMatrix receptance, key, value, gate, output;  // (C, C)
    rk::ChannelMix ffn;
};

}  // extern "C"

namespace {

using V5Model = rk::StepModel<V5Layer>;

int32_t step(const V5Model& m, int B, const rk::StepIO& io) {
    const int C = m.C, H = m.H, N = m.N;
    if (B < 1 || H * N != C) return 1;
    float *mv, *mg, *r, *k, *v, *g, *y;  // (B, C) each: the value's and gate's mixes (r's, k's: bf.mr, bf.mk)
    const rk::StepScratch bf = rk::step_scratch(B, C, m.F, {&mv, &mg, &r, &k, &v, &g, &y}, C);
    float* decay = bf.tail;  // (C): exp(w), the same for every row

    // time mix: norm, token shift, then projections, WKV, GroupNorm, gate and output (mix.h)
    const auto time_mix = [&](const V5Layer& ly, int, const rk::LayerState& st) {
        rk::norm_and_shift<rk::lerp_mix>(B, C, m.ln_eps, bf.x, ly.ln1_w, ly.ln1_b, st.a_prev, bf.xa,
                                         {ly.time_mix_r, ly.time_mix_k, ly.time_mix_v, ly.time_mix_g},
                                         {bf.mr, bf.mk, mv, mg});
        for (int c = 0; c < C; ++c) decay[c] = std::exp(-std::exp(ly.time_decay[c]));
        return rk::matrix_state_mix(ly, B, H, N, m.gn_eps, bf.mr, bf.mk, mv, mg, decay, 0, st.s_in, st.s_out,
                                    {r, k, v, g, y}, bf.out);
    };
    return rk::run_step<rk::lerp_mix>(m, B, io, static_cast<size_t>(H) * N * N, bf, time_mix);
}

}  // namespace

RK_STEP_ENTRY(rk_v5_step, V5Model, step)
