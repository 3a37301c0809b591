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
#include <cmath>
#include <vector>

#include "native.h"
#include "ops.h"

extern "C" {

struct V7Layer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const float *x_r, *x_w, *x_k, *x_v, *x_a, *x_g;
    const float *w0, *a0, *v0, *k_k, *k_a, *r_k, *lnx_w, *lnx_b, *ffn_x_k;
    RkMatrix w1, w2, a1, a2, v1, v2, g1, g2;                        // low rank, (in, out) layout
    RkMatrix receptance, key, value, output, ffn_key, ffn_value;  // (out, in)
    int32_t has_value_lora;
    int32_t reserved;
};

struct V7Model {
    int32_t n_layer, C, H, N, F, V;
    float ln_eps, gn_eps;
    const float *ln0_w, *ln0_b, *ln_out_w, *ln_out_b;
    RkMatrix head;
    const V7Layer* layers;
};

}  // extern "C"

namespace {

constexpr float LOG_DECAY_SCALE = 0.60653065971263342f;  // exp(-0.5)

struct Buffers {
    std::vector<float> all;
    // (B, C) each: residual, normed input, the six mixes, r k v, layer 0's v, y, a product's output,
    // the log decay, the iclr and the gate
    float *x, *xa, *mr, *mw, *mk, *mv, *ma, *mg, *r, *k, *v, *v_first, *y, *out, *w, *a, *g;
    float* hidden;  // (B, F)
};

Buffers& buffers(int B, int C, int F) {
    thread_local Buffers buf;
    const size_t bc = static_cast<size_t>(B) * C;
    float* p = rk::scratch(buf.all, 17 * bc + static_cast<size_t>(B) * F);
    for (float** slot : {&buf.x, &buf.xa, &buf.mr, &buf.mw, &buf.mk, &buf.mv, &buf.ma, &buf.mg, &buf.r, &buf.k,
                         &buf.v, &buf.v_first, &buf.y, &buf.out, &buf.w, &buf.a, &buf.g}) {
        *slot = p;
        p += bc;
    }
    buf.hidden = p;
    return buf;
}

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

}  // namespace

