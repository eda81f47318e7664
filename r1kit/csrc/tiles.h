// Register tiles shared by the CPU kernels (csrc/*.cpp): dot products of a few rows against a few rows, vectorised
// along their common length and summed across lanes at the end.
#pragma once

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

namespace r1kit {

// The eight lanes of each of a0..a3 summed: (sum a0, sum a1, sum a2, sum a3).
inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Rows x0, x1 by weight rows w[0..3] (stride K), K a multiple of 8 -> y0[0..3], y1[0..3]. With PF, also pulls the
// 4K floats from `pf` on into L1 (two lines an iteration), so the next weight rows arrive while these are computed.
template <bool PF>
inline void tile2x4(const float* x0, const float* x1, const float* w, int64_t K, float* y0, float* y1,
                    const float* pf) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t k = 0; k < K; k += 8) {
    if (PF) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + 4 * k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + 4 * k + 16), _MM_HINT_T0);
    }
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + K + k);
    const __m256 w2 = _mm256_loadu_ps(w + 2 * K + k), w3 = _mm256_loadu_ps(w + 3 * K + k);
    const __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k);
    a0 = _mm256_fmadd_ps(u, w0, a0), a1 = _mm256_fmadd_ps(u, w1, a1);
    a2 = _mm256_fmadd_ps(u, w2, a2), a3 = _mm256_fmadd_ps(u, w3, a3);
    b0 = _mm256_fmadd_ps(v, w0, b0), b1 = _mm256_fmadd_ps(v, w1, b1);
    b2 = _mm256_fmadd_ps(v, w2, b2), b3 = _mm256_fmadd_ps(v, w3, b3);
  }
  _mm_storeu_ps(y0, sum4(a0, a1, a2, a3));
  _mm_storeu_ps(y1, sum4(b0, b1, b2, b3));
}

}  // namespace r1kit
#endif
