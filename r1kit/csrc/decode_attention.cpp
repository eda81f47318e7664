// Decode attention on CPU in one pass over each sequence's cache rows (flash-decoding), for a few query positions.
//
// r1kit_cpu::latent_attention: absorbed MLA. qq (B, T*H, D) float32, t-major query rows, already scaled and folded
// through W_uk; cache (slots, max_len, D) float32, each row [c_kv (rank) | k_pe]: the keys, and their first `rank`
// columns the values. -> (B, T*H, rank).
// r1kit_cpu::gqa_attention: grouped-query attention. q (B, Hkv, T*G, D) float32, already scaled, the G query heads
// of each key head folded into its rows (t-major); k_cache, v_cache (slots, Hkv, max_len, D). -> (B, Hkv, T*G, D).
// In both, slots (B,) and positions (B, T) are int64, and query t of row b sees the keys at 0 .. positions[b, t].
// A cache may also be float16 or bfloat16 (half the bytes): each block of rows is converted to float32 in L1 first.
//
// Each (row, key head)'s keys are split into chunks across threads. A chunk keeps, per query row, a running maximum,
// a running sum of exponentials and an unnormalised output (the online softmax); the chunks are merged at the end.
// Every key is read once per chunk, for all query rows at once, while it is in L1. Query rows that come in groups of
// eight seeing the same keys (eight heads or more per position) run one row per vector lane: each key element is
// broadcast to the eight rows, so the scores need no sums across lanes, and each value element likewise, so the
// values run one column per register with a dozen independent FMA chains (1.06-1.11x over a row per head's tile).
// Rows in groups of four (four query heads a key head) score one key a vector, four rows by an (even, odd) pair of
// its elements: a 64-bit broadcast load and an FMA per pair, where the paired-row tiles spent as much again on sums
// across lanes (the kernel 1.13-1.29x on Qwen2's shape). With AVX-512 the lane-per-row path runs on sixteen lanes,
// eight rows by an (even, odd) pair of key elements or value columns (DeepSeek-V3's shape: 1.43x hot, 1.22x cold),
// and the four-row path takes its values sixteen columns a vector (1.10-1.13x on Qwen2's shape) and its softmax
// four keys by four rows a vector (1.05-1.08x more). The lane-per-row path's values, when R is a multiple of 16,
// go row by row too, eight rows by sixteen columns a vector: a load per two FMAs instead of one per FMA, and no
// pass to double the weights (DeepSeek-V3's shape 1.06-1.11x), and its softmax two keys by eight rows a vector.
// Both paths prefetch the rows kPrefetch keys on from inside the score loop's FMAs, a line an iteration, where a loop
// of its own cost as much as it saved on a hot cache (with the softmax, DeepSeek-V3's shape 1.16-1.28x; the four-row
// path, which had no prefetch, 1.03-1.10x).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tiles.h"

namespace {

constexpr int64_t kBlock = 64;      // keys scored at once, per query row
constexpr int64_t kMinChunk = 256;  // fewest keys worth a thread
constexpr int64_t kPrefetch = 32;   // keys ahead that the lane-per-row path prefetches

using Vec = at::vec::Vectorized<float>;

enum class Elem { F32, F16, BF16 };  // a cache's element type

Elem elem_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Elem::F32;
    case at::kHalf: return Elem::F16;
    case at::kBFloat16: return Elem::BF16;
    default: TORCH_CHECK(false, "caches must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return Elem::F32;
}

// Scratch floats of this thread, kept from call to call: a chunk's buffers cost no allocation (at batch 16 a step
// attends 32 chunks a layer). Slot i is one buffer; its contents are whatever the last user left.
float* scratch(int i, int64_t n) {
  thread_local std::vector<float> bufs[4];
  if (static_cast<int64_t>(bufs[i].size()) < n) bufs[i].resize(n);
  return bufs[i].data();
}

// Rows [first, first + n) of `stride` elements from a cache of type e, as float32: in place for a float32 cache,
// else converted into buf (n * stride floats).
const float* rows_f32(const void* base, int64_t first, int64_t n, int64_t stride, Elem e, float* buf) {
  if (e == Elem::F32) return static_cast<const float*>(base) + first * stride;
  const uint16_t* src = static_cast<const uint16_t*>(base) + first * stride;
  const int64_t len = n * stride;
  int64_t i = 0;
#if defined(__AVX512F__)  // sixteen a vector: the 4k attention over a bfloat16 cache 1.04-1.08x (float16 1.0x)
  for (; i + 16 <= len; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(buf + i, e == Elem::F16 ? _mm512_cvtph_ps(h)
                                             : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#endif
#if defined(CPU_CAPABILITY_AVX2)
  for (; i + 8 <= len; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(buf + i, e == Elem::F16 ? _mm256_cvtph_ps(h)
                                             : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
#endif
  for (; i < len; ++i)
    buf[i] = e == Elem::F16 ? float(c10::Half(src[i], c10::Half::from_bits()))
                            : float(c10::BFloat16(src[i], c10::BFloat16::from_bits()));
  return buf;
}

// Keep a loaded vector in a register: otherwise the compiler folds the load into every FMA that reads it, and the
// extra loads, not the FMAs, set the pace (the multi-row value tile below: 1.03-1.07x with it).
inline void in_register(Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  asm("" : "+x"(r));
  v = r;
#endif
}

// scores[k] = q . keys[k] for `n` (<= 8) key rows: one accumulator per key, so the FMA chains run side by side.
inline void dots(const float* q, const float* keys, int64_t stride, int64_t n, int64_t D, float* scores) {
#if defined(CPU_CAPABILITY_AVX2)
  if (n == 8 && D % 8 == 0) {  // eight named registers (an array of them ends up in memory), then a tree of adds
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + 0 * stride + d), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + 1 * stride + d), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + 2 * stride + d), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + 3 * stride + d), a3);
      a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + 4 * stride + d), a4);
      a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + 5 * stride + d), a5);
      a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + 6 * stride + d), a6);
      a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + 7 * stride + d), a7);
    }
    // pairwise adds leave keys 0-3's sums split over the two 128-bit halves of lo, keys 4-7's over hi
    const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    _mm256_storeu_ps(scores, _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31)));
    return;
  }
