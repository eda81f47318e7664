// y = x w^T + b for the few rows of a decode step on CPU: r1kit_cpu::small_linear(x (..., K), w (N, K), b (N,)?).
//
// At a handful of rows a projection is a stream of weights with little arithmetic on each, and BLAS's small-M
// paths run it well below the machine's FMA rate (bench/generate.py). Here each thread takes a run of eight weight
// rows at a time and computes their dot products with every row of x while those weight rows sit in L1: two rows of
// x by four weight rows in eight accumulators (one row of x by eight when a row is left over), vectorised along K,
// then summed across lanes with a tree of adds. The weights are read from memory once, in their nn.Linear layout;
// nothing is repacked. More than kMaxRows rows (a prefill, a training batch) go to at::linear.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 32;  // past this, BLAS's blocked GEMM is as fast (measured on 256-4,096 x 256-768 weights)

#if defined(CPU_CAPABILITY_AVX2)
// The eight lanes of each of a0..a3 summed: (sum a0, sum a1, sum a2, sum a3).
inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Rows x0, x1 by weight rows w[0..3] (stride K), K a multiple of 8 -> y0[0..3], y1[0..3].
inline void tile2x4(const float* x0, const float* x1, const float* w, int64_t K, float* y0, float* y1) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t k = 0; k < K; k += 8) {
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

// Rows x0..x3 by weight rows w[0..2] -> y[r * ldy + j]: twelve accumulators, three weight and one x register.
inline void tile4x3(const float* x, int64_t K, const float* w, float* y, int64_t ldy) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;
  __m256 c0 = a0, c1 = a0, c2 = a0, d0 = a0, d1 = a0, d2 = a0;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + K + k), w2 = _mm256_loadu_ps(w + 2 * K + k);
    __m256 u = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(u, w0, a0), a1 = _mm256_fmadd_ps(u, w1, a1), a2 = _mm256_fmadd_ps(u, w2, a2);
    u = _mm256_loadu_ps(x + K + k);
    b0 = _mm256_fmadd_ps(u, w0, b0), b1 = _mm256_fmadd_ps(u, w1, b1), b2 = _mm256_fmadd_ps(u, w2, b2);
    u = _mm256_loadu_ps(x + 2 * K + k);
    c0 = _mm256_fmadd_ps(u, w0, c0), c1 = _mm256_fmadd_ps(u, w1, c1), c2 = _mm256_fmadd_ps(u, w2, c2);
    u = _mm256_loadu_ps(x + 3 * K + k);
    d0 = _mm256_fmadd_ps(u, w0, d0), d1 = _mm256_fmadd_ps(u, w1, d1), d2 = _mm256_fmadd_ps(u, w2, d2);
  }
  float t[12];
  _mm_storeu_ps(t, sum4(a0, a1, a2, b0));
  _mm_storeu_ps(t + 4, sum4(b1, b2, c0, c1));
  _mm_storeu_ps(t + 8, sum4(c2, d0, d1, d2));
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 3; ++j) y[r * ldy + j] = t[r * 3 + j];
}

// Row x0 by weight rows w[0..7] -> y0[0..7]: eight FMA chains side by side.
inline void tile1x8(const float* x0, const float* w, int64_t K, float* y0) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 u = _mm256_loadu_ps(x0 + k);
    a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + k), a0);
    a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + K + k), a1);
    a2 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 2 * K + k), a2);
    a3 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 3 * K + k), a3);
    a4 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 4 * K + k), a4);
    a5 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 5 * K + k), a5);
    a6 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 6 * K + k), a6);
    a7 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 7 * K + k), a7);
  }
  _mm_storeu_ps(y0, sum4(a0, a1, a2, a3));
  _mm_storeu_ps(y0 + 4, sum4(a4, a5, a6, a7));
}
#endif

// One dot product, for the rows and columns the tiles leave over.
inline float dot(const float* a, const float* b, int64_t K) {
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += a[k] * b[k];
  return s;
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "small_linear: x (..., K) and w (N, K) expected");
  const int64_t K = w.size(1), N = w.size(0), M = K ? x.numel() / K : 0;
  const bool tiled = x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() &&
                     (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous()));
  if (M > kMaxRows || M == 0 || !tiled) return at::linear(x, w, bias);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  const float* X = xc.data_ptr<float>();
  const float* W = wc.data_ptr<float>();
  const float* Bias = bias ? bias->data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();

  const int64_t blocks = (N + 7) / 8;
  // about 64k multiply-adds a thread at least: a smaller share costs more to hand out than it saves
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 8 * M * K));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float t0[8], t1[8];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * 8, nn = std::min<int64_t>(8, N - n0);
      const float* wb = W + n0 * K;
      int64_t m = 0;
#if defined(CPU_CAPABILITY_AVX2)
      if (nn == 8 && K % 8 == 0) {
        for (; m + 2 <= M; m += 2) {
          tile2x4(X + m * K, X + (m + 1) * K, wb, K, t0, t1);
          tile2x4(X + m * K, X + (m + 1) * K, wb + 4 * K, K, t0 + 4, t1 + 4);
          for (int j = 0; j < 8; ++j) {
            Y[m * N + n0 + j] = t0[j] + (Bias ? Bias[n0 + j] : 0.f);
            Y[(m + 1) * N + n0 + j] = t1[j] + (Bias ? Bias[n0 + j] : 0.f);
          }
        }
        if (m < M) {
          tile1x8(X + m * K, wb, K, t0);
          for (int j = 0; j < 8; ++j) Y[m * N + n0 + j] = t0[j] + (Bias ? Bias[n0 + j] : 0.f);
          ++m;
        }
      }
#endif
      for (; m < M; ++m)
        for (int64_t j = 0; j < nn; ++j)
          Y[m * N + n0 + j] = dot(X + m * K, wb + j * K, K) + (Bias ? Bias[n0 + j] : 0.f);
    }
  });
  return y;
}


at::Tensor small_linear43(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / K;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>(); const float* W = w.data_ptr<float>(); float* Y = y.data_ptr<float>();
  const int64_t blocks = N / 12;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 12 * M * K));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * 12;
      for (int64_t m = 0; m + 4 <= M; m += 4)
        for (int j = 0; j < 12; j += 3) tile4x3(X + m * K, K, W + (n0 + j) * K, Y + m * N + n0 + j, N);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1kit_cpu, m) {
  m.def("small_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.impl("small_linear", c10::DispatchKey::CPU, &small_linear);
  m.def("small_linear43(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.impl("small_linear43", c10::DispatchKey::CPU, &small_linear43);
}
