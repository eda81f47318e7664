// The few rows of a decode step times a weight matrix, on CPU:
// r1kit_cpu::small_linear(x (..., K), w (N, K), b (N,)?) -> x w^T + b;
// r1kit_cpu::small_linear2 / small_linear3(x, w0, b0, w1, b1[, w2, b2]) -> one output per weight, in one call;
// r1kit_cpu::small_experts(x (T, D), gate_up (E, 2I, D), down (E, D, I), indices (T, k), weights (T, k)) -> (T, D):
// routed SwiGLU experts, each expert's weights read once for all the tokens that picked it.
//
// At a handful of rows a projection is a stream of weights with little arithmetic on each, and BLAS's small-M
// paths run it well below the machine's FMA rate (bench/generate.py). Here each thread takes a run of eight weight
// rows at a time and computes their dot products with every row of x while those weight rows sit in L1: two rows of
// x by four weight rows in eight accumulators (one row of x by eight when a row is left over), vectorised along K,
// then summed across lanes with a tree of adds. The weights are read from memory once, in their nn.Linear layout;
// nothing is repacked; the thread's next eight rows are prefetched while these are computed. More than kMaxRows
// rows (a prefill, a training batch) go to at::linear.
//
// From kPanelRows rows on, a weight that the engine has packed (r1kit_cpu::pack_panels) is read as 16-column panels
// instead: W^T in (K, 16) slabs, so one step along K loads sixteen outputs' weights in two vectors, each row of x is
// broadcast one element at a time, and a 6 x 16 tile keeps twelve accumulators with no sums across lanes.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "tiles.h"

namespace {

constexpr int64_t kMaxRows = 32;  // past this, BLAS's blocked GEMM is as fast (measured on 256-4,096 x 256-768 weights)

#if defined(CPU_CAPABILITY_AVX2)
using r1kit::sum4;
using r1kit::tile2x4;

// Row x0 by weight rows w[0..7] -> y0[0..7]: eight FMA chains side by side; with pf, the 8K floats from pf on
// into L1 as well (four lines an iteration).
inline void tile1x8(const float* x0, const float* w, int64_t K, float* y0, const float* pf) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t k = 0; k < K; k += 8) {
    if (pf)
      for (int q = 0; q < 4; ++q) _mm_prefetch(reinterpret_cast<const char*>(pf + 8 * k + 16 * q), _MM_HINT_T0);
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

// Y[m, n0 : n0 + nn] = rows[m] . W[n0 + j] (+ bias) for the rows m < M (each K long, anywhere), nn <= 8. `next`:
// the weight rows the thread takes after these (8 K floats), prefetched during the first row pair; or null.
// Measured on a decode step's 29 projections, weights from L3 / memory: 1.1-1.5x at 1-16 rows.
inline void block(const float* const* rows, int64_t M, const float* W, int64_t n0, int64_t nn, int64_t K,
                  const float* bias, float* Y, int64_t ldy, const float* next) {
  const float* wb = W + n0 * K;
  float t0[8], t1[8];
  int64_t m = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if (nn == 8 && K % 8 == 0) {
    for (; m + 2 <= M; m += 2) {
      if (m == 0 && next) {
        tile2x4<true>(rows[m], rows[m + 1], wb, K, t0, t1, next);
        tile2x4<true>(rows[m], rows[m + 1], wb + 4 * K, K, t0 + 4, t1 + 4, next + 4 * K);
      } else {
        tile2x4<false>(rows[m], rows[m + 1], wb, K, t0, t1, nullptr);
        tile2x4<false>(rows[m], rows[m + 1], wb + 4 * K, K, t0 + 4, t1 + 4, nullptr);
      }
      for (int j = 0; j < 8; ++j) {
        Y[m * ldy + n0 + j] = t0[j] + (bias ? bias[n0 + j] : 0.f);
        Y[(m + 1) * ldy + n0 + j] = t1[j] + (bias ? bias[n0 + j] : 0.f);
      }
    }
    if (m < M) {
      tile1x8(rows[m], wb, K, t0, M == 1 ? next : nullptr);
      for (int j = 0; j < 8; ++j) Y[m * ldy + n0 + j] = t0[j] + (bias ? bias[n0 + j] : 0.f);
      ++m;
    }
  }
#endif
  for (; m < M; ++m)
    for (int64_t j = 0; j < nn; ++j) Y[m * ldy + n0 + j] = dot(rows[m], wb + j * K, K) + (bias ? bias[n0 + j] : 0.f);
}

// -- 16-column panels ------------------------------------------------------------------------------------------
constexpr int64_t kPanel = 16, kPanelRows = 8;
constexpr int64_t kStamp = 4;  // trailing floats of a pack: the weight's version counter and address when packed

inline int64_t panels_numel(int64_t N, int64_t K) { return (N + kPanel - 1) / kPanel * K * kPanel + kStamp; }

inline void stamp_of(const at::Tensor& w, int64_t out[2]) {
  out[0] = w._version();
  out[1] = reinterpret_cast<int64_t>(w.data_ptr());
}

// w (N, K) float32 -> its panels, flat: panel p is (K, 16), columns 16p .. 16p + 15 of w^T (zeros past N); then the
// stamp. A pack whose stamp no longer matches its weight (updated in place, or replaced) is never read.
at::Tensor pack_panels(const at::Tensor& w_) {
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kFloat && w_.device().is_cpu() && !w_.is_inference(),
              "pack_panels: a float32 CPU weight (N, K) that tracks its version is expected");
  const at::Tensor w = w_.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor P = at::zeros({panels_numel(N, K)}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = P.data_ptr<float>();
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j)
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * kPanel + j] = src[(p * kPanel + j) * K + k];
  });
  int64_t st[2];
  stamp_of(w_, st);
  std::memcpy(dst + P.numel() - kStamp, st, sizeof st);
  return P;
}

