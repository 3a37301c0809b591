// Small per-row operations the one-token steps share (header-only, inlined into each step file).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rk {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// out = LayerNorm(x) * w + b over C values (fp32), eps as torch's.
inline void layer_norm(const float* x, const float* w, const float* b, int C, float eps, float* out) {
    double mean = 0.0, var = 0.0;
    for (int i = 0; i < C; ++i) mean += x[i];
    mean /= C;
    for (int i = 0; i < C; ++i) {
        double d = x[i] - mean;
        var += d * d;
    }
    var /= C;
    const float inv = 1.0f / std::sqrt(static_cast<float>(var) + eps);
    const float m = static_cast<float>(mean);
    for (int i = 0; i < C; ++i) out[i] = (x[i] - m) * inv * w[i] + b[i];
}

// In place per-head GroupNorm of y (H groups of N values), then * w + b (C = H * N).
inline void group_norm(float* y, const float* w, const float* b, int H, int N, float eps) {
    for (int h = 0; h < H; ++h) layer_norm(y + h * N, w + h * N, b + h * N, N, eps, y + h * N);
}

// bf16 bits <-> fp32 (round to nearest even, as torch).
inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

}  // namespace rk
