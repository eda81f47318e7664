// A whole decode step of a dense model (Qwen2 / Llama: RMSNorm, RoPE, grouped-query attention, SwiGLU) on CPU, in
// one call from Python: torch.classes.r1kit_cpu.DenseDecoder, built once per engine over the model's weights and
// its K/V cache, then `step(tokens, positions, slots, greedy)` -> (logits (B, V) float32, argmax (B,) or empty).
//
// At decode sizes a step's kernels take about a third of its time in a compiled graph; the rest is the machinery
// around them (dynamo's guards and wrappers, the graph's ~100 arguments, a boxed dispatcher call per kernel, Python
// between steps). Here the projections and the attention are the same kernels (r1kit_cpu::small_linear*, ::
// gqa_attention, called unboxed through the dispatcher), and what lies between them (norms, rotations, the cache
// writes, SwiGLU, the residuals, the argmax) is a few loops over B x hidden floats. Its twin is the model's own
// forward with a cache (tests/test_engine.py compares the two).
//
// The class holds the tensors themselves, not copies: weights updated in place are read as they are; a weight
// replaced by another tensor needs a new DenseDecoder (the engine rebuilds it when the weights change).
#include <torch/custom_class.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
using Opt = std::optional<Tensor>;
using Vec = at::vec::Vectorized<float>;

struct Proj {  // a projection: weight (N, K), bias (N,)?, its 16-column panels (r1kit_cpu::pack_panels)?
  Tensor w;
  Opt b, p;
};

struct Layer {
  Tensor ln1, ln2;  // input_layernorm, post_attention_layernorm weights
  Proj q, k, v, o, gate, up, down;
  Tensor kc, vc;  // the layer's cache: (slots, Hkv, max_len, D), float32 / float16 / bfloat16
};

// An absent optional tensor crosses from Python as an empty one (a list of tensors holds no None).
Opt maybe(const Tensor& t) { return t.numel() ? Opt(t) : std::nullopt; }

// y = x / rms(x) * w, row by row: x, y (B, D). (The order of F.rms_norm: the mean of squares in float32.)
void rms_norm(const float* x, const float* w, float* y, int64_t B, int64_t D, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * D;
    float* yb = y + b * D;
    Vec acc(0.f);
    int64_t d = 0;
    for (; d + Vec::size() <= D; d += Vec::size()) {
      const Vec v = Vec::loadu(xb + d);
      acc = at::vec::fmadd(v, v, acc);
    }
    float ss = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
    for (; d < D; ++d) ss += xb[d] * xb[d];
    const float r = 1.f / std::sqrt(ss / D + eps);
    for (d = 0; d < D; ++d) yb[d] = xb[d] * r * w[d];
  }
}

// Rotate each head of x (B, heads * D) by its row's angles (cos, sin: (B, D/2)), Llama's half layout: element i
// pairs with i + D/2. Then scale by `scale`.
void rope(float* x, const float* cos, const float* sin, int64_t B, int64_t heads, int64_t D, float scale) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (b * heads + h) * D;
      const float *c = cos + b * half, *s = sin + b * half;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = v[i], x2 = v[i + half];
        v[i] = (x1 * c[i] - x2 * s[i]) * scale;
        v[i + half] = (x2 * c[i] + x1 * s[i]) * scale;
      }
    }
}

// new (B, Hkv * D) into cache (slots, Hkv, max_len, D) at [slot[b], :, pos[b]], rounded to the cache's dtype.
template <typename T>
void store(const Tensor& cache, const float* src, const std::vector<int64_t>& slot, const std::vector<int64_t>& pos,
           int64_t Hkv, int64_t D) {
  const int64_t max_len = cache.size(2);
  T* base = cache.data_ptr<T>();
  for (size_t b = 0; b < slot.size(); ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      T* dst = base + ((slot[b] * Hkv + h) * max_len + pos[b]) * D;
      const float* s = src + (b * Hkv + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(s[d]);
    }
}

void store_rows(const Tensor& cache, const float* src, const std::vector<int64_t>& slot,
                const std::vector<int64_t>& pos, int64_t Hkv, int64_t D) {
  switch (cache.scalar_type()) {
    case at::kFloat: return store<float>(cache, src, slot, pos, Hkv, D);
    case at::kHalf: return store<c10::Half>(cache, src, slot, pos, Hkv, D);
    case at::kBFloat16: return store<c10::BFloat16>(cache, src, slot, pos, Hkv, D);
    default: TORCH_CHECK(false, "DenseDecoder: caches must be float32, float16 or bfloat16");
  }
}

// g = silu(g) * u over n floats (F.silu's form: g / (1 + exp(-g))), split across the threads from 8k floats.
void silu_mul(float* g, const float* u, int64_t n) {
  at::parallel_for(0, (n + Vec::size() - 1) / Vec::size(), 1024, [&](int64_t v0, int64_t v1) {
    int64_t i = v0 * Vec::size();
    const int64_t end = std::min(n, v1 * Vec::size());
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const Vec x = Vec::loadu(g + i);
      (x / (Vec(1.f) + x.neg().exp()) * Vec::loadu(u + i)).store(g + i);
    }
    for (; i < end; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  });
}

void add(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// The first index of each row's largest value (as torch.argmax), rows of V floats.
void argmax_rows(const float* x, int64_t B, int64_t V, int64_t* out) {
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* r = x + b * V;
      Vec m(-std::numeric_limits<float>::infinity());
      int64_t i = 0;
      for (; i + Vec::size() <= V; i += Vec::size()) m = at::vec::maximum(m, Vec::loadu(r + i));
      float best = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, m);
      for (; i < V; ++i) best = std::isnan(r[i]) || r[i] > best ? r[i] : best;
      int64_t at = 0;
      if (std::isnan(best)) {
        while (!std::isnan(r[at])) ++at;
      } else {
        while (r[at] != best) ++at;
      }
      out[b] = at;
    }
  });
}