inline bool fresh(const at::Tensor& w, const at::Tensor& P) {
  if (P.scalar_type() != at::kFloat || !P.is_contiguous() || !P.device().is_cpu() || w.is_inference() ||
      P.numel() != panels_numel(w.size(0), w.size(1)))
    return false;
  int64_t now[2], then[2];
  stamp_of(w, now);
  std::memcpy(then, P.data_ptr<float>() + P.numel() - kStamp, sizeof then);
  return now[0] == then[0] && now[1] == then[1];
}

#if defined(CPU_CAPABILITY_AVX2)
// R (<= 6) rows of x (stride ldx) by one panel (K, 16) -> Y[r, 0:nn] (+ bias). Named accumulators: an array of
// __m256 would live in memory. With PF, also pulls the next panel into L1 (one line per step along K).
template <int R, bool PF>
inline void panel_tile(const float* x, int64_t ldx, const float* P, int64_t K, const float* bias, float* Y,
                       int64_t ldy, int64_t nn, const float* pf) {
  __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0, a4 = a0, b4 = a0,
         a5 = a0, b5 = a0;
  for (int64_t k = 0; k < K; ++k) {
    if (PF) _mm_prefetch(reinterpret_cast<const char*>(pf + k * kPanel), _MM_HINT_T0);
    const __m256 p0 = _mm256_loadu_ps(P + k * kPanel), p1 = _mm256_loadu_ps(P + k * kPanel + 8);
    __m256 s = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(s, p0, a0), b0 = _mm256_fmadd_ps(s, p1, b0);
    if (R > 1) s = _mm256_broadcast_ss(x + ldx + k), a1 = _mm256_fmadd_ps(s, p0, a1), b1 = _mm256_fmadd_ps(s, p1, b1);
    if (R > 2) s = _mm256_broadcast_ss(x + 2 * ldx + k), a2 = _mm256_fmadd_ps(s, p0, a2), b2 = _mm256_fmadd_ps(s, p1, b2);
    if (R > 3) s = _mm256_broadcast_ss(x + 3 * ldx + k), a3 = _mm256_fmadd_ps(s, p0, a3), b3 = _mm256_fmadd_ps(s, p1, b3);
    if (R > 4) s = _mm256_broadcast_ss(x + 4 * ldx + k), a4 = _mm256_fmadd_ps(s, p0, a4), b4 = _mm256_fmadd_ps(s, p1, b4);
    if (R > 5) s = _mm256_broadcast_ss(x + 5 * ldx + k), a5 = _mm256_fmadd_ps(s, p0, a5), b5 = _mm256_fmadd_ps(s, p1, b5);
  }
  const __m256 acc[12] = {a0, b0, a1, b1, a2, b2, a3, b3, a4, b4, a5, b5};
  float t[kPanel];
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(t, acc[2 * r]), _mm256_storeu_ps(t + 8, acc[2 * r + 1]);
    for (int64_t j = 0; j < nn; ++j) Y[r * ldy + j] = t[j] + (bias ? bias[j] : 0.f);
  }
}

