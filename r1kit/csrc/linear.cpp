// The few rows of a decode step times a weight matrix, on CPU:
// r1kit_cpu::small_linear(x (..., K), w (N, K), b (N,)?) -> x w^T + b;
// r1kit_cpu::small_experts(x (T, D), gate_up (E, 2I, D), down (E, D, I), indices (T, k), weights (T, k)) -> (T, D):
// routed SwiGLU experts, each expert's weights read once for all the tokens that picked it.
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

#include <cmath>
#include <vector>

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

// Y[m, n0 : n0 + nn] = rows[m] . W[n0 + j] (+ bias) for the rows m < M (each K long, anywhere), nn <= 8.
inline void block(const float* const* rows, int64_t M, const float* W, int64_t n0, int64_t nn, int64_t K,
                  const float* bias, float* Y, int64_t ldy) {
  const float* wb = W + n0 * K;
  float t0[8], t1[8];
  int64_t m = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if (nn == 8 && K % 8 == 0) {
    for (; m + 2 <= M; m += 2) {
      tile2x4(rows[m], rows[m + 1], wb, K, t0, t1);
      tile2x4(rows[m], rows[m + 1], wb + 4 * K, K, t0 + 4, t1 + 4);
      for (int j = 0; j < 8; ++j) {
        Y[m * ldy + n0 + j] = t0[j] + (bias ? bias[n0 + j] : 0.f);
        Y[(m + 1) * ldy + n0 + j] = t1[j] + (bias ? bias[n0 + j] : 0.f);
      }
    }
    if (m < M) {
      tile1x8(rows[m], wb, K, t0);
      for (int j = 0; j < 8; ++j) Y[m * ldy + n0 + j] = t0[j] + (bias ? bias[n0 + j] : 0.f);
      ++m;
    }
  }
#endif
  for (; m < M; ++m)
    for (int64_t j = 0; j < nn; ++j) Y[m * ldy + n0 + j] = dot(rows[m], wb + j * K, K) + (bias ? bias[n0 + j] : 0.f);
}

// about 64k multiply-adds a thread at least: a smaller share costs more to hand out than it saves
inline int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_item)); }

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
  std::vector<const float*> rows(M);
  for (int64_t m = 0; m < M; ++m) rows[m] = xc.data_ptr<float>() + m * K;
  const float* W = wc.data_ptr<float>();
  const float* B = bias ? bias->data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, (N + 7) / 8, grain(8 * M * K), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) block(rows.data(), M, W, b * 8, std::min<int64_t>(8, N - b * 8), K, B, Y, N);
  });
  return y;
}

// Y[s : s + count[e]] = rows[s : s + count[e]] W[e]^T (W: (E, N, K)), s = start[e], for every expert e in `used`;
// the work items are (expert, block of 8 of its weight rows).
void experts_times(const std::vector<int64_t>& used, const std::vector<int64_t>& start,
                   const std::vector<int64_t>& count, const float* const* rows, const float* W, int64_t N, int64_t K,
                   float* Y) {
  const int64_t U = used.size(), blocks = (N + 7) / 8;
  const int64_t rows_each = U ? std::max<int64_t>(1, start.back() / U) : 1;  // pairs an expert, on average
  at::parallel_for(0, U * blocks, grain(8 * K * rows_each), [&](int64_t b0, int64_t b1) {
    for (int64_t it = b0; it < b1; ++it) {
      const int64_t e = used[it / blocks], n0 = (it % blocks) * 8, s = start[e];
      block(rows + s, count[e], W + e * N * K, n0, std::min<int64_t>(8, N - n0), K, nullptr, Y + s * N, N);
    }
  });
}

at::Tensor small_experts(const at::Tensor& x_, const at::Tensor& gate_up_, const at::Tensor& down_,
                         const at::Tensor& indices_, const at::Tensor& weights_) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && gate_up_.scalar_type() == at::kFloat &&
              down_.scalar_type() == at::kFloat, "small_experts: float32 only");
  const at::Tensor x = x_.contiguous(), gate_up = gate_up_.contiguous(), down = down_.contiguous();
  const at::Tensor indices = indices_.to(at::kLong).contiguous(), weights = weights_.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), D = x.size(1), E = gate_up.size(0), I2 = gate_up.size(1), I = I2 / 2, k = indices.size(1);
  TORCH_CHECK(gate_up.size(2) == D && down.size(0) == E && down.size(1) == D && down.size(2) == I &&
              indices.size(0) == T && weights.sizes() == indices.sizes(), "small_experts: shape mismatch");
  // the (token, expert) pairs grouped by expert: expert g's pairs are pair[start[g] : start[g + 1]]
  const int64_t* idx = indices.data_ptr<int64_t>();
  std::vector<int64_t> count(E, 0), start(E + 1, 0), pair(T * k);
  for (int64_t p = 0; p < T * k; ++p) {
    TORCH_CHECK(idx[p] >= 0 && idx[p] < E, "small_experts: expert index out of range");
    ++count[idx[p]];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + count[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < T * k; ++p) pair[fill[idx[p]]++] = p;
  std::vector<int64_t> used;  // experts with at least one pair
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) used.push_back(e);
  const int64_t P = T * k;
  // rows of x for each pair, in expert order; h, the activation, then each pair's output
  std::vector<const float*> xrows(P), arows(P);
  for (int64_t j = 0; j < P; ++j) xrows[j] = x.data_ptr<float>() + (pair[j] / k) * D;
  std::vector<float> h(P * I2), act(P * I), ys(P * D);
  for (int64_t j = 0; j < P; ++j) arows[j] = act.data() + j * I;
  experts_times(used, start, count, xrows.data(), gate_up.data_ptr<float>(), I2, D, h.data());
  for (int64_t j = 0; j < P; ++j)
    for (int64_t i = 0; i < I; ++i) {
      const float g = h[j * I2 + i];
      act[j * I + i] = g / (1.f + std::exp(-g)) * h[j * I2 + I + i];
    }
  experts_times(used, start, count, arows.data(), down.data_ptr<float>(), D, I, ys.data());
  at::Tensor out = at::zeros({T, D}, x.options());
  float* O = out.data_ptr<float>();
  const float* wt = weights.data_ptr<float>();
  for (int64_t j = 0; j < P; ++j) {  // each token's pairs, weighted, in expert order
    const float w = wt[pair[j]];
    float* o = O + (pair[j] / k) * D;
    for (int64_t d = 0; d < D; ++d) o[d] += w * ys[j * D + d];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1kit_cpu, m) {
  m.def("small_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.impl("small_linear", c10::DispatchKey::CPU, &small_linear);
  m.def("small_experts(Tensor x, Tensor gate_up, Tensor down, Tensor indices, Tensor weights) -> Tensor");
  m.impl("small_experts", c10::DispatchKey::CPU, &small_experts);
}
