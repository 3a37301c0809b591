// rk_matmul: the projections of a one-token step, for every weight format (see native.h).
// Plain reference loops; the fast kernels replace the bodies, the contract stays.
#include "native.h"
#include "ops.h"

namespace {

float dot_row(const RkMatrix* w, int n, const float* x) {
    const int K = w->cols;
    float acc = 0.0f;
    switch (w->kind) {
        case RK_F32: {
            const float* row = static_cast<const float*>(w->data) + static_cast<int64_t>(n) * K;
            for (int k = 0; k < K; ++k) acc += row[k] * x[k];
            return acc;
        }
        case RK_BF16: {
            const uint16_t* row = static_cast<const uint16_t*>(w->data) + static_cast<int64_t>(n) * K;
            for (int k = 0; k < K; ++k) acc += rk::bf16_to_f32(row[k]) * x[k];
            return acc;
        }
        case RK_I8: {
            const int8_t* row = static_cast<const int8_t*>(w->data) + static_cast<int64_t>(n) * K;
            for (int k = 0; k < K; ++k) acc += row[k] * x[k];
            return acc * w->scales[n];
        }
        case RK_I4: {
            const uint8_t* row = static_cast<const uint8_t*>(w->data) + static_cast<int64_t>(n) * (K / 2);
            const int G = w->group_size, ng = K / G;
            for (int g = 0; g < ng; ++g) {
                float q = 0.0f, s = 0.0f;
                for (int k = g * G; k < (g + 1) * G; ++k) {
                    const int v = (k & 1) ? (row[k >> 1] >> 4) : (row[k >> 1] & 15);
                    q += (v - 8) * x[k];
                    s += x[k];
                }
                acc += q * w->scales[n * ng + g] + s * w->zeros[n * ng + g];
            }
            return acc;
        }
    }
    return 0.0f;
}

}  // namespace

extern "C" void rk_matmul(const RkMatrix* w, int32_t B, const float* x, float* y) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b)
        for (int n = 0; n < w->rows; ++n) y[static_cast<int64_t>(b) * w->rows + n] = dot_row(w, n, x + static_cast<int64_t>(b) * w->cols);
}

extern "C" const char* rk_build_info(void) { return "rwkvkit-native 0 (reference loops)"; }
