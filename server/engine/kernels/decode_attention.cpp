// Decode-step attention on AVX-512: each row's G query heads per kv head over that kv head's keys
// 0..length-1, read from the static cache in place (server/engine/runners/static/decode.py).
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

constexpr int kMaxChunks = 16;  // D / 16
constexpr int kMaxGroup = 8;

// e^x for x <= 0 (scores minus their maximum): 2^(x log2 e) split as 2^n * 2^f, n the nearest
// integer, f in [-1/2, 1/2], 2^f by its degree-6 Taylor polynomial (relative error < 1.2e-7); below
// about -87 it gives 2^-126 instead of 0, nothing beside the maximum's 1.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);  // Taylor coefficients of 2^f = e^(f ln 2)
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

void attend(const float* q, const float* keys, const float* values, int64_t length, int G, int chunks, float scale,
            float* out, std::vector<float>& scores) {
  const int64_t D = chunks * 16;
  scores.resize(G * length);
  __m512 qv[kMaxGroup][kMaxChunks];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < chunks; ++c) qv[g][c] = _mm512_mul_ps(_mm512_loadu_ps(q + g * D + c * 16), _mm512_set1_ps(scale));
  // scores[g][t] = scale * q_g . k_t
  for (int64_t t = 0; t < length; ++t) {
    const float* k = keys + t * D;
    for (int g = 0; g < G; ++g) {
      __m512 acc = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(k));
      for (int c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[g][c], _mm512_loadu_ps(k + c * 16), acc);
      scores[g * length + t] = _mm512_reduce_add_ps(acc);
    }
  }
  // softmax per query, in place
  float total[kMaxGroup];
  for (int g = 0; g < G; ++g) {
    float* s = scores.data() + g * length;
    float top = -INFINITY;
    for (int64_t t = 0; t < length; ++t) top = std::max(top, s[t]);
    __m512 sum = _mm512_setzero_ps();
    const __m512 top_v = _mm512_set1_ps(top);
    int64_t t = 0;
    for (; t + 16 <= length; t += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), top_v));
      _mm512_storeu_ps(s + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (t < length) {
      const __mmask16 tail = (__mmask16)((1u << (length - t)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), top_v));
      _mm512_mask_storeu_ps(s + t, tail, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    total[g] = _mm512_reduce_add_ps(sum);
  }
  // out_g = sum_t p[g][t] v_t / total_g
  __m512 acc[kMaxGroup][kMaxChunks];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < chunks; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    const float* v = values + t * D;
    for (int c = 0; c < chunks; ++c) {
      const __m512 vc = _mm512_loadu_ps(v + c * 16);
      for (int g = 0; g < G; ++g) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * length + t]), vc, acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.f / total[g]);
    for (int c = 0; c < chunks; ++c) _mm512_storeu_ps(out + g * D + c * 16, _mm512_mul_ps(acc[g][c], inv));
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "decode_attention: bad shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "decode_attention: fp32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: the cache must be contiguous");
  const int64_t S = q.size(0), KVH = q.size(1), G = q.size(2), D = q.size(3), L = k_cache.size(2);
  TORCH_CHECK(D % 16 == 0 && D / 16 <= kMaxChunks && G <= kMaxGroup && k_cache.size(1) == KVH &&
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
      attend(qp + task * G * D, kp + cache_offset, vp + cache_offset, n[s], (int)G, (int)(D / 16), (float)scale,
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