#endif
  for (int64_t k = 0; k < n; ++k) {
    Vec acc(0.f);
    int64_t d = 0;
    for (; d + Vec::size() <= D; d += Vec::size())
      acc = at::vec::fmadd(Vec::loadu(q + d), Vec::loadu(keys + k * stride + d), acc);
    float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
    for (; d < D; ++d) s += q[d] * keys[k * stride + d];
    scores[k] = s;
  }
}

// For NR query rows at once: acc[r][0 : NV * W] = acc[r] * alpha[r] + sum_k p[r][k] * vals[k][0 : NV * W], with
// p[r][k] at p[r * ps + k * pk]. Each value vector is loaded once for the NR rows: NR x NV accumulators, that many
// independent FMA chains.
template <int NR, int NV>
inline void accumulate_tile(float* acc, int64_t acc_stride, const float* alpha, const float* p, int64_t ps,
                            int64_t pk, const float* vals, int64_t stride, int64_t count) {
  constexpr int64_t W = Vec::size();
  Vec a[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) a[r][v] = Vec::loadu(acc + r * acc_stride + v * W) * Vec(alpha[r]);
  for (int64_t k = 0; k < count; ++k) {
    Vec x[NV];
    for (int v = 0; v < NV; ++v) {
      x[v] = Vec::loadu(vals + k * stride + v * W);
      in_register(x[v]);
    }
    for (int r = 0; r < NR; ++r) {
      const Vec pr(p[r * ps + k * pk]);
      for (int v = 0; v < NV; ++v) a[r][v] = at::vec::fmadd(pr, x[v], a[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) a[r][v].store(acc + r * acc_stride + v * W);
}

// accumulate_tile for the `left` (< NV) vectors after the last tile of NV, as one tile of `left`.
template <int NR, int NV>
inline void accumulate_left(float* acc, int64_t acc_stride, const float* alpha, const float* p, int64_t ps,
                            int64_t pk, const float* vals, int64_t stride, int64_t count, int64_t left) {
  if constexpr (NV > 1) {
    if (left == NV - 1)
      accumulate_tile<NR, NV - 1>(acc, acc_stride, alpha, p, ps, pk, vals, stride, count);
    else
      accumulate_left<NR, NV - 1>(acc, acc_stride, alpha, p, ps, pk, vals, stride, count, left);
  }
}

// accumulate_tile over all R columns of NR rows: tiles of NV vectors, one tile of the vectors left, then the
// columns past the last whole vector.
template <int NR, int NV>
inline void accumulate_rows(float* acc, int64_t acc_stride, const float* alpha, const float* p, int64_t ps,
                            int64_t pk, const float* vals, int64_t stride, int64_t count, int64_t R) {
  constexpr int64_t W = Vec::size();
  int64_t d = 0;
  for (; d + NV * W <= R; d += NV * W)
    accumulate_tile<NR, NV>(acc + d, acc_stride, alpha, p, ps, pk, vals + d, stride, count);
  if (const int64_t left = (R - d) / W; left > 0) {
    accumulate_left<NR, NV>(acc + d, acc_stride, alpha, p, ps, pk, vals + d, stride, count, left);
    d += left * W;
  }
  for (; d < R; ++d)
    for (int r = 0; r < NR; ++r) {
      float x = acc[r * acc_stride + d] * alpha[r];
      for (int64_t k = 0; k < count; ++k) x += p[r * ps + k * pk] * vals[k * stride + d];
      acc[r * acc_stride + d] = x;
    }
}

// The values of `nr` query rows that see the same `count` keys, up to four rows at a time (8-9 accumulators: the
// FMA latency is covered, and registers are left for the value vectors).
inline void accumulate(float* acc, int64_t acc_stride, const float* alpha, const float* p, int64_t ps, int64_t pk,
                       const float* vals, int64_t stride, int64_t count, int64_t R, int64_t nr) {
  for (; nr >= 4; nr -= 4, acc += 4 * acc_stride, alpha += 4, p += 4 * ps)
    accumulate_rows<4, 2>(acc, acc_stride, alpha, p, ps, pk, vals, stride, count, R);
  switch (nr) {
    case 3: accumulate_rows<3, 3>(acc, acc_stride, alpha, p, ps, pk, vals, stride, count, R); break;
    case 2: accumulate_rows<2, 4>(acc, acc_stride, alpha, p, ps, pk, vals, stride, count, R); break;
    case 1: accumulate_rows<1, 8>(acc, acc_stride, alpha, p, ps, pk, vals, stride, count, R); break;
    default: break;
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// Eight query rows at once, one per lane: out[k] = (q_0 . key_k, ..., q_7 . key_k) for N keys, from qt (D, 8), the
// rows transposed. Each key element is broadcast to all eight rows, so no lane sums are needed.
template <int N>
inline void scores8(const float* qt, const float* keys, int64_t D, float* out) {
  const float* k[N];  // one base pointer per key and a shared index: no address arithmetic in the loop
  __m256 a[N];
  for (int i = 0; i < N; ++i) k[i] = keys + i * D, a[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 q = _mm256_loadu_ps(qt + d * 8);
    for (int i = 0; i < N; ++i) a[i] = _mm256_fmadd_ps(q, _mm256_broadcast_ss(k[i] + d), a[i]);
  }
  for (int i = 0; i < N; ++i) _mm256_storeu_ps(out + i * 8, a[i]);
}

inline void scores8_tail(const float* qt, const float* keys, int64_t D, int64_t n, float* out) {
  switch (n) {
    case 7: scores8<7>(qt, keys, D, out); break;
    case 6: scores8<6>(qt, keys, D, out); break;
    case 5: scores8<5>(qt, keys, D, out); break;
    case 4: scores8<4>(qt, keys, D, out); break;
    case 3: scores8<3>(qt, keys, D, out); break;
    case 2: scores8<2>(qt, keys, D, out); break;
    case 1: scores8<1>(qt, keys, D, out); break;
    default: break;
  }
}

// acc[i] = acc[i] * alpha + sum_k vals[k][i] * p[k], i < N, for eight query rows in the lanes: N accumulators
// (one per value column) with N independent FMA chains; each value element is broadcast to the eight rows.
template <int N>
inline void values8(float* acc, __m256 alpha, const float* p, const float* vals, int64_t stride, int64_t count) {
  __m256 a[N];
  for (int i = 0; i < N; ++i) a[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + i * 8), alpha);
  for (int64_t k = 0; k < count; ++k) {
    const __m256 pk = _mm256_loadu_ps(p + k * 8);
    const float* v = vals + k * stride;
    for (int i = 0; i < N; ++i) a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(v + i), pk, a[i]);
  }
  for (int i = 0; i < N; ++i) _mm256_storeu_ps(acc + i * 8, a[i]);
}

inline void values8_cols(float* acc, __m256 alpha, const float* p, const float* vals, int64_t stride, int64_t count,
                         int64_t R) {
  const int64_t tiles = (R + 11) / 12;  // columns split evenly into tiles of at most 12 (12 chains, 14 registers)
  for (int64_t t = 0, r = 0; t < tiles; ++t) {
    const int64_t n = (R - r) / (tiles - t);
    float* a = acc + r * 8;
    const float* v = vals + r;
    switch (n) {
      case 12: values8<12>(a, alpha, p, v, stride, count); break;
      case 11: values8<11>(a, alpha, p, v, stride, count); break;
      case 10: values8<10>(a, alpha, p, v, stride, count); break;
      case 9: values8<9>(a, alpha, p, v, stride, count); break;
      case 8: values8<8>(a, alpha, p, v, stride, count); break;
      case 7: values8<7>(a, alpha, p, v, stride, count); break;
      case 6: values8<6>(a, alpha, p, v, stride, count); break;
      case 5: values8<5>(a, alpha, p, v, stride, count); break;
      case 4: values8<4>(a, alpha, p, v, stride, count); break;
      case 3: values8<3>(a, alpha, p, v, stride, count); break;
      case 2: values8<2>(a, alpha, p, v, stride, count); break;
      default: values8<1>(a, alpha, p, v, stride, count); break;
    }
    r += n;
  }
}

// Scores of four query rows against N keys (N even), one key a vector, lanes (row 0 | row 1 | row 2 | row 3) x (even,
// odd element): each pair of a key's elements is one 64-bit broadcast load, with no shuffles in the loop. q4 (D / 2, 8)
// holds the rows interleaved by pairs: q4[d / 2] = (q_0[d], q_0[d + 1], q_1[d], q_1[d + 1], ...). At the end the even
// and odd halves are added, two keys at a time. out: (N, 4), key-major. D % 2 == 0.
template <int N, bool Prefetch = false>
inline void scores4(const float* q4, const float* keys, int64_t D, float* out, const char* ka = nullptr,
                    const char* va = nullptr) {
  const double* k[N];  // one base pointer per key and a shared index
  __m256 a[N];
  for (int i = 0; i < N; ++i) k[i] = reinterpret_cast<const double*>(keys + i * D), a[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D / 2; ++d) {
    if constexpr (Prefetch) {
      _mm_prefetch(ka + d * 64, _MM_HINT_T0);
      _mm_prefetch(va + d * 64, _MM_HINT_T0);
    }
    const __m256 q = _mm256_loadu_ps(q4 + d * 8);
    for (int i = 0; i < N; ++i) a[i] = _mm256_fmadd_ps(q, _mm256_castpd_ps(_mm256_broadcast_sd(k[i] + d)), a[i]);
  }
  const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);  // (a0 a1 b0 b1 | a2 a3 b2 b3) -> key-major
  for (int i = 0; i < N; i += 2)
    _mm256_storeu_ps(out + i * 4, _mm256_permutevar8x32_ps(_mm256_hadd_ps(a[i], a[i + 1]), order));
}

#if defined(__AVX512F__)
// exp(x) on sixteen lanes, x <= 0 (a score less the running maximum): 2^n e^r, n = round(x log2 e), r = x - n ln 2 in
// two parts, e^r by its Taylor polynomial to r^6 (|r| <= ln 2 / 2: within ~1e-7 relative). Below -87.3 (a masked
// key's -inf among them) it is exactly 0.
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// The four lanes r, r + 4, r + 8, r + 12 of x combined by f, in every 128-bit lane.
template <typename F>
inline __m128 fold4(__m512 x, F f) {
  x = f(x, _mm512_shuffle_f32x4(x, x, 0x4E));
  x = f(x, _mm512_shuffle_f32x4(x, x, 0xB1));
  return _mm512_castps512_ps128(x);
}

// accumulate for NR rows, sixteen columns a vector (R % 16 == 0): p[r + NR * k] is row r's weight of key k (key-major
// weights, as the softmax leaves them); NV vectors of columns a tile, NR x NV accumulators.
template <int NR, int NV>
inline void values_rows16(float* acc, int64_t R, const float* alpha, const float* p, const float* vals, int64_t stride,
                          int64_t count) {
  __m512 a[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v)
      a[r][v] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * R + v * 16), _mm512_set1_ps(alpha[r]));
  for (int64_t k = 0; k < count; ++k) {
    __m512 x[NV];
    for (int v = 0; v < NV; ++v) x[v] = _mm512_loadu_ps(vals + k * stride + v * 16);
    for (int r = 0; r < NR; ++r) {
      const __m512 pr = _mm512_set1_ps(p[k * NR + r]);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm512_fmadd_ps(pr, x[v], a[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + r * R + v * 16, a[r][v]);
}
#endif

// attend_chunk for query rows in groups of four that each see the same keys (rows % 4 == 0, D even: grouped-query
// attention with four query heads a key head, as Qwen2's and Llama's): the scores four rows a vector, the softmax two
// keys by four rows a vector, kept key-major; the values take the rows four at a time as outside the lanes.
void attend_chunk4(const float* q, const void* keys, const void* vals, Elem e, int64_t rows, int64_t D, int64_t R,
                   int64_t val_stride, const int64_t* visible, int64_t s0, int64_t s1, float* m, float* l,
                   float* acc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t groups = rows / 4;
  std::fill(m, m + rows, neg_inf);
  std::fill(l, l + rows, 0.f);
  std::fill(acc, acc + rows * R, 0.f);
  float *q4 = scratch(0, groups * D * 4), *sc = scratch(1, (kBlock + 3) * 4);
  float* kbuf = scratch(2, e == Elem::F32 ? 0 : kBlock * D);  // a 16-bit cache's block, as float32
  float* vbuf = scratch(3, e == Elem::F32 || vals == keys ? 0 : kBlock * val_stride);
  for (int64_t g = 0; g < groups; ++g)  // q4[g][d / 2][row][d % 2]
    for (int64_t r = 0; r < 4; ++r)
      for (int64_t d = 0; d < D; ++d) q4[g * D * 4 + d / 2 * 8 + r * 2 + d % 2] = q[(g * 4 + r) * D + d];
  for (int64_t s = s0; s < s1; s += kBlock) {
    const int64_t n = std::min(kBlock, s1 - s);
    const float* kb = rows_f32(keys, s, n, D, e, kbuf);
    const float* vb = vals == keys ? kb : rows_f32(vals, s, n, val_stride, e, vbuf);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t count = std::min(n, visible[g * 4] - s);
      if (count <= 0) continue;
      const float* qg = q4 + g * D * 4;
      float* p = sc;
      int64_t j = 0;
      if (e == Elem::F32 && val_stride == D)  // the keys and values kPrefetch rows on, into L1 while these are scored
        for (; j + 8 <= count; j += 8)
          scores4<8, true>(qg, kb + j * D, D, p + j * 4, reinterpret_cast<const char*>(kb + (j + kPrefetch) * D),
                           reinterpret_cast<const char*>(vb + (j + kPrefetch) * D));
      for (; j + 8 <= count; j += 8) scores4<8>(qg, kb + j * D, D, p + j * 4);
      for (; j + 2 <= count; j += 2) scores4<2>(qg, kb + j * D, D, p + j * 4);
      if (j < count) {  // an odd last key; its pair's other half left at -inf, so it weighs 0
        for (int r = 0; r < 4; ++r) {
          float x = 0.f;
          for (int64_t d = 0; d < D; ++d) x += q[(g * 4 + r) * D + d] * kb[j * D + d];
          p[j * 4 + r] = x, p[j * 4 + 4 + r] = neg_inf;
        }
      }
#if defined(__AVX512F__)
      if (R % 16 == 0) {  // the softmax four keys by four rows a vector
        const int64_t quads = (count + 3) / 4;
        for (int64_t k = (count + 1) / 2 * 2; k < quads * 4; ++k)
          for (int r = 0; r < 4; ++r) p[k * 4 + r] = neg_inf;
        __m512 mx = _mm512_set1_ps(neg_inf);
        for (int64_t k = 0; k < quads; ++k) mx = _mm512_max_ps(mx, _mm512_loadu_ps(p + k * 16));
        const __m128 m_old = _mm_loadu_ps(m + g * 4);
        const __m128 m_new = _mm_max_ps(m_old, fold4(mx, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); }));
        const __m512 m16 = _mm512_broadcast_f32x4(m_new);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < quads; ++k) {
          const __m512 x = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + k * 16), m16));
          _mm512_storeu_ps(p + k * 16, x);
          sum = _mm512_add_ps(sum, x);
        }
        const __m128 alpha = _mm512_castps512_ps128(exp16(_mm512_castps128_ps512(_mm_sub_ps(m_old, m_new))));
        const __m128 s4 = fold4(sum, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
        _mm_storeu_ps(l + g * 4, _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(l + g * 4), alpha), s4));
        _mm_storeu_ps(m + g * 4, m_new);
        float a4[4];
        _mm_storeu_ps(a4, alpha);
        int64_t d = 0;
        for (; d + 32 <= R; d += 32) values_rows16<4, 2>(acc + g * 4 * R + d, R, a4, p, vb + d, val_stride, count);
        if (d < R) values_rows16<4, 1>(acc + g * 4 * R + d, R, a4, p, vb + d, val_stride, count);
        continue;
      }
