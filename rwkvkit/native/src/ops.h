// Small per-row operations the one-token steps share (header-only, inlined into each step file).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "native.h"

namespace rk {

extern int profile_on;
extern double profile_seconds[RK_PHASES];

// Adds the seconds between its construction and destruction to one profile slot (when profiling).
struct PhaseTimer {
    int phase;
    double start;
    explicit PhaseTimer(int p) : phase(p), start(profile_on ? omp_get_wtime() : 0.0) {}
    ~PhaseTimer() {
        if (profile_on) profile_seconds[phase] += omp_get_wtime() - start;
    }
};

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// bf16 bits -> fp32.
inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// out = LayerNorm(x) * w + b over C values (fp32, biased variance, as torch).
inline void layer_norm(const float* x, const float* w, const float* b, int C, float eps, float* out) {
    float mean = 0.0f;
#pragma omp simd reduction(+ : mean)
    for (int i = 0; i < C; ++i) mean += x[i];
    mean /= C;
    float var = 0.0f;
#pragma omp simd reduction(+ : var)
    for (int i = 0; i < C; ++i) var += (x[i] - mean) * (x[i] - mean);
    var /= C;
    const float inv = 1.0f / std::sqrt(var + eps);
    for (int i = 0; i < C; ++i) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

// In place per-head GroupNorm of y (H groups of N values), then * w + b (C = H * N).
inline void group_norm(float* y, const float* w, const float* b, int H, int N, float eps) {
    for (int h = 0; h < H; ++h) layer_norm(y + h * N, w + h * N, b + h * N, N, eps, y + h * N);
}

// out = x + (prev - x) * mix, the v6 / v7 token shift, over C values.
inline void shift_mix(const float* x, const float* prev, const float* mix, int C, float* out) {
#pragma omp simd
    for (int i = 0; i < C; ++i) out[i] = x[i] + (prev[i] - x[i]) * mix[i];
}

// out = x * mix + prev * (1 - mix), the v4 / v5.2 token shift (as rwkvkit.models.layers.lerp_shift).
inline void lerp_mix(const float* x, const float* prev, const float* mix, int C, float* out) {
#pragma omp simd
    for (int i = 0; i < C; ++i) out[i] = x[i] * mix[i] + prev[i] * (1.0f - mix[i]);
}

inline float silu(float x) { return x * sigmoid(x); }

// y (cols) = x (rows) W for a low-rank matrix W stored (rows = in, cols = out) row-major, fp32 or bf16
// (how the checkpoints hold w1, a1, ...: x @ W, not x W^T).
inline void matvec_kn(const RkMatrix& w, const float* x, float* y) {
    const int K = w.rows, N = w.cols;
    for (int n = 0; n < N; ++n) y[n] = 0.0f;
    if (w.kind == RK_F32) {
        const float* W = static_cast<const float*>(w.data);
        for (int k = 0; k < K; ++k) {
            const float xk = x[k];
            const float* row = W + static_cast<int64_t>(k) * N;
#pragma omp simd
            for (int n = 0; n < N; ++n) y[n] += xk * row[n];
        }
    } else {
        const uint16_t* W = static_cast<const uint16_t*>(w.data);
        for (int k = 0; k < K; ++k) {
            const float xk = x[k];
            const uint16_t* row = W + static_cast<int64_t>(k) * N;
#pragma omp simd
            for (int n = 0; n < N; ++n) {
                const uint32_t bits = static_cast<uint32_t>(row[n]) << 16;
                float f;
                __builtin_memcpy(&f, &bits, 4);
                y[n] += xk * f;
            }
        }
    }
}

// A scratch buffer of n floats that lives for the thread (steps reuse it from token to token).
inline float* scratch(std::vector<float>& buf, size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

}  // namespace rk