#if defined(__AVX512F__)
// With AVX-512 a panel's sixteen columns are one vector: R (<= 12) rows of x by the panel in R accumulators, each
// row's element a broadcast load, one FMA a row per step along K (twice the work an FMA of the 8-lane tile does).
template <int R>
inline void panel_tile16(const float* x, int64_t ldx, const float* P, int64_t K, const float* bias, float* Y,
                         int64_t ldy, int64_t nn, const float* pf) {
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + k * kPanel), _MM_HINT_T0);
    const __m512 p = _mm512_loadu_ps(P + k * kPanel);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), p, a[r]);
  }
  const __m512 b = bias ? _mm512_maskz_loadu_ps(__mmask16((1u << nn) - 1), bias) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(Y + r * ldy, __mmask16((1u << nn) - 1), _mm512_add_ps(a[r], b));
}

// Two adjacent panels (32 columns, nn of them) at once: each row's broadcast feeds two FMAs, and 2R chains hide
// the FMA latency that R chains of one panel leave exposed at eight rows.
template <int R>
inline void panel_tile16x2(const float* x, int64_t ldx, const float* P, int64_t K, const float* bias, float* Y,
                           int64_t ldy, int64_t nn, const float* pf) {
  __m512 a[R], c[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps(), c[r] = _mm512_setzero_ps();
  const float* Q = P + K * kPanel;
  for (int64_t k = 0; k < K; ++k) {
    if (pf) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + 2 * k * kPanel), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + 2 * k * kPanel + kPanel), _MM_HINT_T0);
    }
    const __m512 p = _mm512_loadu_ps(P + k * kPanel), q = _mm512_loadu_ps(Q + k * kPanel);
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(x[r * ldx + k]);
      a[r] = _mm512_fmadd_ps(s, p, a[r]), c[r] = _mm512_fmadd_ps(s, q, c[r]);
    }
  }
  const __mmask16 m0 = __mmask16((1u << std::min<int64_t>(nn, 16)) - 1), m1 = __mmask16((1u << (nn - 16)) - 1);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(Y + r * ldy, m0, _mm512_add_ps(a[r], b0));
    _mm512_mask_storeu_ps(Y + r * ldy + 16, m1, _mm512_add_ps(c[r], b1));
  }
}

template <int R>  // panel_tile16x2 for n <= R rows
inline void panel_tile16x2_n(int64_t n, const float* x, int64_t ldx, const float* P, int64_t K, const float* bias,
                             float* Y, int64_t ldy, int64_t nn, const float* pf) {
  if (n == R) return panel_tile16x2<R>(x, ldx, P, K, bias, Y, ldy, nn, pf);
  if constexpr (R > 1) panel_tile16x2_n<R - 1>(n, x, ldx, P, K, bias, Y, ldy, nn, pf);
}

template <int R>  // panel_tile16 for n <= R rows
inline void panel_tile16_n(int64_t n, const float* x, int64_t ldx, const float* P, int64_t K, const float* bias,
                           float* Y, int64_t ldy, int64_t nn, const float* pf) {
  if (n == R) return panel_tile16<R>(x, ldx, P, K, bias, Y, ldy, nn, pf);
  if constexpr (R > 1) panel_tile16_n<R - 1>(n, x, ldx, P, K, bias, Y, ldy, nn, pf);
}
#endif