#endif
      const int64_t pairs = (count + 1) / 2;
      __m256 mx = _mm256_set1_ps(neg_inf);
      for (int64_t k = 0; k < pairs; ++k) mx = _mm256_max_ps(mx, _mm256_loadu_ps(p + k * 8));
      const __m128 m_old = _mm_loadu_ps(m + g * 4);
      const __m128 m_new = _mm_max_ps(m_old, _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1)));
      const Vec m2(_mm256_set_m128(m_new, m_new));
      Vec sum(0.f);
      for (int64_t k = 0; k < pairs; ++k) {
        const Vec x = (Vec::loadu(p + k * 8) - m2).exp_u20();
        x.store(p + k * 8);
        sum = sum + x;
      }
      // alpha = exp(m_old - m_new) for the four rows, in both halves (0 on the first block, m = -inf)
      const __m256 alpha = (Vec(_mm256_set_m128(m_old, m_old)) - m2).exp_u20();
      const __m256 s8 = sum;
      const __m128 l_new = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(l + g * 4), _mm256_castps256_ps128(alpha)),
                                      _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)));
      _mm_storeu_ps(l + g * 4, l_new);
      _mm_storeu_ps(m + g * 4, m_new);
      float a4[8];
      _mm256_storeu_ps(a4, alpha);
      accumulate(acc + g * 4 * R, R, a4, p, 1, 4, vb, val_stride, count, R, 4);
    }
  }
}