class DenseDecoder : public torch::CustomClassHolder {
 public:
  // tensors: embed (V, dim), norm (dim,), lm_head (V, dim), its panels or empty, inv_freq (D/2,); then per layer
  // ln1, ln2, (w, b or empty, panels or empty) for q, k, v, o, gate, up, down, then k_cache, v_cache.
  // ints: heads, kv_heads, head_dim. floats: rms_norm_eps, the rope attention factor.
  DenseDecoder(std::vector<Tensor> t, std::vector<int64_t> ints, std::vector<double> floats) {
    TORCH_CHECK(ints.size() == 3 && floats.size() == 2 && t.size() >= 5 && (t.size() - 5) % 25 == 0,
                "DenseDecoder: 5 + 25 per layer tensors, 3 ints and 2 floats expected");
    H_ = ints[0], Hkv_ = ints[1], D_ = ints[2];
    eps_ = floats[0], factor_ = floats[1];
    embed_ = t[0], norm_ = t[1], head_ = {t[2], std::nullopt, maybe(t[3])}, inv_freq_ = t[4];
    dim_ = embed_.size(1);
    TORCH_CHECK(H_ % Hkv_ == 0 && D_ % 2 == 0 && inv_freq_.numel() == D_ / 2, "DenseDecoder: bad head shapes");
    for (size_t i = 5; i < t.size(); i += 25) {
      Layer L;
      L.ln1 = t[i], L.ln2 = t[i + 1];
      Proj* projs[] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
      for (int j = 0; j < 7; ++j) *projs[j] = {t[i + 2 + 3 * j], maybe(t[i + 3 + 3 * j]), maybe(t[i + 4 + 3 * j])};
      L.kc = t[i + 23], L.vc = t[i + 24];
      TORCH_CHECK(L.kc.is_contiguous() && L.vc.is_contiguous() && L.kc.size(1) == Hkv_ && L.kc.size(3) == D_,
                  "DenseDecoder: caches (slots, kv_heads, max_len, head_dim), contiguous, expected");
      layers_.push_back(std::move(L));
    }
    for (const Tensor& x : t)
      TORCH_CHECK(x.device().is_cpu() && (x.numel() == 0 || x.is_contiguous()), "DenseDecoder: contiguous CPU tensors");
    auto& d = c10::Dispatcher::singleton();
    lin1_ = d.findSchemaOrThrow("r1kit_cpu::small_linear", "").typed<decltype(lin1_sig)>();
    lin2_ = d.findSchemaOrThrow("r1kit_cpu::small_linear2", "").typed<decltype(lin2_sig)>();
    lin3_ = d.findSchemaOrThrow("r1kit_cpu::small_linear3", "").typed<decltype(lin3_sig)>();
    attn_ = d.findSchemaOrThrow("r1kit_cpu::gqa_attention", "").typed<decltype(attn_sig)>();
  }