// All M rows of x by panel P -> Y[:, n0 : n0 + nn]; `next`: the panel to prefetch meanwhile, or null. With `two`
// (AVX-512 only), by P and the panel after it at once: 16 < nn <= 32.
inline void panel(const float* x, int64_t M, const float* P, int64_t K, const float* bias, float* Y, int64_t ldy,
                  int64_t nn, const float* next, bool two = false) {
#if defined(__AVX512F__)
  // the rows in even tiles of at most 12: at least 8 accumulators, the FMA chains that keep both units busy, where
  // M allows
  const int64_t tiles = (M + 11) / 12;
  for (int64_t t = 0, m = 0; t < tiles; ++t) {
    const int64_t r = (M - m) / (tiles - t);
    const float* pf = t == 0 ? next : nullptr;
    if (two)
      panel_tile16x2_n<12>(r, x + m * K, K, P, K, bias, Y + m * ldy, ldy, nn, pf);
    else
      panel_tile16_n<12>(r, x + m * K, K, P, K, bias, Y + m * ldy, ldy, nn, pf);
    m += r;
  }
#else
  int64_t m = 0;
  if (next && M >= 6) panel_tile<6, true>(x, K, P, K, bias, Y, ldy, nn, next), m = 6;
  for (; m + 6 <= M; m += 6) panel_tile<6, false>(x + m * K, K, P, K, bias, Y + m * ldy, ldy, nn, nullptr);
  const float *xm = x + m * K;
  float* ym = Y + m * ldy;
  switch (M - m) {
    case 5: panel_tile<5, false>(xm, K, P, K, bias, ym, ldy, nn, nullptr); break;
    case 4: panel_tile<4, false>(xm, K, P, K, bias, ym, ldy, nn, nullptr); break;
    case 3: panel_tile<3, false>(xm, K, P, K, bias, ym, ldy, nn, nullptr); break;
    case 2: panel_tile<2, false>(xm, K, P, K, bias, ym, ldy, nn, nullptr); break;
    case 1: panel_tile<1, false>(xm, K, P, K, bias, ym, ldy, nn, nullptr); break;
    default: break;
  }
#endif
}
#endif

// about 64k multiply-adds a thread at least: a smaller share costs more to hand out than it saves
inline int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_item)); }

// x (..., K) times each of the weights ws[i] (N_i, K) (+ bs[i]) -> one output (..., N_i) each. All the weights'
// blocks of eight rows are one list of work items split across the threads: q / k / v, or gate / up, in one call.
// (The ops take two or three weights as separate arguments, not a list: a compiled graph's C++ wrapper calls an op
// with list arguments back through Python, measured at 50 us a call. Nor do they have defaults: the wrapper leaves
// out an argument equal to its default, and the call then reads past its arguments.)
using Bias = std::optional<at::Tensor>;

