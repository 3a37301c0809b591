// rk_v7_step: one RWKV-7 token for B sequences, every layer, ln_out and the head, in one call.
//
// The same arithmetic as rwkvkit/models/rwkv7.py (the reference the tests compare against), in fp32:
//   xx = prev - x; x{r,w,k,v,a,g} = x + xx * x_{r,w,k,v,a,g}
//   r, k, v = Wr xr, Wk xk, Wv xv;  w = -exp(-0.5) sigmoid(w0 + tanh(xw w1) w2);  a = sigmoid(a0 + xa a1 a2)
//   g = sigmoid(xg g1) g2;  kk = normalize(k * k_k) per head;  k = k (1 + (a - 1) k_a)
//   v += (v_first - v) sigmoid(v0 + xv v1 v2) (layers > 0; layer 0's v is v_first)
//   S = S diag(exp(w)) + (S (-kk)) (kk a)^T + v k^T;  y = S r  (state [value i, key j], updated a row at a
//   time: row i of the new state needs only row i of the old one, so in place is safe)
//   out = Wo((GroupNorm(y) + (sum_head r k r_k) v) g);  ffn: Wv relu(Wk (x + xx x_k))^2
// The torch model scales sub-block outputs by powers of two and back (fp16 range); in fp32 that is exact,
// so it is left out here.
// This file holds the layer struct and the time mix; the rest of the step (ln0, the residual, the channel
// mix, ln_out and the head) is rk::run_step's (layer.h).
#include <cmath>
#include <cstddef>
#include <vector>

#include "layer.h"
#include "native.h"
#include "ops.h"

extern "C" {

struct V7Layer {
    const float *ln1_w, *ln1_b, *x_r, *x_w, *x_k, *x_v, *x_a, *x_g;
    const float *w0, *a0, *v0, *k_k, *k_a, *r_k, *lnx_w, *lnx_b;
    RkMatrix w1, w2, a1, a2, v1, v2, g1, g2;  // low rank, (in, out) layout
    RkMatrix receptance, key, value, output;  // (out, in)
    rk::ChannelMix ffn;                       // no receptance
    int32_t has_value_lora;
    int32_t reserved;
};

}  // extern "C"