#if defined(__AVX512F__)
// The lane-per-row path on sixteen lanes (AVX-512): eight query rows by the (even, odd) element of a key in the
// scores, or by an (even, odd) column pair in the values; one 64-bit broadcast load and one FMA a pair, half the
// FMAs of eight lanes.
// out[k] = (q_0 . key_k, ..., q_7 . key_k) for N keys, from q2 (D / 2, 16): q2[d / 2] = (q_0[d], q_0[d + 1], q_1[d],
// ..., q_7[d + 1]). D even.
template <int N, bool Prefetch = false>
inline void scores16(const float* q2, const float* keys, int64_t D, float* out, const char* ahead = nullptr) {
  const double* k[N];
  __m512 a[N];
  for (int i = 0; i < N; ++i) k[i] = reinterpret_cast<const double*>(keys + i * D), a[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D / 2; ++d) {
    if constexpr (Prefetch) _mm_prefetch(ahead + d * 64, _MM_HINT_T0);
    const __m512 q = _mm512_loadu_ps(q2 + d * 16);
    for (int i = 0; i < N; ++i) a[i] = _mm512_fmadd_ps(q, _mm512_castpd_ps(_mm512_set1_pd(k[i][d])), a[i]);
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int i = 0; i < N; ++i)  // each row's even + odd lane, gathered into the low eight lanes
    _mm256_storeu_ps(out + i * 8, _mm512_castps512_ps256(_mm512_permutexvar_ps(
                                      even, _mm512_add_ps(a[i], _mm512_permute_ps(a[i], 0xb1)))));
}

