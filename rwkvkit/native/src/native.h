// rwkvkit native CPU decode: the C ABI shared by every source file of the library.
//
// One matrix descriptor (RkMatrix) for every weight format and one product (rk_matmul); the per-version
// one-token steps (step_v*.cpp) call rk_matmul for their projections and ops.h for the small work.
// Python (rwkvkit/native/matrix.py) mirrors RkMatrix with ctypes: keep the two in the same order.
#pragma once
#include <cstdint>

extern "C" {

enum RkKind : int32_t { RK_F32 = 0, RK_BF16 = 1, RK_I8 = 2, RK_I4 = 3 };

// y (B, rows) = x (B, cols) W^T for W (rows, cols) held in one of the formats:
//   RK_F32  data float (rows, cols) row-major
//   RK_BF16 data uint16 bf16 bits (rows, cols) row-major
//   RK_I8   data int8 (rows, cols) row-major, w = q * scales[n]
//   RK_I4   data uint8 (rows, cols / 2), even k in the low nibble,
//           w = (q - 8) * scales[n, g] + zeros[n, g], g = k / group_size, scales/zeros (rows, cols / group_size)
// ``extra`` is kernel-private data made by matrix.py (e.g. a repacked layout, row sums); may be null.
struct RkMatrix {
    int32_t kind;
    int32_t rows;
    int32_t cols;
    int32_t group_size;
    const void* data;
    const float* scales;
    const float* zeros;
    const void* extra;
};

// x and y fp32, contiguous, B rows each; y is overwritten. Threads: OpenMP (torch's libgomp pool).
// int8 / int4 quantize x to int8 in blocks of 32 first (cols must be a multiple of 32). Returns 0, or
// nonzero for an unknown kind or unsupported shape.
int32_t rk_matmul(const RkMatrix* w, int32_t B, const float* x, float* y);

// The same product as plain loops with fp32 activations (no quantization), accumulated in double.
int32_t rk_matmul_reference(const RkMatrix* w, int32_t B, const float* x, float* y);

// Tests: nonzero makes rk_matmul take int8 / int4 products with fp32 activations (rk_matmul_reference),
// so that a whole quantized step can be compared exactly with the torch model on dequantized weights.
void rk_set_exact_activations(int32_t on);

// Profiling (benchmarks/profile_decode.py): with rk_profile_enable(1), rk_matmul and the steps add the
// seconds they spend to slots: 0 the packed products (rk_matmul), 1 the low-rank products and the WKV
// (RWKV-7's step), 2 a whole step (every version). rk_profile_read copies the slots out and zeroes them.
enum RkPhase : int32_t { RK_PHASE_MATMUL = 0, RK_PHASE_MIX = 1, RK_PHASE_STEP = 2, RK_PHASES = 3 };
void rk_profile_enable(int32_t on);
void rk_profile_read(double* out);

// Library version and the features it was compiled for (for `rwkvkit info`).
const char* rk_build_info(void);
}
