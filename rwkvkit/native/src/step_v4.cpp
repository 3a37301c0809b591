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
#include <algorithm>
#include <cmath>
#include <vector>

#include "mix.h"
#include "native.h"
#include "ops.h"

extern "C" {

struct V4Layer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const float *time_mix_k, *time_mix_v, *time_mix_r, *time_decay, *time_first;
    const float *ffn_time_mix_k, *ffn_time_mix_r;
    RkMatrix key, value, receptance, output;   // (A, C) and output (C, A)
    RkMatrix ffn_key, ffn_receptance, ffn_value;  // (F, C), (C, C), (C, F)
};

struct V4Model {
    int32_t n_layer, C, A, F, V;
    float ln_eps;
    const float *ln0_w, *ln0_b, *ln_out_w, *ln_out_b;
    RkMatrix head;
    const V4Layer* layers;
};

}  // extern "C"

namespace {

struct Buffers {
    std::vector<float> all;
    // (B, max(C, A)) each: residual, normed input, the mixes, k v r, y, a product's output, the ffn gate
    float *x, *xa, *mk, *mv, *mr, *k, *v, *r, *y, *out, *gate;
    float* hidden;  // (B, F)
};

Buffers& buffers(int B, int W, int F) {
    thread_local Buffers buf;
    const size_t bw = static_cast<size_t>(B) * W;
    float* p = rk::scratch(buf.all, 11 * bw + static_cast<size_t>(B) * F);
    for (float** slot : {&buf.x, &buf.xa, &buf.mk, &buf.mv, &buf.mr, &buf.k, &buf.v, &buf.r, &buf.y, &buf.out,
                         &buf.gate}) {
        *slot = p;
        p += bw;
    }
    buf.hidden = p;
    return buf;
}

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

}  // namespace

extern "C" int32_t rk_v4_step(const void* model_ptr, int32_t B, const float* x_in, const float* att_in,
                              const float* wkv_in, const float* ffn_in, float* att_out, float* wkv_out,
                              float* ffn_out, float* logits) {
    const V4Model& m = *static_cast<const V4Model*>(model_ptr);
    const int C = m.C, A = m.A, F = m.F;
    if (B < 1 || A < 1) return 1;
    Buffers& bf = buffers(B, std::max(C, A), F);
    const size_t bc = static_cast<size_t>(B) * C, ba = static_cast<size_t>(B) * A;
    for (int b = 0; b < B; ++b) rk::layer_norm(x_in + b * C, m.ln0_w, m.ln0_b, C, m.ln_eps, bf.x + b * C);

    for (int l = 0; l < m.n_layer; ++l) {
        const V4Layer& ly = m.layers[l];
        const float* a_prev = att_in + l * bc;
        const float* f_prev = ffn_in + l * bc;
        float* a_next = att_out + l * bc;
        float* f_next = ffn_out + l * bc;
        const float* s_in = wkv_in + l * 3 * ba;
        float* s_out = wkv_out + l * 3 * ba;

        // time mix: norm, token shift, projections, then the WKV a row at a time
        for (int b = 0; b < B; ++b) {
            const size_t o = static_cast<size_t>(b) * C;
            rk::layer_norm(bf.x + o, ly.ln1_w, ly.ln1_b, C, m.ln_eps, bf.xa + o);
            rk::lerp_mix(bf.xa + o, a_prev + o, ly.time_mix_k, C, bf.mk + o);
            rk::lerp_mix(bf.xa + o, a_prev + o, ly.time_mix_v, C, bf.mv + o);
            rk::lerp_mix(bf.xa + o, a_prev + o, ly.time_mix_r, C, bf.mr + o);
        }
        if (rk_matmul(&ly.key, B, bf.mk, bf.k) || rk_matmul(&ly.value, B, bf.mv, bf.v) ||
            rk_matmul(&ly.receptance, B, bf.mr, bf.r))
            return 2;
#pragma omp parallel for schedule(static) if (B > 1)
        for (int b = 0; b < B; ++b) {
            const size_t o = static_cast<size_t>(b) * A;
            wkv4_row(A, ly.time_decay, ly.time_first, bf.k + o, bf.v + o, bf.r + o, s_in + 3 * o, s_out + 3 * o,
                     bf.y + o);
        }
        if (rk_matmul(&ly.output, B, bf.y, bf.out)) return 2;
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