template <int N>  // scores16 for n <= N keys
inline void scores16_n(const float* q2, const float* keys, int64_t D, int64_t n, float* out) {
  if (n == N) return scores16<N>(q2, keys, D, out);
  if constexpr (N > 1) scores16_n<N - 1>(q2, keys, D, n, out);
}

// acc[i] = acc[i] * alpha + sum_k p2[k] * (vals[k][2i], vals[k][2i + 1], ...) for N column pairs, lanes (row, even
// or odd column); p2[k] = (p_0, p_0, p_1, p_1, ..., p_7, p_7) for key k.
template <int N>
inline void values16(float* acc, __m512 alpha, const float* p2, const float* vals, int64_t stride, int64_t count) {
  __m512 a[N];
  for (int i = 0; i < N; ++i) a[i] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * 16), alpha);
  for (int64_t k = 0; k < count; ++k) {
    const __m512 pk = _mm512_loadu_ps(p2 + k * 16);
    const double* v = reinterpret_cast<const double*>(vals + k * stride);
    for (int i = 0; i < N; ++i) a[i] = _mm512_fmadd_ps(_mm512_castpd_ps(_mm512_set1_pd(v[i])), pk, a[i]);
  }
  for (int i = 0; i < N; ++i) _mm512_storeu_ps(acc + i * 16, a[i]);
}

template <int N>  // values16 for n <= N column pairs
inline void values16_n(float* acc, __m512 alpha, const float* p2, const float* vals, int64_t stride, int64_t count,
                       int64_t n) {
  if (n == N) return values16<N>(acc, alpha, p2, vals, stride, count);
  if constexpr (N > 1) values16_n<N - 1>(acc, alpha, p2, vals, stride, count, n);
}

// All `pairs` column pairs, split evenly into tiles of at most 16 (16 chains; 32 registers).
inline void values16_cols(float* acc, __m512 alpha, const float* p2, const float* vals, int64_t stride, int64_t count,
                          int64_t pairs) {
  const int64_t tiles = (pairs + 15) / 16;
  for (int64_t t = 0, r = 0; t < tiles; ++t) {
    const int64_t n = (pairs - r) / (tiles - t);
    values16_n<16>(acc + r * 16, alpha, p2, vals + 2 * r, stride, count, n);
    r += n;
  }
}

// (x_0 .. x_7) -> (x_0, x_0, x_1, x_1, ..., x_7, x_7)
inline __m512 doubled(__m256 x) {
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                               _mm512_castps256_ps512(x));
}
#endif

