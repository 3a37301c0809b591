// rk_matmul: the projections of a one-token step, for every weight format (see native.h).
//
// Every kernel reads each weight row once for all B rows of x (rows of W split across threads), so a
// step is bound by the weights' bytes. fp32 and bf16 multiply fp32 activations directly; int8 and int4
// first quantize the activations to int8 in blocks of 32 (one fp32 scale a block, as llama.cpp's Q8_0)
// and take integer dot products: AVX512-VNNI / AVX-VNNI where the compiler targets it (-march=native),
// AVX2's multiply-add pairs otherwise, and a plain loop on any other CPU. rk_matmul_reference is the
// plain-loop form of every kind without activation quantization (the tests' second reference).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "native.h"
#include "ops.h"

namespace {

constexpr int QBLOCK = 32;  // activation quantization block

// x (B, K) fp32 -> int8 blocks of 32 with one scale each. For int4 (deinterleave), each block is stored
// as its even elements then its odd ones, the order a block's nibbles unpack to (low, then high).
struct QuantizedRows {
    int B = 0, K = 0, blocks = 0;
    std::vector<int8_t> q;     // (B, K)
    std::vector<float> scale;  // (B, K / 32)
    std::vector<float> sum;    // (B, K / 32): the sum of each block's fp32 values (int4 zeros)
};

void quantize_rows(const float* x, int B, int K, bool deinterleave, QuantizedRows& out) {
    out.B = B, out.K = K, out.blocks = K / QBLOCK;
    out.q.resize(static_cast<size_t>(B) * K);
    out.scale.resize(static_cast<size_t>(B) * out.blocks);
    out.sum.resize(static_cast<size_t>(B) * out.blocks);
    for (int b = 0; b < B; ++b) {
        for (int j = 0; j < out.blocks; ++j) {
            const float* xb = x + static_cast<int64_t>(b) * K + j * QBLOCK;
            float amax = 0.0f, s = 0.0f;
            for (int i = 0; i < QBLOCK; ++i) {
                amax = std::max(amax, std::fabs(xb[i]));
                s += xb[i];
            }
            const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            int8_t* qb = out.q.data() + static_cast<int64_t>(b) * K + j * QBLOCK;
            for (int i = 0; i < QBLOCK; ++i) {
                const int at = deinterleave ? (i & 1) * (QBLOCK / 2) + (i >> 1) : i;
                qb[at] = static_cast<int8_t>(std::lrintf(xb[i] * inv));
            }
            out.scale[static_cast<size_t>(b) * out.blocks + j] = d;
            out.sum[static_cast<size_t>(b) * out.blocks + j] = s;
        }
    }
}

#if defined(__AVX2__)
inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Sum of a[i] * b[i] over 32 int8 pairs, as 8 int32 lanes (a in [-127, 127]).
inline __m256i dot32(__m256i a, __m256i b) {
    const __m256i ua = _mm256_sign_epi8(a, a), sb = _mm256_sign_epi8(b, a);  // |a|, b * sign(a)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ua, sb);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ua, sb);
#else
    const __m256i pairs = _mm256_maddubs_epi16(ua, sb);  // int16: |a| * |b| * 2 <= 32258, no overflow
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

// out[i] = the sum of every lane of row i's U accumulators.
template <int NB, int U>
inline void sum_lanes(__m256 (&acc)[NB][U], float* out) {
    for (int i = 0; i < NB; ++i) {
        for (int u = 1; u < U; ++u) acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][u]);
        out[i] = hsum256(acc[i][0]);
    }
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> fp32
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#endif

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return rk::bf16_to_f32(v); }

// ------------------------------------------------------------------------------------- fp32, bf16
// NB rows of x (stride K) against one weight row w (fp32 or bf16), into out[0..NB).

template <int NB, typename T>
inline void dots_float(const T* w, const float* x, int K, float* out) {
    int k0 = 0;
#if defined(__AVX2__)
    constexpr int U = NB == 1 ? 4 : 1;  // one row needs several accumulators to hide the FMA latency
    __m256 acc[NB][U];
    for (int i = 0; i < NB; ++i)
        for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    for (; k0 + 8 * U <= K; k0 += 8 * U)
        for (int u = 0; u < U; ++u) {
            const __m256 wv = load8(w + k0 + 8 * u);
            for (int i = 0; i < NB; ++i) {
                const __m256 xv = _mm256_loadu_ps(x + static_cast<int64_t>(i) * K + k0 + 8 * u);
                acc[i][u] = _mm256_fmadd_ps(wv, xv, acc[i][u]);
            }
        }
    sum_lanes(acc, out);
#else
    for (int i = 0; i < NB; ++i) out[i] = 0.0f;
#endif
    for (int i = 0; i < NB; ++i)
        for (int k = k0; k < K; ++k) out[i] += to_f32(w[k]) * x[static_cast<int64_t>(i) * K + k];
}

