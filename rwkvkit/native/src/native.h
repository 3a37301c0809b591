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
void rk_matmul(const RkMatrix* w, int32_t B, const float* x, float* y);

// Library version and the features it was compiled for (for `rwkvkit info`).
const char* rk_build_info(void);
}
