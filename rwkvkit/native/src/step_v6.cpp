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
#include <cmath>
#include <vector>

#include "mix.h"
#include "native.h"
#include "ops.h"

extern "C" {

struct V6Layer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const float *maa_x, *maa_w, *maa_k, *maa_v, *maa_r, *maa_g, *time_decay, *time_faaaa;
    const float *lnx_w, *lnx_b, *ffn_maa_k, *ffn_maa_r;
    RkMatrix maa_w1, maa_w2[5], decay_w1, decay_w2;  // low rank, (in, out) layout; maa_w2[i] (D, C)
    RkMatrix receptance, key, value, gate, output;   // (C, C)
    RkMatrix ffn_key, ffn_receptance, ffn_value;     // (F, C), (C, C), (C, F)
};

struct V6Model {
    int32_t n_layer, C, H, N, F, V;
    float ln_eps, gn_eps;
    const float *ln0_w, *ln0_b, *ln_out_w, *ln_out_b;
    RkMatrix head;
    const V6Layer* layers;
};

}  // extern "C"

namespace {

struct Buffers {
    std::vector<float> all;
    // (B, C) each: residual, normed input, the five mixes, r k v g y, the decay factors exp(w), a
    // product's output, the ffn gate
    float *x, *xa, *mw, *mk, *mv, *mr, *mg, *r, *k, *v, *g, *y, *decay, *out, *gate;
    float* hidden;  // (B, F)
};

Buffers& buffers(int B, int C, int F) {
    thread_local Buffers buf;
    const size_t bc = static_cast<size_t>(B) * C;
    float* p = rk::scratch(buf.all, 15 * bc + static_cast<size_t>(B) * F);
    for (float** slot : {&buf.x, &buf.xa, &buf.mw, &buf.mk, &buf.mv, &buf.mr, &buf.mg, &buf.r, &buf.k, &buf.v,
                         &buf.g, &buf.y, &buf.decay, &buf.out, &buf.gate}) {
        *slot = p;
        p += bc;
    }
    buf.hidden = p;
    return buf;
}

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

}  // namespace

extern "C" int32_t rk_v6_step(const void* model_ptr, int32_t B, const float* x_in, const float* att_in,
                              const float* wkv_in, const float* ffn_in, float* att_out, float* wkv_out,
                              float* ffn_out, float* logits) {
    const V6Model& m = *static_cast<const V6Model*>(model_ptr);
    const int C = m.C, H = m.H, N = m.N, F = m.F;
    if (B < 1 || H * N != C) return 1;
    Buffers& bf = buffers(B, C, F);
    const size_t bc = static_cast<size_t>(B) * C;
    const size_t state_size = static_cast<size_t>(H) * N * N;
    for (int b = 0; b < B; ++b) rk::layer_norm(x_in + b * C, m.ln0_w, m.ln0_b, C, m.ln_eps, bf.x + b * C);

    for (int l = 0; l < m.n_layer; ++l) {
        const V6Layer& ly = m.layers[l];
        const float* a_prev = att_in + l * bc;
        const float* f_prev = ffn_in + l * bc;
        float* a_next = att_out + l * bc;
        float* f_next = ffn_out + l * bc;
        const size_t so = static_cast<size_t>(l) * B * state_size;

        // time mix: norm and the data-dependent shift and decay a row at a time (rows in parallel when
        // there are several), then projections, WKV, GroupNorm, gate and output (mix.h)
#pragma omp parallel for schedule(static) if (B > 1)
        for (int b = 0; b < B; ++b) {
            const size_t o = static_cast<size_t>(b) * C;
            rk::layer_norm(bf.x + o, ly.ln1_w, ly.ln1_b, C, m.ln_eps, bf.xa + o);
            float* const mixes[5] = {bf.mw + o, bf.mk + o, bf.mv + o, bf.mr + o, bf.mg + o};
            shift_and_decay_row(ly, C, bf.xa + o, a_prev + o, mixes, bf.decay + o);
        }
        const rk::MatrixStateWeights w{&ly.receptance, &ly.key,       &ly.value, &ly.gate,
                                       &ly.output,     ly.time_faaaa, ly.lnx_w,  ly.lnx_b};
        if (rk::matrix_state_mix(w, B, H, N, m.gn_eps, bf.mr, bf.mk, bf.mv, bf.mg, bf.decay, C, wkv_in + so,
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
            rk::shift_mix(f_next + o, f_prev + o, ly.ffn_maa_k, C, bf.mk + o);
            rk::shift_mix(f_next + o, f_prev + o, ly.ffn_maa_r, C, bf.mr + o);
        }
        if (rk::channel_mix_add(ly.ffn_key, ly.ffn_value, ly.ffn_receptance, B, C, F, bf.mk, bf.mr, bf.hidden,
                                bf.out, bf.gate, bf.x))
            return 2;
    }
    for (int b = 0; b < B; ++b) rk::layer_norm(bf.x + b * C, m.ln_out_w, m.ln_out_b, C, m.ln_eps, bf.xa + b * C);
    return rk_matmul(&m.head, B, bf.xa, logits) ? 2 : 0;
}