// -------------------------------------------------------------------------- int8 block dot products
// NB quantized rows of x against one int8 weight row: sum_j xs_j * sum_{i in block j} wq_i * xq_i.

template <int NB>
inline void dots_i8(const int8_t* w, const QuantizedRows& xq, int b0, float* out) {
    const int K = xq.K, blocks = xq.blocks;
    int j = 0;
#if defined(__AVX2__)
    constexpr int U = NB == 1 ? 2 : 1;
    __m256 acc[NB][U];
    for (int i = 0; i < NB; ++i)
        for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    for (; j + U <= blocks; j += U)
        for (int u = 0; u < U; ++u) {
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (j + u) * QBLOCK));
            for (int i = 0; i < NB; ++i) {
                const size_t row = static_cast<size_t>(b0 + i);
                const int8_t* xb = xq.q.data() + row * K + (j + u) * QBLOCK;
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
                const __m256 d = _mm256_set1_ps(xq.scale[row * blocks + j + u]);
                acc[i][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(xv, wv)), d, acc[i][u]);
            }
        }
    sum_lanes(acc, out);
#else
    for (int i = 0; i < NB; ++i) out[i] = 0.0f;
#endif
    for (; j < blocks; ++j)
        for (int i = 0; i < NB; ++i) {
            const size_t row = static_cast<size_t>(b0 + i);
            int32_t sum = 0;
            for (int e = 0; e < QBLOCK; ++e) sum += w[j * QBLOCK + e] * xq.q[row * K + j * QBLOCK + e];
            out[i] += xq.scale[row * blocks + j] * static_cast<float>(sum);
        }
}

// NB rows against one int4 weight row: sum over groups g of scale_g * sum_{k in g} x_k (q_k - 8) +
// zero_g * sum_{k in g} x_k, x quantized in deinterleaved blocks of 32 (16 weight bytes a block).
template <int NB>
inline void dots_i4(const uint8_t* w, const float* scales, const float* zeros, int group_size,
                    const QuantizedRows& xq, int b0, float* out) {
    const int K = xq.K, blocks = xq.blocks, per_group = group_size / QBLOCK;
    for (int i = 0; i < NB; ++i) out[i] = 0.0f;
    for (int g = 0; g < blocks / per_group; ++g) {
        float dot[NB], xsum[NB];
        for (int i = 0; i < NB; ++i) dot[i] = xsum[i] = 0.0f;
#if defined(__AVX2__)
        __m256 acc[NB];
        for (int i = 0; i < NB; ++i) acc[i] = _mm256_setzero_ps();
#endif
        for (int jj = 0; jj < per_group; ++jj) {
            const int j = g * per_group + jj;
            const uint8_t* wb = w + j * (QBLOCK / 2);
#if defined(__AVX2__)
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb));
            const __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(15));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
            const __m256i q = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
#endif
            for (int i = 0; i < NB; ++i) {
                const size_t row = static_cast<size_t>(b0 + i);
                const int8_t* xb = xq.q.data() + row * K + j * QBLOCK;
                const float d = xq.scale[row * blocks + j];
                xsum[i] += xq.sum[row * blocks + j];
#if defined(__AVX2__)
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(xv, q)), _mm256_set1_ps(d), acc[i]);
#else
                int32_t sum = 0;
                for (int e = 0; e < QBLOCK / 2; ++e)
                    sum += ((wb[e] & 15) - 8) * xb[e] + ((wb[e] >> 4) - 8) * xb[QBLOCK / 2 + e];
                dot[i] += d * static_cast<float>(sum);
#endif
            }
        }
        for (int i = 0; i < NB; ++i) {
#if defined(__AVX2__)
            dot[i] = hsum256(acc[i]);
#endif
            out[i] += scales[g] * dot[i] + zeros[g] * xsum[i];
        }
    }
}

// Rows of W are split across threads; each weight row meets the rows of x four at a time.
template <typename Dots>
void for_rows(int rows, int B, float* y, Dots dots) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int n = 0; n < rows; ++n) {
        float out[4];
        int b = 0;
        for (; b + 4 <= B; b += 4) {
            dots.template operator()<4>(n, b, out);
            for (int i = 0; i < 4; ++i) y[static_cast<int64_t>(b + i) * rows + n] = out[i];
        }
        for (; b < B; ++b) {
            dots.template operator()<1>(n, b, out);
            y[static_cast<int64_t>(b) * rows + n] = out[0];
        }
    }
}

thread_local QuantizedRows tls_quantized;
int exact_activations = 0;  // tests: int8 / int4 with fp32 activations (the reference loops)

}  // namespace