std::vector<at::Tensor> small_linears(const at::Tensor& x, const std::vector<at::Tensor>& ws,
                                      const std::vector<Bias>& bs, const std::vector<Bias>& packs) {
  const int64_t n = ws.size(), K = x.size(-1), M = K ? x.numel() / K : 0;
  bool tiled = x.scalar_type() == at::kFloat && x.device().is_cpu() && M > 0 && M <= kMaxRows;
  for (int64_t i = 0; i < n; ++i) {
    const Bias& b = bs[i];
    TORCH_CHECK(ws[i].dim() == 2 && ws[i].size(1) == K, "small_linears: x (..., K) and weights (N, K) expected");
    tiled = tiled && ws[i].scalar_type() == at::kFloat && ws[i].device().is_cpu() &&
            (!b || (b->scalar_type() == at::kFloat && b->is_contiguous()));
  }
  std::vector<at::Tensor> out;
  if (!tiled) {
    for (int64_t i = 0; i < n; ++i) out.push_back(at::linear(x, ws[i], bs[i]));
    return out;
  }
  const at::Tensor xc = x.contiguous();
  std::vector<const float*> rows(M);
  for (int64_t m = 0; m < M; ++m) rows[m] = xc.data_ptr<float>() + m * K;
  std::vector<at::Tensor> wc(n);
  std::vector<const float*> W(n), B(n);
  std::vector<float*> Y(n);
  std::vector<int64_t> N(n);
  for (int64_t i = 0; i < n; ++i) {
    wc[i] = ws[i].contiguous();
    W[i] = wc[i].data_ptr<float>();
    B[i] = bs[i] ? bs[i]->data_ptr<float>() : nullptr;
    N[i] = wc[i].size(0);
    auto sizes = x.sizes().vec();
    sizes.back() = N[i];
    out.push_back(at::empty(sizes, x.options()));
    Y[i] = out[i].data_ptr<float>();
  }
  bool panels = false;  // every weight packed, and its pack current
#if defined(CPU_CAPABILITY_AVX2)
  panels = M >= kPanelRows;
  for (int64_t i = 0; i < n && panels; ++i) panels = packs[i] && fresh(ws[i], *packs[i]);
#endif
  const int64_t width = panels ? kPanel : 8;  // outputs per work item: a panel, or a block of eight weight rows
  std::vector<int64_t> first(n + 1, 0);  // weight i's work items are first[i] .. first[i + 1] - 1
  for (int64_t i = 0; i < n; ++i) first[i + 1] = first[i] + (N[i] + width - 1) / width;
  at::parallel_for(0, first[n], grain(width * M * K), [&](int64_t begin, int64_t end) {
    int64_t i = 0;
    for (int64_t b = begin; b < end; ++b) {
      while (b >= first[i + 1]) ++i;
      const int64_t n0 = (b - first[i]) * width, nn = std::min<int64_t>(width, N[i] - n0);
#if defined(CPU_CAPABILITY_AVX2)
      if (panels) {
        const float* P = packs[i]->data_ptr<float>() + n0 * K;
#if defined(__AVX512F__)
        if (M > 8 && b + 1 < end && b + 1 < first[i + 1]) {  // this panel and the next of the weight together
          const float* next = b + 2 == end               ? nullptr
                              : b + 2 < first[i + 1] ? P + 2 * kPanel * K
                                                     : packs[i + 1]->data_ptr<float>();
          panel(rows[0], M, P, K, B[i] ? B[i] + n0 : nullptr, Y[i] + n0, N[i],
                std::min<int64_t>(2 * kPanel, N[i] - n0), next, true);
          ++b;
          continue;
        }
#endif
        const float* next = b + 1 == end ? nullptr : b + 1 < first[i + 1] ? P + kPanel * K : packs[i + 1]->data_ptr<float>();
        panel(rows[0], M, P, K, B[i] ? B[i] + n0 : nullptr, Y[i] + n0, N[i], nn, next);
        continue;
      }
#endif
      const float* next = b + 1 == end ? nullptr : b + 1 < first[i + 1] ? W[i] + (n0 + 8) * K : W[i + 1];
      block(rows.data(), M, W[i], n0, nn, K, B[i], Y[i], N[i], next);
    }
  });
  return out;
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const Bias& b, const Bias& p) {
  return small_linears(x, {w}, {b}, {p})[0];
}

std::tuple<at::Tensor, at::Tensor> small_linear2(const at::Tensor& x, const at::Tensor& w0, const Bias& b0,
                                                 const at::Tensor& w1, const Bias& b1, const Bias& p0,
                                                 const Bias& p1) {
  auto y = small_linears(x, {w0, w1}, {b0, b1}, {p0, p1});
  return {y[0], y[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> small_linear3(const at::Tensor& x, const at::Tensor& w0, const Bias& b0,
                                                             const at::Tensor& w1, const Bias& b1,
                                                             const at::Tensor& w2, const Bias& b2, const Bias& p0,
                                                             const Bias& p1, const Bias& p2) {
  auto y = small_linears(x, {w0, w1, w2}, {b0, b1, b2}, {p0, p1, p2});
  return {y[0], y[1], y[2]};
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
      block(rows + s, count[e], W + e * N * K, n0, std::min<int64_t>(8, N - n0), K, nullptr, Y + s * N, N, nullptr);
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
  m.def("pack_panels(Tensor w) -> Tensor");
  m.impl("pack_panels", c10::DispatchKey::CPU, &pack_panels);
  m.def("small_linear(Tensor x, Tensor w, Tensor? bias, Tensor? packed) -> Tensor");
  m.impl("small_linear", c10::DispatchKey::CPU, &small_linear);
  m.def("small_linear2(Tensor x, Tensor w0, Tensor? b0, Tensor w1, Tensor? b1, Tensor? p0, Tensor? p1) -> "
        "(Tensor, Tensor)");
  m.impl("small_linear2", c10::DispatchKey::CPU, &small_linear2);
  m.def("small_linear3(Tensor x, Tensor w0, Tensor? b0, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
        "Tensor? p0, Tensor? p1, Tensor? p2) -> (Tensor, Tensor, Tensor)");
  m.impl("small_linear3", c10::DispatchKey::CPU, &small_linear3);
  m.def("small_experts(Tensor x, Tensor gate_up, Tensor down, Tensor indices, Tensor weights) -> Tensor");
  m.impl("small_experts", c10::DispatchKey::CPU, &small_experts);
}