// attend_chunk for query rows in groups of eight that each see the same keys (rows % 8 == 0): the scores, the
// softmax and the values all run across the eight lanes, one row each; the output is transposed back at the end.
// Wide (AVX-512, D and R even): the scores and values on sixteen lanes, eight rows by two elements.
template <bool Wide>
void attend_chunk8(const float* q, const void* keys, const void* vals, Elem e, int64_t rows, int64_t D, int64_t R,
                   int64_t val_stride, const int64_t* visible, int64_t s0, int64_t s1, float* m, float* l,
                   float* acc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t groups = rows / 8;
  std::fill(m, m + rows, neg_inf);
  std::fill(l, l + rows, 0.f);
  // acct: acct[g][column][lane]; Wide: acct[g][column pair][lane][even, odd]
  float *qt = scratch(0, rows * D + (Wide ? kBlock * 16 : 0)), *p2 = qt + rows * D;
  float *sc = scratch(1, (kBlock + 1) * 8 + groups * R * 8), *acct = sc + (kBlock + 1) * 8;
#if defined(__AVX512F__)
  const bool rowwise = R % 16 == 0;  // the values row by row, sixteen columns a vector: acc directly
#else
  const bool rowwise = false;
#endif
  if (rowwise)
    std::fill(acc, acc + rows * R, 0.f);
  else
    std::fill(acct, acct + groups * R * 8, 0.f);
  float* kbuf = scratch(2, e == Elem::F32 ? 0 : kBlock * D);  // a 16-bit cache's block, as float32
  float* vbuf = scratch(3, e == Elem::F32 || vals == keys ? 0 : kBlock * val_stride);
  for (int64_t g = 0; g < groups; ++g)  // each group's rows transposed: qt[g][d][lane]; Wide: qt[g][d / 2][lane][d % 2]
    for (int64_t i = 0; i < 8; ++i)
      for (int64_t d = 0; d < D; ++d)
        qt[Wide ? g * D * 8 + d / 2 * 16 + i * 2 + d % 2 : (g * D + d) * 8 + i] = q[(g * 8 + i) * D + d];
  for (int64_t s = s0; s < s1; s += kBlock) {
    const int64_t n = std::min(kBlock, s1 - s);
    const float* kb = rows_f32(keys, s, n, D, e, kbuf);
    const float* vb = vals == keys ? kb : rows_f32(vals, s, n, val_stride, e, vbuf);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t count = std::min(n, visible[g * 8] - s);
      if (count <= 0) continue;
      const float* qg = qt + g * D * 8;
      int64_t j = 0;
      for (; j + 8 <= count; j += 8) {
        // pull the keys kPrefetch rows on into L1 while these are scored: a cold cache streams from memory, and
        // the hardware prefetcher alone leaves the scores waiting (4k keys, 2 threads: 1.15x on a cold cache,
        // 0.95x on a hot one, 1.10x between reads of other data as in a step). Past the cache's end it is a no-op.
        // (A 16-bit cache was read in one stream by the conversion.)
#if defined(__AVX512F__)
        if constexpr (Wide) {
          if (e == Elem::F32)
            scores16<8, true>(qg, kb + j * D, D, sc + j * 8, reinterpret_cast<const char*>(kb + (j + kPrefetch) * D));
          else
            scores16<8>(qg, kb + j * D, D, sc + j * 8);
          continue;
        }
#endif
        if (e == Elem::F32) {
          const char* ahead = reinterpret_cast<const char*>(kb + (j + kPrefetch) * D);
          for (int64_t o = 0; o < 8 * D * int64_t(sizeof(float)); o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);
        }
        scores8<8>(qg, kb + j * D, D, sc + j * 8);
      }
#if defined(__AVX512F__)
      if constexpr (Wide) {
        if (j < count) scores16_n<7>(qg, kb + j * D, D, count - j, sc + j * 8);
      } else
#endif
        scores8_tail(qg, kb + j * D, D, count - j, sc + j * 8);
#if defined(__AVX512F__)
      // two keys by eight rows a vector; an odd count's last pair padded with a key at -inf, which weighs 0
      if (count % 2) std::fill(sc + count * 8, sc + count * 8 + 8, neg_inf);
      const int64_t pairs = (count + 1) / 2;
      __m512 mx16 = _mm512_set1_ps(neg_inf);
      for (int64_t k = 0; k < pairs; ++k) mx16 = _mm512_max_ps(mx16, _mm512_loadu_ps(sc + k * 16));
      const __m256 mx = _mm256_max_ps(_mm512_castps512_ps256(mx16), _mm512_extractf32x8_ps(mx16, 1));
      const Vec m_old = Vec::loadu(m + g * 8), m_new = at::vec::maximum(m_old, Vec(mx));
      const __m512 m2 = _mm512_insertf32x8(_mm512_castps256_ps512(m_new), m_new, 1);
      __m512 sum16 = _mm512_setzero_ps();
      for (int64_t k = 0; k < pairs; ++k) {
        const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + k * 16), m2));
        _mm512_storeu_ps(sc + k * 16, p);
        sum16 = _mm512_add_ps(sum16, p);
      }
      const Vec sum(_mm256_add_ps(_mm512_castps512_ps256(sum16), _mm512_extractf32x8_ps(sum16, 1)));
#else
      __m256 mx = _mm256_set1_ps(neg_inf);
      for (int64_t k = 0; k < count; ++k) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sc + k * 8));
      const Vec m_old = Vec::loadu(m + g * 8), m_new = at::vec::maximum(m_old, Vec(mx));
      Vec sum(0.f);
      for (int64_t k = 0; k < count; ++k) {
        const Vec p = (Vec::loadu(sc + k * 8) - m_new).exp_u20();
        p.store(sc + k * 8);
        sum = sum + p;
      }
#endif
      const Vec alpha = (m_old - m_new).exp_u20();  // 0 on the first block (m = -inf)
      (Vec::loadu(l + g * 8) * alpha + sum).store(l + g * 8);
      m_new.store(m + g * 8);
#if defined(__AVX512F__)
      if (rowwise) {  // eight rows by sixteen columns a vector, straight into acc
        float a8[8];
        alpha.store(a8);
        int64_t d = 0;
        for (; d + 32 <= R; d += 32) values_rows16<8, 2>(acc + g * 8 * R + d, R, a8, sc, vb + d, val_stride, count);
        if (d < R) values_rows16<8, 1>(acc + g * 8 * R + d, R, a8, sc, vb + d, val_stride, count);
        continue;
      }
      if constexpr (Wide) {
        for (int64_t k = 0; k < count; ++k)
          _mm512_storeu_ps(p2 + k * 16, doubled(_mm256_loadu_ps(sc + k * 8)));
        values16_cols(acct + g * R * 8, doubled(alpha), p2, vb, val_stride, count, R / 2);
        continue;
      }
#endif
      values8_cols(acct + g * R * 8, alpha, sc, vb, val_stride, count, R);
    }
  }
  if (rowwise) return;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < 8; ++i)
      for (int64_t r = 0; r < R; ++r)
        acc[(g * 8 + i) * R + r] = acct[Wide ? g * R * 8 + r / 2 * 16 + i * 2 + r % 2 : (g * R + r) * 8 + i];
}
#endif