extern "C" void rk_set_exact_activations(int32_t on) { exact_activations = on; }

namespace rk {
int profile_on = 0;
double profile_seconds[RK_PHASES] = {};
}  // namespace rk

extern "C" void rk_profile_enable(int32_t on) { rk::profile_on = on; }

extern "C" void rk_profile_read(double* out) {
    for (int i = 0; i < RK_PHASES; ++i) {
        out[i] = rk::profile_seconds[i];
        rk::profile_seconds[i] = 0.0;
    }
}

extern "C" int32_t rk_matmul(const RkMatrix* w, int32_t B, const float* x, float* y) {
    const rk::PhaseTimer timer(RK_PHASE_MATMUL);
    const int N = w->rows, K = w->cols;
    if (exact_activations && (w->kind == RK_I8 || w->kind == RK_I4)) return rk_matmul_reference(w, B, x, y);
    switch (w->kind) {
        case RK_F32: {
            const float* W = static_cast<const float*>(w->data);
            for_rows(N, B, y, [&]<int NB>(int n, int b, float* out) {
                dots_float<NB>(W + static_cast<int64_t>(n) * K, x + static_cast<int64_t>(b) * K, K, out);
            });
            return 0;
        }
        case RK_BF16: {
            const uint16_t* W = static_cast<const uint16_t*>(w->data);
            for_rows(N, B, y, [&]<int NB>(int n, int b, float* out) {
                dots_float<NB>(W + static_cast<int64_t>(n) * K, x + static_cast<int64_t>(b) * K, K, out);
            });
            return 0;
        }
        case RK_I8: {
            if (K % QBLOCK) return 2;
            QuantizedRows& xq = tls_quantized;
            quantize_rows(x, B, K, false, xq);
            const int8_t* W = static_cast<const int8_t*>(w->data);
            for_rows(N, B, y, [&]<int NB>(int n, int b, float* out) {
                dots_i8<NB>(W + static_cast<int64_t>(n) * K, xq, b, out);
                for (int i = 0; i < NB; ++i) out[i] *= w->scales[n];
            });
            return 0;
        }
        case RK_I4: {
            const int G = w->group_size;
            if (K % QBLOCK || G % QBLOCK || K % G) return 2;
            QuantizedRows& xq = tls_quantized;
            quantize_rows(x, B, K, true, xq);
            const uint8_t* W = static_cast<const uint8_t*>(w->data);
            const int ng = K / G;
            for_rows(N, B, y, [&]<int NB>(int n, int b, float* out) {
                dots_i4<NB>(W + static_cast<int64_t>(n) * (K / 2), w->scales + static_cast<int64_t>(n) * ng,
                            w->zeros + static_cast<int64_t>(n) * ng, G, xq, b, out);
            });
            return 0;
        }
    }
    return 1;
}

// The plain definition of every kind, fp32 activations (no quantization): y = x W^T.
extern "C" int32_t rk_matmul_reference(const RkMatrix* w, int32_t B, const float* x, float* y) {
    const int N = w->rows, K = w->cols;
    for (int b = 0; b < B; ++b) {
        const float* xb = x + static_cast<int64_t>(b) * K;
        for (int n = 0; n < N; ++n) {
            double acc = 0.0;
            for (int k = 0; k < K; ++k) {
                const int64_t i = static_cast<int64_t>(n) * K + k;
                float v;
                switch (w->kind) {
                    case RK_F32: v = static_cast<const float*>(w->data)[i]; break;
                    case RK_BF16: v = rk::bf16_to_f32(static_cast<const uint16_t*>(w->data)[i]); break;
                    case RK_I8: v = static_cast<const int8_t*>(w->data)[i] * w->scales[n]; break;
                    case RK_I4: {
                        const uint8_t byte = static_cast<const uint8_t*>(w->data)[i / 2];
                        const int q = (k & 1) ? (byte >> 4) : (byte & 15);
                        const int64_t g = static_cast<int64_t>(n) * (K / w->group_size) + k / w->group_size;
                        v = (q - 8) * w->scales[g] + w->zeros[g];
                        break;
                    }
                    default: return 1;
                }
                acc += static_cast<double>(v) * xb[k];
            }
            y[static_cast<int64_t>(b) * N + n] = static_cast<float>(acc);
        }
    }
    return 0;
}

extern "C" const char* rk_build_info(void) {
    return "rwkvkit-native 1 ("
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
           "avx512-vnni"
#elif defined(__AVXVNNI__)
           "avx-vnni"
#elif defined(__AVX2__)
           "avx2"
#else
           "portable"
#endif
#if defined(__AVX512BF16__)
           ", avx512-bf16"
#endif
           ")";
}
