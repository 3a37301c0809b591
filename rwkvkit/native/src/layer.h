// The skeleton every one-token step shares (header-only, inlined into step_v4..v7.cpp): the C model
// struct, the thread's scratch, ln0, each layer's slices of the state, the residual after the time mix,
// the channel mix (with receptance for RWKV-4 / 5.2 / 6, without for RWKV-7), ln_out + head and the C
// entry point (RK_STEP_ENTRY). A step file keeps its layer struct and its time mix (rk::run_step's
// time_mix). Python mirrors StepModel and ChannelMix in rwkvkit/native/step.py: keep the fields in the
// same order.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "native.h"
#include "ops.h"

namespace rk {

// A layer's channel mix: ln2, the token-shift weights of the key and receptance inputs, and the
// projections key (F, C), receptance (C, C), value (C, F). RWKV-7 has none of receptance (mix_r null,
// receptance.data null): x += Wv relu(Wk xk)^2, ungated.
struct ChannelMix {
    const float *ln_w, *ln_b, *mix_k, *mix_r;
    RkMatrix key, receptance, value;
};

// Every version's C model: sizes, norms, head and its layers. RWKV-4 has no heads: H = 1 and N its
// time-mix width dim_att (may differ from C), gn_eps unused.
template <typename Layer>
struct StepModel {
    int32_t n_layer, C, H, N, F, V;
    float ln_eps, gn_eps;
    const float *ln0_w, *ln0_b, *ln_out_w, *ln_out_b;
    RkMatrix head;
    const Layer* layers;
};

// The C entry's tensors (rwkvkit.native.step.NativeStep): x (B, C), the shifts (L, B, C), the WKV
// states (L, B, row state) in and out, logits (B, V).
struct StepIO {
    const float *x_in, *att_in, *wkv_in, *ffn_in;
    float *att_out, *wkv_out, *ffn_out, *logits;
};

// One layer's slices of StepIO: the time mix's and the channel mix's token shifts (B, C), the WKV state.
struct LayerState {
    const float *a_prev, *f_prev, *s_in;
    float *a_next, *f_next, *s_out;
};

// The scratch run_step and the channel mix use, each slot (B, W) but hidden (B, F); the time mix may use
// mk and mr too (the channel mix writes them afresh). RWKV-7 leaves gate unused.
struct StepScratch {
    float *x, *xa, *out;    // the residual, the time mix's normed input, a product's output
    float *mk, *mr, *gate;  // the channel mix's token-shifted inputs and its gate
    float* hidden;
    float* tail;  // the `tail` floats a version asked step_scratch for
};

// Points the shared slots, then each of the version's own (B, W) slots `own`, then `tail` more floats into
// one buffer that lives for the thread (steps reuse it from token to token).
inline StepScratch step_scratch(int B, int W, int F, std::initializer_list<float**> own, size_t tail = 0) {
    thread_local std::vector<float> buf;
    StepScratch s{};
    const size_t bw = static_cast<size_t>(B) * W, bf = static_cast<size_t>(B) * F;
    float* p = scratch(buf, (6 + own.size()) * bw + bf + tail);
    for (float** slot : {&s.x, &s.xa, &s.out, &s.mk, &s.mr, &s.gate}) {
        *slot = p;
        p += bw;
    }
    for (float** slot : own) {
        *slot = p;
        p += bw;
    }
    s.hidden = p;
    s.tail = p + bf;
    return s;
}

// A token shift over C values: lerp_mix (RWKV-4 / 5.2) or shift_mix (RWKV-6 / 7), see ops.h.
using TokenShift = void (*)(const float* x, const float* prev, const float* mix, int C, float* out);

// Row by row: normed = LayerNorm(x) * ln_w + ln_b, then out[i] = shift(normed, prev, mix[i]) for each of
// the n token-shift weights (every array (B, C)).
template <TokenShift shift, size_t n>
inline void norm_and_shift(int B, int C, float eps, const float* x, const float* ln_w, const float* ln_b,
                           const float* prev, float* normed, const float* const (&mix)[n],
                           float* const (&out)[n]) {
    for (int b = 0; b < B; ++b) {
        const size_t o = static_cast<size_t>(b) * C;
        layer_norm(x + o, ln_w, ln_b, C, eps, normed + o);
        for (size_t i = 0; i < n; ++i) shift(normed + o, prev + o, mix[i], C, out[i] + o);
    }
}

// The channel mix of one layer on the residual x = s.x (B, C): f_next = LayerNorm_2(x) (the shift the next
// token reads), xk, xr = shift(f_next, f_prev, mix_{k,r}), then x += sigmoid(Wr xr) * Wv(relu(Wk xk)^2)
// (or x += Wv(relu(Wk xk)^2) without receptance). Returns 0, or 2 when a product fails.
template <TokenShift shift>
inline int channel_mix(const ChannelMix& w, int B, int C, int F, float eps, const float* f_prev, float* f_next,
                       const StepScratch& s) {
    const bool gated = w.receptance.data != nullptr;
    if (gated)
        norm_and_shift<shift>(B, C, eps, s.x, w.ln_w, w.ln_b, f_prev, f_next, {w.mix_k, w.mix_r}, {s.mk, s.mr});
    else
        norm_and_shift<shift>(B, C, eps, s.x, w.ln_w, w.ln_b, f_prev, f_next, {w.mix_k}, {s.mk});
    if (rk_matmul(&w.key, B, s.mk, s.hidden) || (gated && rk_matmul(&w.receptance, B, s.mr, s.gate))) return 2;
    const size_t bf = static_cast<size_t>(B) * F, bc = static_cast<size_t>(B) * C;
    for (size_t i = 0; i < bf; ++i) {
        const float h = s.hidden[i] > 0.0f ? s.hidden[i] : 0.0f;
        s.hidden[i] = h * h;
    }
    if (rk_matmul(&w.value, B, s.hidden, s.out)) return 2;
    if (gated)
        for (size_t i = 0; i < bc; ++i) s.x[i] += sigmoid(s.gate[i]) * s.out[i];
    else
        for (size_t i = 0; i < bc; ++i) s.x[i] += s.out[i];
    return 0;
}

// One token through every layer of m: x = ln0(x_in); per layer, time_mix(layer, l, its LayerState)
// (reads s.x, leaves LayerNorm_1(x) in s.xa and its output in s.out; returns 0, or nonzero to stop), the
// residual (a_next = s.xa, x += s.out), the channel mix (its token shift ffn_shift, layer.ffn); then
// logits = head(ln_out(x)). row_state: the floats of one row's WKV state in a layer. Returns 0, or 2 when
// a product fails.
template <TokenShift ffn_shift, typename Layer, typename TimeMix>
int32_t run_step(const StepModel<Layer>& m, int B, const StepIO& io, size_t row_state, const StepScratch& s,
                 TimeMix&& time_mix) {
    const PhaseTimer step_timer(RK_PHASE_STEP);
    const int C = m.C;
    const size_t bc = static_cast<size_t>(B) * C, bs = static_cast<size_t>(B) * row_state;
    for (int b = 0; b < B; ++b) layer_norm(io.x_in + b * C, m.ln0_w, m.ln0_b, C, m.ln_eps, s.x + b * C);

    for (int l = 0; l < m.n_layer; ++l) {
        const Layer& ly = m.layers[l];
        const LayerState st{io.att_in + l * bc, io.ffn_in + l * bc,  io.wkv_in + l * bs,
                            io.att_out + l * bc, io.ffn_out + l * bc, io.wkv_out + l * bs};
        if (time_mix(ly, l, st)) return 2;
        for (size_t i = 0; i < bc; ++i) {
            st.a_next[i] = s.xa[i];
            s.x[i] += s.out[i];
        }
        if (channel_mix<ffn_shift>(ly.ffn, B, C, m.F, m.ln_eps, st.f_prev, st.f_next, s)) return 2;
    }
    for (int b = 0; b < B; ++b) layer_norm(s.x + b * C, m.ln_out_w, m.ln_out_b, C, m.ln_eps, s.xa + b * C);
    return rk_matmul(&m.head, B, s.xa, io.logits) ? 2 : 0;
}

}  // namespace rk

// Defines the C entry point `name` of a version's step (the signature NativeStep in rwkvkit/native/step.py
// calls) as impl(the model as a `const Model&`, B, the tensors as a StepIO).
#define RK_STEP_ENTRY(name, Model, impl)                                                                               \
    extern "C" int32_t name(const void* model, int32_t B, const float* x_in, const float* att_in,                      \
                            const float* wkv_in, const float* ffn_in, float* att_out, float* wkv_out,                  \
                            float* ffn_out, float* logits) {                                                           \
        return impl(*static_cast<const Model*>(model), B,                                                              \
                    {x_in, att_in, wkv_in, ffn_in, att_out, wkv_out, ffn_out, logits});                                \
    }