// One chunk [s0, s1) of one batch row: partial (max, sum, unnormalised output) per query row.
void attend_chunk(const float* q, const void* keys, const void* vals, Elem e, int64_t rows, int64_t D, int64_t R,
                  int64_t val_stride, const int64_t* visible, int64_t s0, int64_t s1, float* m, float* l, float* acc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(m, m + rows, neg_inf);
  std::fill(l, l + rows, 0.f);
  std::fill(acc, acc + rows * R, 0.f);
  float *scores = scratch(0, rows * kBlock + rows), *alpha = scores + rows * kBlock;
  float* kbuf = scratch(2, e == Elem::F32 ? 0 : kBlock * D);  // a 16-bit cache's block, as float32
  float* vbuf = scratch(3, e == Elem::F32 || vals == keys ? 0 : kBlock * val_stride);
  std::vector<int64_t> count(rows);
  for (int64_t s = s0; s < s1; s += kBlock) {
    const int64_t n = std::min(kBlock, s1 - s);
    const float* kb = rows_f32(keys, s, n, D, e, kbuf);
    const float* vb = vals == keys ? kb : rows_f32(vals, s, n, val_stride, e, vbuf);
    float* sc = scores;
    int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
    if (D % 8 == 0)  // two query rows against four keys at a time: each key block read once per pair of rows
      for (; i + 2 <= rows; i += 2) {
        int64_t j = 0;
        for (; j + 4 <= n; j += 4)
          r1kit::tile2x4<false>(q + i * D, q + (i + 1) * D, kb + j * D, D, sc + i * kBlock + j,
                                sc + (i + 1) * kBlock + j, nullptr);
        if (j < n) {
          dots(q + i * D, kb + j * D, D, n - j, D, sc + i * kBlock + j);
          dots(q + (i + 1) * D, kb + j * D, D, n - j, D, sc + (i + 1) * kBlock + j);
        }
      }
#endif
    for (; i < rows; ++i)
      for (int64_t j = 0; j < n; j += 8) dots(q + i * D, kb + j * D, D, std::min<int64_t>(8, n - j), D,
                                              sc + i * kBlock + j);
    for (int64_t i = 0; i < rows; ++i) {  // the online softmax
      count[i] = std::min(n, visible[i] - s);  // keys this query row may see in the block
      if (count[i] <= 0) continue;
      float* p = sc + i * kBlock;
      const float block_max = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); },
                                                         p, count[i]);
      const float m_new = std::max(m[i], block_max);
      alpha[i] = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
      at::vec::map([m_new](Vec x) { return (x - Vec(m_new)).exp_u20(); }, p, p, count[i]);
      l[i] = l[i] * alpha[i] + at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, p, count[i]);
      m[i] = m_new;
    }
    for (int64_t i = 0, j; i < rows; i = j) {  // the values, for each run of rows that see the same keys
      for (j = i + 1; j < rows && count[j] == count[i]; ++j) {}
      if (count[i] > 0)
        accumulate(acc + i * R, R, alpha + i, sc + i * kBlock, kBlock, 1, vb, val_stride,
                   count[i], R, j - i);
    }
  }
}

// One attention problem: a (row, key head)'s query rows over its cache rows.
struct Problem {
  const float* q;
  const void* keys;  // its first cache row (of the cache's element type)
  const void* vals;
  const int64_t* visible;  // per query row: keys it sees
  int64_t S;               // keys of the problem (the last query's)
  float* out;              // (rows, R)
};

void attend(const std::vector<Problem>& problems, Elem e, int64_t rows, int64_t D, int64_t R, int64_t val_stride) {
  // work items: (problem, chunk of its keys); enough chunks to keep every thread busy on long rows
  const int64_t P = problems.size(), threads = at::get_num_threads();
  std::vector<int64_t> first(P + 1, 0), chunk_len(P);
  for (int64_t b = 0; b < P; ++b) {
    const int64_t S = problems[b].S;
    const int64_t want = std::max<int64_t>(1, (threads + P - 1) / P);
    const int64_t chunks = std::max<int64_t>(1, std::min(want, S / kMinChunk));
    chunk_len[b] = (S + chunks - 1) / chunks;
    first[b + 1] = first[b] + (S + chunk_len[b] - 1) / chunk_len[b];
  }
  const int64_t items = first[P];
  // query rows in groups of eight that see the same keys: the lane-per-row path; else in groups of four: two keys
  // by four rows a vector
  bool by8 = false, by4 = false;
#if defined(CPU_CAPABILITY_AVX2)
  by8 = rows % 8 == 0, by4 = rows % 4 == 0 && D % 2 == 0;
  for (int64_t b = 0; b < P && (by8 || by4); ++b)
    for (int64_t i = 0; i < rows; ++i) {
      by8 = by8 && problems[b].visible[i] == problems[b].visible[i / 8 * 8];
      by4 = by4 && problems[b].visible[i] == problems[b].visible[i / 4 * 4];
    }
#endif
  std::vector<float> m(items * rows), l(items * rows), acc(items * rows * R);
  auto merge = [&](int64_t b) {  // problem b's chunks -> its output rows
    for (int64_t i = 0; i < rows; ++i) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = first[b]; c < first[b + 1]; ++c) mx = std::max(mx, m[c * rows + i]);
      float* o = problems[b].out + i * R;
      std::fill(o, o + R, 0.f);
      float denom = 0.f;
      for (int64_t c = first[b]; c < first[b + 1]; ++c) {
        if (l[c * rows + i] == 0.f) continue;  // a chunk past what this query row sees
        const float w = std::exp(m[c * rows + i] - mx);
        denom += w * l[c * rows + i];
        const float* a = acc.data() + (c * rows + i) * R;
        for (int64_t d = 0; d < R; ++d) o[d] += w * a[d];
      }
      for (int64_t d = 0; d < R; ++d) o[d] /= denom;
    }
  };
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = std::upper_bound(first.begin(), first.end(), it) - first.begin() - 1;
      const Problem& pr = problems[b];
      const int64_t s0 = (it - first[b]) * chunk_len[b], s1 = std::min(pr.S, s0 + chunk_len[b]);
      float *mi = m.data() + it * rows, *li = l.data() + it * rows, *ai = acc.data() + it * rows * R;
