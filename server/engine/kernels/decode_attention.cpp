// Decode-step attention on AVX-512 or AVX2 (whichever the build's flags target): each row's G query
// heads per kv head over that kv head's keys 0..length-1, read from the static cache in place
// (server/engine/runners/static/decode.py).
//
// Why our own: torch's CPU SDPA is a flash kernel for long query blocks; a decode row has G (here
// 3) queries per kv head, so each (row, kv head) became two tiny MKL GEMMs plus a softmax, and at a
// batch of 8 those calls were a third of the int4 step. Here a task is one (row, kv head): scores
// as dot products from registers, softmax with a vectorized exp, and the weighted sum of values,
// with no mask (each row stops at its own length) and nothing copied.
//
//   q        [S, KVH, G, D] fp32 (contiguous)    lengths [S] int64 (keys 0..length-1 are visible)
//   k_cache  [slots, KVH, L, D] fp32              v_cache the same; slots >= S, L >= max(lengths)
//   out      [S, KVH, G, D] fp32 = softmax(scale * q k^T) v
// D must be a multiple of 16, at most 256; G at most 8.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

// The few vector operations below, on the widest registers the build targets.
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float a) { return _mm512_set1_ps(a); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vround(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vtimes_pow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
#else  // AVX2 and FMA
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float a) { return _mm256_set1_ps(a); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vround(Vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline Vec vtimes_pow2(Vec p, Vec n) {  // p * 2^n for integer n in -126..127: 2^n written as exponent bits
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

constexpr int kMaxChunks = 256 / kLanes;  // D / kLanes
constexpr int kMaxGroup = 8;

// e^x for x <= 0 (scores minus their maximum): 2^(x log2 e) split as 2^n * 2^f, n the nearest
// integer, f in [-1/2, 1/2], 2^f by its degree-6 Taylor polynomial (relative error < 1.2e-7); below
// about -87 it gives 2^-126 instead of 0, nothing beside the maximum's 1.
inline Vec exp_nonpositive(Vec x) {
  const Vec t = vmax(vmul(x, vset(1.44269504088896341f)), vset(-126.f));
  const Vec n = vround(t);
  const Vec f = vsub(t, n);
  Vec p = vset(1.5403530393381606e-4f);  // Taylor coefficients of 2^f = e^(f ln 2)
  p = vfmadd(p, f, vset(1.3333558146428443e-3f));
  p = vfmadd(p, f, vset(9.6181291076284772e-3f));
  p = vfmadd(p, f, vset(5.5504108664821580e-2f));
  p = vfmadd(p, f, vset(2.4022650695910071e-1f));
  p = vfmadd(p, f, vset(6.9314718055994531e-1f));
  p = vfmadd(p, f, vset(1.f));
  return vtimes_pow2(p, n);
}

void attend(const float* q, const float* keys, const float* values, int64_t length, int G, int chunks, float scale,
            float* out, std::vector<float>& scores) {
  const int64_t D = chunks * kLanes;
  scores.resize(G * length);
  Vec qv[kMaxGroup][kMaxChunks];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < chunks; ++c) qv[g][c] = vmul(vload(q + g * D + c * kLanes), vset(scale));
  // scores[g][t] = scale * q_g . k_t
  for (int64_t t = 0; t < length; ++t) {
    const float* k = keys + t * D;
    for (int g = 0; g < G; ++g) {
      Vec acc = vmul(qv[g][0], vload(k));
      for (int c = 1; c < chunks; ++c) acc = vfmadd(qv[g][c], vload(k + c * kLanes), acc);
      scores[g * length + t] = vsum(acc);
    }
  }
  // softmax per query, in place (the last length % kLanes scores one at a time)
  float total[kMaxGroup];
  for (int g = 0; g < G; ++g) {
    float* s = scores.data() + g * length;
    float top = -INFINITY;
    for (int64_t t = 0; t < length; ++t) top = std::max(top, s[t]);
    Vec sum = vzero();
    const Vec top_v = vset(top);
    int64_t t = 0;
    for (; t + kLanes <= length; t += kLanes) {
      const Vec e = exp_nonpositive(vsub(vload(s + t), top_v));
      vstore(s + t, e);
      sum = vadd(sum, e);
    }
    total[g] = vsum(sum);
    for (; t < length; ++t) total[g] += (s[t] = std::exp(s[t] - top));
  }
  // out_g = sum_t p[g][t] v_t / total_g
  Vec acc[kMaxGroup][kMaxChunks];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < chunks; ++c) acc[g][c] = vzero();
  for (int64_t t = 0; t < length; ++t) {
    const float* v = values + t * D;
    for (int c = 0; c < chunks; ++c) {
      const Vec vc = vload(v + c * kLanes);
      for (int g = 0; g < G; ++g) acc[g][c] = vfmadd(vset(scores[g * length + t]), vc, acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const Vec inv = vset(1.f / total[g]);
    for (int c = 0; c < chunks; ++c) vstore(out + g * D + c * kLanes, vmul(acc[g][c], inv));
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "decode_attention: bad shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "decode_attention: fp32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: the cache must be contiguous");
  const int64_t S = q.size(0), KVH = q.size(1), G = q.size(2), D = q.size(3), L = k_cache.size(2);
  TORCH_CHECK(D % 16 == 0 && D <= 256 && G <= kMaxGroup && k_cache.size(1) == KVH &&
              k_cache.size(3) == D && k_cache.size(0) >= S && lengths.numel() == S, "decode_attention: unsupported shapes");
  const auto qc = q.contiguous();
  const auto len = lengths.to(at::kLong).contiguous();
  const int64_t* n = len.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(n[s] >= 1 && n[s] <= L, "decode_attention: a length outside the cache");
  auto out = at::empty_like(qc);
  const float *qp = qc.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, S * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / KVH, h = task % KVH;
      const int64_t cache_offset = (s * KVH + h) * L * D;
      attend(qp + task * G * D, kp + cache_offset, vp + cache_offset, n[s], (int)G, (int)(D / kLanes), (float)scale,
             op + task * G * D, scores);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasb_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fasb_kernels, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