namespace {

using V7Model = rk::StepModel<V7Layer>;

constexpr float LOG_DECAY_SCALE = 0.60653065971263342f;  // exp(-0.5)

// One of the four low-rank chains of one row (they are independent: threads take them apart):
// 0 the log decay w, 1 the iclr a, 2 the gate g, 3 v mixed towards v_first (layers > 0 only).
// t: scratch of the widest low-rank hidden; u: C floats.
void low_rank_chain(int chain, const V7Layer& ly, int layer, int C, const float* mw, const float* ma,
                    const float* mv, const float* mg, float* w_out, float* a_out, float* g_out, float* v,
                    const float* v_first, float* t, float* u) {
    if (chain == 0) {
        rk::matvec_kn(ly.w1, mw, t);
        for (int i = 0; i < ly.w1.cols; ++i) t[i] = std::tanh(t[i]);
        rk::matvec_kn(ly.w2, t, w_out);
        for (int c = 0; c < C; ++c) w_out[c] = -LOG_DECAY_SCALE * rk::sigmoid(ly.w0[c] + w_out[c]);
    } else if (chain == 1) {
        rk::matvec_kn(ly.a1, ma, t);
        rk::matvec_kn(ly.a2, t, a_out);
        for (int c = 0; c < C; ++c) a_out[c] = rk::sigmoid(ly.a0[c] + a_out[c]);
    } else if (chain == 2) {
        rk::matvec_kn(ly.g1, mg, t);
        for (int i = 0; i < ly.g1.cols; ++i) t[i] = rk::sigmoid(t[i]);
        rk::matvec_kn(ly.g2, t, g_out);
    } else if (layer > 0) {
        rk::matvec_kn(ly.v1, mv, t);
        rk::matvec_kn(ly.v2, t, u);
        for (int c = 0; c < C; ++c) v[c] += (v_first[c] - v[c]) * rk::sigmoid(ly.v0[c] + u[c]);
    }
}

// WKV-7 for one row and head: kk normalised here; state (N, N) [value, key] read from s_in, written to
// s_out (may be the same); returns y (N) into y.
void wkv_head(int N, const float* r, const float* w, float* k, const float* v, const float* a,
              const float* k_k, const float* k_a, const float* s_in, float* s_out, float* y, float* kk,
              float* kka, float* decay) {
    float norm = 0.0f;
    for (int j = 0; j < N; ++j) {
        kk[j] = k[j] * k_k[j];
        norm += kk[j] * kk[j];
    }
    const float inv = 1.0f / std::fmax(std::sqrt(norm), 1e-12f);
    for (int j = 0; j < N; ++j) {
        kk[j] *= inv;
        kka[j] = kk[j] * a[j];
        k[j] = k[j] * (1.0f + (a[j] - 1.0f) * k_a[j]);
        decay[j] = std::exp(w[j]);
    }
    for (int i = 0; i < N; ++i) {
        const float* si = s_in + static_cast<int64_t>(i) * N;
        float* so = s_out + static_cast<int64_t>(i) * N;
        float sa = 0.0f;
#pragma omp simd reduction(+ : sa)
        for (int j = 0; j < N; ++j) sa -= si[j] * kk[j];
        const float vi = v[i];
        float yi = 0.0f;
#pragma omp simd reduction(+ : yi)
        for (int j = 0; j < N; ++j) {
            const float s = si[j] * decay[j] + sa * kka[j] + vi * k[j];
            so[j] = s;
            yi += s * r[j];
        }
        y[i] = yi;
    }
}

int32_t step(const V7Model& m, int B, const rk::StepIO& io) {
    const int C = m.C, H = m.H, N = m.N;
    if (B < 1 || H * N != C) return 1;
    // (B, C) each: the w, v, a, g mixes (r's and k's: bf.mr, bf.mk), r k v, layer 0's v, y, the log decay,
    // the iclr and the gate
    float *mw, *mv, *ma, *mg, *r, *k, *v, *v_first, *y, *w, *a, *g;
    const rk::StepScratch bf = rk::step_scratch(B, C, m.F, {&mw, &mv, &ma, &mg, &r, &k, &v, &v_first, &y, &w, &a, &g});
    int D = 1;  // the widest low-rank hidden
    for (int l = 0; l < m.n_layer; ++l)
        for (const RkMatrix* lr : {&m.layers[l].w1, &m.layers[l].a1, &m.layers[l].v1, &m.layers[l].g1})
            D = lr->cols > D ? lr->cols : D;
    const size_t bc = static_cast<size_t>(B) * C;
    const size_t state_size = static_cast<size_t>(H) * N * N;

    const auto time_mix = [&](const V7Layer& ly, int l, const rk::LayerState& st) {
        // norm, token shift, projections
        rk::norm_and_shift<rk::shift_mix>(B, C, m.ln_eps, bf.x, ly.ln1_w, ly.ln1_b, st.a_prev, bf.xa,
                                          {ly.x_r, ly.x_w, ly.x_k, ly.x_v, ly.x_a, ly.x_g},
                                          {bf.mr, mw, bf.mk, mv, ma, mg});
        if (rk_matmul(&ly.receptance, B, bf.mr, r) || rk_matmul(&ly.key, B, bf.mk, k) ||
            rk_matmul(&ly.value, B, mv, v))
            return 2;
        if (l == 0)
            for (size_t i = 0; i < bc; ++i) v_first[i] = v[i];

        // the low-rank chains (row, chain) in parallel, then the WKV, norm, bonus and gate (row, head)
        {
            const rk::PhaseTimer mix_timer(RK_PHASE_MIX);
#pragma omp parallel for schedule(dynamic, 1)
            for (int task = 0; task < B * 4; ++task) {
                const int b = task / 4;
                const size_t o = static_cast<size_t>(b) * C;
                thread_local std::vector<float> chain_buf;
                float* t = rk::scratch(chain_buf, static_cast<size_t>(D) + C);
                low_rank_chain(task % 4, ly, l, C, mw + o, ma + o, mv + o, mg + o, w + o, a + o, g + o, v + o,
                               v_first + o, t, t + D);
            }
#pragma omp parallel for schedule(static)
            for (int task = 0; task < B * H; ++task) {
                const int b = task / H, hn = (task % H) * N;
                const size_t o = static_cast<size_t>(b) * C + hn;
                const size_t sh = static_cast<size_t>(b) * state_size + static_cast<size_t>(hn) * N;
                thread_local std::vector<float> head_buf;
                float* kk = rk::scratch(head_buf, 3 * static_cast<size_t>(N));
                float *rh = r + o, *kh = k + o, *vh = v + o, *yh = y + o;
                wkv_head(N, rh, w + o, kh, vh, a + o, ly.k_k + hn, ly.k_a + hn, st.s_in + sh, st.s_out + sh, yh,
                         kk, kk + N, kk + 2 * N);
                rk::layer_norm(yh, ly.lnx_w + hn, ly.lnx_b + hn, N, m.gn_eps, yh);  // GroupNorm: per head
                float bonus = 0.0f;
                for (int j = 0; j < N; ++j) bonus += rh[j] * kh[j] * ly.r_k[hn + j];
                for (int j = 0; j < N; ++j) yh[j] = (yh[j] + bonus * vh[j]) * g[o + j];
            }
        }
        return rk_matmul(&ly.output, B, y, bf.out) ? 2 : 0;
    };
    return rk::run_step<rk::shift_mix>(m, B, io, state_size, bf, time_mix);
}

}  // namespace

RK_STEP_ENTRY(rk_v7_step, V7Model, step)