#if defined(CPU_CAPABILITY_AVX2)
      if (by8) {
#if defined(__AVX512F__)
        if (D % 2 == 0 && R % 2 == 0)
          attend_chunk8<true>(pr.q, pr.keys, pr.vals, e, rows, D, R, val_stride, pr.visible, s0, s1, mi, li, ai);
        else
#endif
          attend_chunk8<false>(pr.q, pr.keys, pr.vals, e, rows, D, R, val_stride, pr.visible, s0, s1, mi, li, ai);
      } else if (by4) {
        attend_chunk4(pr.q, pr.keys, pr.vals, e, rows, D, R, val_stride, pr.visible, s0, s1, mi, li, ai);
      } else
#endif
        attend_chunk(pr.q, pr.keys, pr.vals, e, rows, D, R, val_stride, pr.visible, s0, s1, mi, li, ai);
      if (first[b + 1] - first[b] == 1) merge(b);  // a problem in one chunk: done here, on this thread
    }
  });
  for (int64_t b = 0; b < P; ++b)  // the chunks of the split ones
    if (first[b + 1] - first[b] > 1) merge(b);
}

// Per batch row: its cache slot, its keys' count, and how many keys each of its query rows sees (query t = i / group).
void rows_of(const at::Tensor& slots, const at::Tensor& positions, int64_t rows, int64_t group, int64_t n_slots,
             int64_t max_len, std::vector<int64_t>& slot, std::vector<int64_t>& S, std::vector<int64_t>& visible) {
  const auto sl = slots.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const int64_t B = pos.size(0), T = pos.size(1);
  TORCH_CHECK(sl.numel() == B && rows == T * group, "shape mismatch");
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  slot.resize(B), S.resize(B), visible.resize(B * rows);
  for (int64_t b = 0; b < B; ++b) {
    slot[b] = sp[b], S[b] = pp[b * T + T - 1] + 1;
    TORCH_CHECK(S[b] <= max_len && slot[b] >= 0 && slot[b] < n_slots, "position or slot out of range");
    for (int64_t i = 0; i < rows; ++i) visible[b * rows + i] = pp[b * T + i / group] + 1;
  }
}

at::Tensor latent_attention(const at::Tensor& qq, const at::Tensor& cache, const at::Tensor& slots,
                            const at::Tensor& positions, int64_t heads, int64_t rank) {
  TORCH_CHECK(qq.scalar_type() == at::kFloat, "queries must be float32");
  const Elem e = elem_of(cache);
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 3, "cache must be contiguous (slots, max_len, D)");
  const auto q = qq.contiguous();
  const int64_t B = q.size(0), rows = q.size(1), D = q.size(2), max_len = cache.size(1);
  TORCH_CHECK(D == cache.size(2) && rank <= D, "shape mismatch");
  std::vector<int64_t> slot, S, visible;
  rows_of(slots, positions, rows, heads, cache.size(0), max_len, slot, S, visible);
  auto out = at::empty({B, rows, rank}, q.options());
  const char* cp = static_cast<const char*>(cache.data_ptr());
  std::vector<Problem> problems;
  for (int64_t b = 0; b < B; ++b) {
    const void* rows_b = cp + slot[b] * max_len * D * cache.element_size();  // keys; values: their first `rank` columns
    problems.push_back({q.data_ptr<float>() + b * rows * D, rows_b, rows_b, visible.data() + b * rows, S[b],
                        out.data_ptr<float>() + b * rows * rank});
  }
  attend(problems, e, rows, D, rank, D);
  return out;
}

at::Tensor gqa_attention(const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& slots, const at::Tensor& positions) {
  TORCH_CHECK(q_.scalar_type() == at::kFloat, "queries must be float32");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must have one dtype");
  const Elem e = elem_of(k_cache);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
              k_cache.sizes() == v_cache.sizes(), "caches must be contiguous (slots, Hkv, max_len, D)");
  auto q = q_.contiguous();
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), D = q.size(3), max_len = k_cache.size(2);
  TORCH_CHECK(Hkv == k_cache.size(1) && D == k_cache.size(3), "shape mismatch");
  // One position a row with 3, 5, 6 or 7 query heads a key head (the R1-Distill-Qwen students have 6 (1.5B), 7 (7B)
  // and 5 (14B, 32B)): padded with zero rows to 4 or 8, they take the four-row or the lane-per-row path, 1.1-1.5x the
  // row-at-a-time path for 3 and 7. 6 and 5 at head size 128: 1.32x and 1.13x at 4k keys, 1.05x and 1.00x at 16 rows
  // x 256 keys (when the lane path was slower, before its rows went by sixteen columns, 5 and 6 lost at batch 16).
  const int64_t rows = positions.size(1) != 1 ? G : G % 4 == 3 ? G + 1 : G == 5 || G == 6 ? 8 : G;
  if (rows != G) q = at::constant_pad_nd(q, {0, 0, 0, rows - G});
  std::vector<int64_t> slot, S, visible;
  rows_of(slots, positions, rows, rows / positions.size(1), k_cache.size(0), max_len, slot, S, visible);
  auto out = at::empty_like(q);
  const char* kp = static_cast<const char*>(k_cache.data_ptr());
  const char* vp = static_cast<const char*>(v_cache.data_ptr());
  const int64_t es = k_cache.element_size();
  std::vector<Problem> problems;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t at_row = ((slot[b] * Hkv) + g) * max_len * D, qi = (b * Hkv + g) * rows * D;
      problems.push_back({q.data_ptr<float>() + qi, kp + at_row * es, vp + at_row * es, visible.data() + b * rows, S[b],
                          out.data_ptr<float>() + qi});
    }
  attend(problems, e, rows, D, D, D);
  return rows == G ? out : out.narrow(2, 0, G).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1kit_cpu, m) {
  m.def("latent_attention(Tensor qq, Tensor cache, Tensor slots, Tensor positions, int heads, int rank) -> Tensor");
  m.impl("latent_attention", c10::DispatchKey::CPU, &latent_attention);
  m.def("gqa_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions) -> Tensor");
  m.impl("gqa_attention", c10::DispatchKey::CPU, &gqa_attention);
}
