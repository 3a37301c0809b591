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
#include <cmath>
#include <vector>

#include "mix.h"
#include "native.h"
#include "ops.h"

extern "C" {

struct V5Layer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const float *time_mix_k, *time_mix_v, *time_mix_r, *time_mix_g, *time_decay, *time_faaaa;
    const float *lnx_w, *lnx_b, *ffn_time_mix_k, *ffn_time_mix_r;
    RkMatrix receptance, key, value, gate, output;  // (C, C)
    RkMatrix ffn_key, ffn_receptance, ffn_value;     // (F, C), (C, C), (C, F)
};

struct V5Model {
    int32_t n_layer, C, H, N, F, V;
    float ln_eps, gn_eps;
    const float *ln0_w, *ln0_b, *ln_out_w, *ln_out_b;
    RkMatrix head;
    const V5Layer* layers;
};

}  // extern "C"

namespace {

struct Buffers {
    std::vector<float> all;
    // (B, C) each: residual, normed input, the four mixes, r k v g y, a product's output, the ffn gate
    float *x, *xa, *mr, *mk, *mv, *mg, *r, *k, *v, *g, *y, *out, *gate;
    float* decay;   // (C): exp(w), the same for every row
    float* hidden;  // (B, F)
};

Buffers& buffers(int B, int C, int F) {
    thread_local Buffers buf;
    const size_t bc = static_cast<size_t>(B) * C;
    float* p = rk::scratch(buf.all, 13 * bc + C + static_cast<size_t>(B) * F);
    for (float** slot : {&buf.x, &buf.xa, &buf.mr, &buf.mk, &buf.mv, &buf.mg, &buf.r, &buf.k, &buf.v, &buf.g,
                         &buf.y, &buf.out, &buf.gate}) {
        *slot = p;
        p += bc;
    }
    buf.decay = p;
    buf.hidden = p + C;
    return buf;
}

}  // namespace

extern "C" int32_t rk_v5_step(const void* model_ptr, int32_t B, const float* x_in, const float* att_in,
                              const float* wkv_in, const float* ffn_in, float* att_out, float* wkv_out,
                              float* ffn_out, float* logits) {
    const V5Model& m = *static_cast<const V5Model*>(model_ptr);
    const int C = m.C, H = m.H, N = m.N, F = m.F;
    if (B < 1 || H * N != C) return 1;
    Buffers& bf = buffers(B, C, F);
    const size_t bc = static_cast<size_t>(B) * C;
    const size_t state_size = static_cast<size_t>(H) * N * N;
    for (int b = 0; b < B; ++b) rk::layer_norm(x_in + b * C, m.ln0_w, m.ln0_b, C, m.ln_eps, bf.x + b * C);

    for (int l = 0; l < m.n_layer; ++l) {
        const V5Layer& ly = m.layers[l];
        const float* a_prev = att_in + l * bc;
        const float* f_prev = ffn_in + l * bc;
        float* a_next = att_out + l * bc;
        float* f_next = ffn_out + l * bc;
        const size_t so = static_cast<size_t>(l) * B * state_size;

        // time mix: norm, token shift, then projections, WKV, GroupNorm, gate and output (mix.h)
        for (int b = 0; b < B; ++b) {
            const size_t o = static_cast<size_t>(b) * C;
            rk::layer_norm(bf.x + o, ly.ln1_w, ly.ln1_b, C, m.ln_eps, bf.xa + o);
            rk::lerp_mix(bf.xa + o, a_prev + o, ly.time_mix_r, C, bf.mr + o);
            rk::lerp_mix(bf.xa + o, a_prev + o, ly.time_mix_k, C, bf.mk + o);
            rk::lerp_mix(bf.xa + o, a_prev + o, ly.time_mix_v, C, bf.mv + o);
            rk::lerp_mix(bf.xa + o, a_prev + o, ly.time_mix_g, C, bf.mg + o);
        }
        for (int c = 0; c < C; ++c) bf.decay[c] = std::exp(-std::exp(ly.time_decay[c]));
        const rk::MatrixStateWeights w{&ly.receptance, &ly.key,       &ly.value, &ly.gate,
                                       &ly.output,     ly.time_faaaa, ly.lnx_w,  ly.lnx_b};
        if (rk::matrix_state_mix(w, B, H, N, m.gn_eps, bf.mr, bf.mk, bf.mv, bf.mg, bf.decay, 0, wkv_in + so,
                                 wkv_out + so, {bf.r, bf.k, bf.v, bf.g, bf.y}, bf.out))
            return 2;
        for (size_t i = 0; i < bc; ++i) {
            a_next[i] = bf.xa[i];
            bf.x[i] += bf.out[i];
        }

        // channel mix
        for (int b = 0; b < B; ++b) {
            const size_t o = static_cast<size_t>(b) * C;
            rk::layer_norm(bf.x + o, ly.ln2_w, ly.ln2_b, C, m.ln_eps, f_next + o);
            rk::lerp_mix(f_next + o, f_prev + o, ly.ffn_time_mix_k, C, bf.mk + o);
            rk::lerp_mix(f_next + o, f_prev + o, ly.ffn_time_mix_r, C, bf.mr + o);
        }
        if (rk::channel_mix_add(ly.ffn_key, ly.ffn_value, ly.ffn_receptance, B, C, F, bf.mk, bf.mr, bf.hidden,
                                bf.out, bf.gate, bf.x))
            return 2;
    }
    for (int b = 0; b < B; ++b) rk::layer_norm(bf.x + b * C, m.ln_out_w, m.ln_out_b, C, m.ln_eps, bf.xa + b * C);
    return rk_matmul(&m.head, B, bf.xa, logits) ? 2 : 0;
}