extern "C" int32_t rk_v7_step(const void* model_ptr, int32_t B, const float* x_in, const float* att_in,
                              const float* wkv_in, const float* ffn_in, float* att_out, float* wkv_out,
                              float* ffn_out, float* logits) {
    const rk::PhaseTimer step_timer(RK_PHASE_STEP);
    const V7Model& m = *static_cast<const V7Model*>(model_ptr);
    const int C = m.C, H = m.H, N = m.N, F = m.F;
    if (B < 1 || H * N != C) return 1;
    Buffers& bf = buffers(B, C, F);
    int D = 1;  // the widest low-rank hidden
    for (int l = 0; l < m.n_layer; ++l)
        for (const RkMatrix* lr : {&m.layers[l].w1, &m.layers[l].a1, &m.layers[l].v1, &m.layers[l].g1})
            D = lr->cols > D ? lr->cols : D;
    const size_t bc = static_cast<size_t>(B) * C;
    for (int b = 0; b < B; ++b) rk::layer_norm(x_in + b * C, m.ln0_w, m.ln0_b, C, m.ln_eps, bf.x + b * C);

    for (int l = 0; l < m.n_layer; ++l) {
        const V7Layer& ly = m.layers[l];
        const float* a_prev = att_in + l * bc;
        const float* f_prev = ffn_in + l * bc;
        float* a_next = att_out + l * bc;
        float* f_next = ffn_out + l * bc;
        const size_t state_size = static_cast<size_t>(H) * N * N;
        const float* s_in = wkv_in + static_cast<size_t>(l) * B * state_size;
        float* s_out = wkv_out + static_cast<size_t>(l) * B * state_size;

        // time mix: norm, token shift, projections
        for (int b = 0; b < B; ++b) {
            const size_t o = static_cast<size_t>(b) * C;
            rk::layer_norm(bf.x + o, ly.ln1_w, ly.ln1_b, C, m.ln_eps, bf.xa + o);
            rk::shift_mix(bf.xa + o, a_prev + o, ly.x_r, C, bf.mr + o);
            rk::shift_mix(bf.xa + o, a_prev + o, ly.x_w, C, bf.mw + o);
            rk::shift_mix(bf.xa + o, a_prev + o, ly.x_k, C, bf.mk + o);
            rk::shift_mix(bf.xa + o, a_prev + o, ly.x_v, C, bf.mv + o);
            rk::shift_mix(bf.xa + o, a_prev + o, ly.x_a, C, bf.ma + o);
            rk::shift_mix(bf.xa + o, a_prev + o, ly.x_g, C, bf.mg + o);
        }
        if (rk_matmul(&ly.receptance, B, bf.mr, bf.r) || rk_matmul(&ly.key, B, bf.mk, bf.k) ||
            rk_matmul(&ly.value, B, bf.mv, bf.v))
            return 2;
        if (l == 0)
            for (size_t i = 0; i < bc; ++i) bf.v_first[i] = bf.v[i];

        // the low-rank chains (row, chain) in parallel, then the WKV, norm, bonus and gate (row, head)
        {
            const rk::PhaseTimer mix_timer(RK_PHASE_MIX);
#pragma omp parallel for schedule(dynamic, 1)
            for (int task = 0; task < B * 4; ++task) {
                const int b = task / 4;
                const size_t o = static_cast<size_t>(b) * C;
                thread_local std::vector<float> chain_buf;
                float* t = rk::scratch(chain_buf, static_cast<size_t>(D) + C);
                low_rank_chain(task % 4, ly, l, C, bf.mw + o, bf.ma + o, bf.mv + o, bf.mg + o, bf.w + o,
                               bf.a + o, bf.g + o, bf.v + o, bf.v_first + o, t, t + D);
            }
#pragma omp parallel for schedule(static)
            for (int task = 0; task < B * H; ++task) {
                const int b = task / H, hn = (task % H) * N;
                const size_t o = static_cast<size_t>(b) * C + hn;
                const size_t sh = static_cast<size_t>(b) * state_size + static_cast<size_t>(hn) * N;
                thread_local std::vector<float> head_buf;
                float* kk = rk::scratch(head_buf, 3 * static_cast<size_t>(N));
                float *r = bf.r + o, *k = bf.k + o, *v = bf.v + o, *y = bf.y + o;
                wkv_head(N, r, bf.w + o, k, v, bf.a + o, ly.k_k + hn, ly.k_a + hn, s_in + sh, s_out + sh, y, kk,
                         kk + N, kk + 2 * N);
                rk::layer_norm(y, ly.lnx_w + hn, ly.lnx_b + hn, N, m.gn_eps, y);  // GroupNorm: per head
                float bonus = 0.0f;
                for (int j = 0; j < N; ++j) bonus += r[j] * k[j] * ly.r_k[hn + j];
                for (int j = 0; j < N; ++j) y[j] = (y[j] + bonus * v[j]) * bf.g[o + j];
            }
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
            rk::shift_mix(f_next + o, f_prev + o, ly.ffn_x_k, C, bf.mk + o);
        }
        if (rk_matmul(&ly.ffn_key, B, bf.mk, bf.hidden)) return 2;
        const size_t bf_size = static_cast<size_t>(B) * F;
        for (size_t i = 0; i < bf_size; ++i) {
            const float h = bf.hidden[i] > 0.0f ? bf.hidden[i] : 0.0f;
            bf.hidden[i] = h * h;
        }
        if (rk_matmul(&ly.ffn_value, B, bf.hidden, bf.out)) return 2;
        for (size_t i = 0; i < bc; ++i) bf.x[i] += bf.out[i];
    }
    for (int b = 0; b < B; ++b) rk::layer_norm(bf.x + b * C, m.ln_out_w, m.ln_out_b, C, m.ln_eps, bf.xa + b * C);
    return rk_matmul(&m.head, B, bf.xa, logits) ? 2 : 0;
}