  std::tuple<Tensor, Tensor> step(std::vector<int64_t> tokens, std::vector<int64_t> positions,
                                  std::vector<int64_t> slots, bool greedy) {
    const int64_t B = tokens.size(), V = embed_.size(0), dim = dim_, D = D_, H = H_, Hkv = Hkv_;
    TORCH_CHECK(B > 0 && positions.size() == tokens.size() && slots.size() == tokens.size(),
                "DenseDecoder.step: tokens, positions and slots of one length expected");
    const int64_t max_slots = layers_.empty() ? 0 : layers_[0].kc.size(0);
    const int64_t max_len = layers_.empty() ? 0 : layers_[0].kc.size(2);
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(tokens[b] >= 0 && tokens[b] < V && slots[b] >= 0 && slots[b] < max_slots && positions[b] >= 0 &&
                  positions[b] < max_len, "DenseDecoder.step: token, slot or position out of range");
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    Tensor x = at::empty({B, dim}, f32), h = at::empty({B, dim}, f32);
    float* X = x.data_ptr<float>();
    float* Hs = h.data_ptr<float>();
    const float* E = embed_.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) std::memcpy(X + b * dim, E + tokens[b] * dim, dim * sizeof(float));
    // the rotation angles, as the model's context computes them: position * inv_freq in float32
    const int64_t half = D / 2;
    std::vector<float> cs(B * half), sn(B * half);
    const float* f = inv_freq_.data_ptr<float>();
    const float factor = static_cast<float>(factor_);
    for (int64_t b = 0; b < B; ++b) {  // (by vectors, as torch's: scalar calls took ~15 us a step at batch 16)
      const float p = static_cast<float>(positions[b]);
      int64_t i = 0;
      for (; i + Vec::size() <= half; i += Vec::size()) {
        const Vec a = Vec(p) * Vec::loadu(f + i);
        (a.cos() * Vec(factor)).store(cs.data() + b * half + i);
        (a.sin() * Vec(factor)).store(sn.data() + b * half + i);
      }
      for (; i < half; ++i) {
        const float a = p * f[i];
        cs[b * half + i] = std::cos(a) * factor;
        sn[b * half + i] = std::sin(a) * factor;
      }
    }
    const Tensor slot_t = at::tensor(slots, at::kLong), pos_t = at::tensor(positions, at::kLong).view({B, 1});
    const float eps = static_cast<float>(eps_), scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    for (const Layer& L : layers_) {
      rms_norm(X, L.ln1.data_ptr<float>(), Hs, B, dim, eps);
      auto [q, k, v] = lin3_->call(h, L.q.w, L.q.b, L.k.w, L.k.b, L.v.w, L.v.b, L.q.p, L.k.p, L.v.p);
      rope(q.data_ptr<float>(), cs.data(), sn.data(), B, H, D, scale);
      rope(k.data_ptr<float>(), cs.data(), sn.data(), B, Hkv, D, 1.f);
      store_rows(L.kc, k.data_ptr<float>(), slots, positions, Hkv, D);
      store_rows(L.vc, v.data_ptr<float>(), slots, positions, Hkv, D);
      const Tensor a = attn_->call(q.view({B, Hkv, H / Hkv, D}), L.kc, L.vc, slot_t, pos_t);
      add(X, lin1_->call(a.view({B, H * D}), L.o.w, L.o.b, L.o.p).data_ptr<float>(), B * dim);
      rms_norm(X, L.ln2.data_ptr<float>(), Hs, B, dim, eps);
      auto [g, u] = lin2_->call(h, L.gate.w, L.gate.b, L.up.w, L.up.b, L.gate.p, L.up.p);
      silu_mul(g.data_ptr<float>(), u.data_ptr<float>(), g.numel());
      add(X, lin1_->call(g, L.down.w, L.down.b, L.down.p).data_ptr<float>(), B * dim);
    }
    rms_norm(X, norm_.data_ptr<float>(), Hs, B, dim, eps);
    Tensor logits = lin1_->call(h, head_.w, head_.b, head_.p);
    Tensor picked = at::empty({greedy ? B : 0}, at::kLong);
    if (greedy) argmax_rows(logits.data_ptr<float>(), B, logits.size(1), picked.data_ptr<int64_t>());
    return {logits, picked};
  }

 private:
  static Tensor lin1_sig(const Tensor&, const Tensor&, const Opt&, const Opt&);
  static std::tuple<Tensor, Tensor> lin2_sig(const Tensor&, const Tensor&, const Opt&, const Tensor&, const Opt&,
                                             const Opt&, const Opt&);
  static std::tuple<Tensor, Tensor, Tensor> lin3_sig(const Tensor&, const Tensor&, const Opt&, const Tensor&,
                                                     const Opt&, const Tensor&, const Opt&, const Opt&, const Opt&,
                                                     const Opt&);
  static Tensor attn_sig(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);

  int64_t H_ = 0, Hkv_ = 0, D_ = 0, dim_ = 0;
  double eps_ = 0, factor_ = 1;
  Tensor embed_, norm_, inv_freq_;
  Proj head_;
  std::vector<Layer> layers_;
  std::optional<c10::TypedOperatorHandle<decltype(lin1_sig)>> lin1_;
  std::optional<c10::TypedOperatorHandle<decltype(lin2_sig)>> lin2_;
  std::optional<c10::TypedOperatorHandle<decltype(lin3_sig)>> lin3_;
  std::optional<c10::TypedOperatorHandle<decltype(attn_sig)>> attn_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1kit_cpu, m) {
  m.class_<DenseDecoder>("DenseDecoder")
      .def(torch::init<std::vector<Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("step", &DenseDecoder::step);
}
