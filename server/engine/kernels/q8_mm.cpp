// Quantized weights x activations in two int8 parts: the decode-step matmuls of `Int4Linear` and
// `Q8Linear` on CPU (server/engine/quantize.py; built and loaded by server/engine/cpu_kernels.py),
// for AVX-512 VNNI or, built with other flags, AVX2 (the same arithmetic on 8 lanes: below).
//
// Activations: each group of 32 is written as x ~ d * (254 * hi + lo) with hi and lo int8
// (d = max|x| / 127 / 254: ~15 bits per activation, finer than bf16's 8), so a group's product is
// integer work for VPDPBUSD (unsigned bytes times signed bytes, 4 at a time; on AVX2 VPMADDUBSW then
// VPMADDWD, or for Q8_0 VPMADDWD on 254 * hi + lo as one int16). llama.cpp runs the same weights with
// one int8 part (x ~ d * a): 2x less integer work, but on this model 2.6x torch's teacher-forced KL to
// fp32; two parts are as close as bf16 activations.
//
// int4_q8_mm: y[m, n] = sum_k w[n, k] x[m, k] with w[n, k] = q[n, k] * scale[n, g] + min[n, g],
// g = k / 32: GGUF's Q4_1, scale and min in fp16 as there, so the default model's shipped weights
// are represented exactly:
//   sum_k w x  ~  scale * d * sum q a + min * sum x,   a = 254 * hi + lo
// (the min term uses the exact sum of x). Unpacking int4 to floats for every product, as torch's
// and inductor's kernels do, is 2-3x slower per matmul in isolation; inside the decode step, where
// the weights come from the L3 cache, the gain is 0-6% (docs/architecture.md "Quantized weights").
//
// int8_q8_mm: the same with w[n, k] = q[n, k] * scale[n, g], q in -127..127: GGUF's Q8_0 (the
// default model's LM head). The codes are stored as q + 128 (unsigned, as VPDPBUSD's first operand
// wants) and the offset is taken out in integers, exactly: sum q a = sum (q + 128) a - 128 sum a.
//
// The weights are laid out for 16 output rows at a time, so each 512-bit lane is one output row
// and a group needs no horizontal sums:
//   int4 packed     [N/16, K/8, 64] uint8: rows 16b..16b+15, k-step j (k = 8j..8j+7): byte 4r+t holds
//                   code(16b+r, 8j+t) in its low nibble and code(16b+r, 8j+4+t) in its high one;
//   int4 scale_min  [N/16, K/32, 2, 16] fp16: per group, the 16 rows' scales, then their minimums;
//   int8 packed     [N/16, K/4, 64] uint8: k-step j (k = 4j..4j+3): byte 4r+t holds code(16b+r, 4j+t) + 128;
//   int8 scale      [N/16, K/32, 16] fp16: per group, the 16 rows' scales.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr float kLowSteps = 254.f;  // the low part's step is the high part's / 254

struct QuantizedRows {  // the activations per group of 32: x ~ d * (254 * hi + lo), hi and lo int8
  std::vector<int8_t> hi;  // [M, K] (empty when the codes are kept as one int16)
  std::vector<int8_t> lo;  // [M, K]: the rounding error of hi, in steps of d
  std::vector<float> d;    // [M, G] scale of each group (the low part's step)
  std::vector<float> sum;  // [M, G] exact sum of each group's activations
  std::vector<int32_t> codes_sum;  // [M, G] sum of each group's 254 * hi + lo (AVX-512's Q8_0 offset)
  std::vector<int16_t> codes;      // [M, K] 254 * hi + lo in one int16 (AVX2's Q8_0 path only)
  int64_t K, G;

  // int16_codes: the one form a kernel reads, `codes` or `hi` and `lo`, is the one written
  QuantizedRows(int64_t M, int64_t K_, bool int16_codes)
      : hi(int16_codes ? 0 : M * K_), lo(int16_codes ? 0 : M * K_), d(M * (K_ / 32)), sum(M * (K_ / 32)),
        codes_sum(M * (K_ / 32)), codes(int16_codes ? M * K_ : 0), K(K_), G(K_ / 32) {}
};

#if defined(__AVX512VNNI__)

// Activation rows in blocks of 8 as well as 4: measured only on AVX2 (below), so off here.
constexpr bool kWideRows = false;
constexpr bool kInt8Int16Codes = false;  // Q8_0 here reads hi and lo (VPDPBUSD) and codes_sum

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, bool /* int16_codes: never, see above */) {
  QuantizedRows q(M, K, false);
  const int64_t G = q.G;
  const __m512 sign = _mm512_set1_ps(-0.f), steps = _mm512_set1_ps(kLowSteps);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t i = 0; i < M * G; ++i) {  // one group of 32 = two vectors of 16
    const __m512 x0 = _mm512_loadu_ps(x + i * 32), x1 = _mm512_loadu_ps(x + i * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
    const float step = amax / 127.f / kLowSteps;
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 1.f / step : 0.f);
    __m512 coded = _mm512_setzero_ps();  // 254 * hi + lo, exact in fp32 (|.| < 2^15 each, < 2^20 summed)
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_mul_ps(h ? x1 : x0, inv);  // in steps of d: |v| <= 127 * 254
      const __m512 hi = _mm512_roundscale_ps(_mm512_div_ps(v, steps), kNearest);
      const __m512 lo = _mm512_roundscale_ps(_mm512_fnmadd_ps(hi, steps, v), kNearest);  // |lo| <= 127
      coded = _mm512_add_ps(coded, _mm512_fmadd_ps(hi, steps, lo));
      _mm_storeu_si128((__m128i*)(q.hi.data() + i * 32 + 16 * h), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(hi)));
      _mm_storeu_si128((__m128i*)(q.lo.data() + i * 32 + 16 * h), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(lo)));
    }
    q.d[i] = step;
    q.sum[i] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
    q.codes_sum[i] = _mm512_reduce_add_epi32(_mm512_cvtps_epi32(coded));
  }
  return q;
}

inline __m512 load_fp16x16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// One weight block (16 output rows) for activation rows m..m+MB-1: a group's codes are unpacked
// once and used for every row.
template <int MB>
void block_rows(const uint8_t* w, const uint16_t* sm, const QuantizedRows& x, int64_t m, float* out, int64_t N) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MB];
  for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < x.G; ++g) {
    __m512i codes[8];  // k-steps 0..7 of the group, 16 rows x 4 codes each
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512((const void*)(w + (g * 4 + j) * 64));
      codes[2 * j] = _mm512_and_si512(v, low4);
      codes[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    const __m512 scale = load_fp16x16(sm + g * 32), minimum = load_fp16x16(sm + g * 32 + 16);
    for (int r = 0; r < MB; ++r) {
      const int64_t rg = (m + r) * x.G + g;
      const int32_t* hi4 = reinterpret_cast<const int32_t*>(x.hi.data() + rg * 32);  // 8 steps of 4
      const int32_t* lo4 = reinterpret_cast<const int32_t*>(x.lo.data() + rg * 32);
      // four independent chains of dot products: one chain would wait on each one's latency
      __m512i hi[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
      __m512i lo[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
      for (int t = 0; t < 8; ++t) {
        hi[t & 1] = _mm512_dpbusd_epi32(hi[t & 1], codes[t], _mm512_set1_epi32(hi4[t]));
        lo[t & 1] = _mm512_dpbusd_epi32(lo[t & 1], codes[t], _mm512_set1_epi32(lo4[t]));
      }
      // |254 * hi + lo| <= 254 * 32 * 15 * 127 + 32 * 15 * 127, about 2^30: inside int32
      const __m512i both = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_add_epi32(hi[0], hi[1]), _mm512_set1_epi32(254)),
                                            _mm512_add_epi32(lo[0], lo[1]));
      const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(both), _mm512_set1_ps(x.d[rg]));
      acc[r] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(x.sum[rg]), _mm512_fmadd_ps(scale, dot, acc[r]));
    }
  }
  for (int r = 0; r < MB; ++r) _mm512_storeu_ps(out + (m + r) * N, acc[r]);
}

// The same for Q8_0 weights: a group's 8 k-steps are 8 loads, no unpacking; the offset of the
// stored codes (+128) leaves the integer sum exactly.
template <int MB>
void block_rows_int8(const uint8_t* w, const uint16_t* sc, const QuantizedRows& x, int64_t m, float* out, int64_t N) {
  __m512 acc[MB];
  for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < x.G; ++g) {
    __m512i codes[8];  // k-steps 0..7 of the group, 16 rows x 4 codes each
    for (int j = 0; j < 8; ++j) codes[j] = _mm512_loadu_si512((const void*)(w + (g * 8 + j) * 64));
    const __m512 scale = load_fp16x16(sc + g * 16);
    for (int r = 0; r < MB; ++r) {
      const int64_t rg = (m + r) * x.G + g;
      const int32_t* hi4 = reinterpret_cast<const int32_t*>(x.hi.data() + rg * 32);
      const int32_t* lo4 = reinterpret_cast<const int32_t*>(x.lo.data() + rg * 32);
      __m512i hi[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
      __m512i lo[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
      for (int t = 0; t < 8; ++t) {
        hi[t & 1] = _mm512_dpbusd_epi32(hi[t & 1], codes[t], _mm512_set1_epi32(hi4[t]));
        lo[t & 1] = _mm512_dpbusd_epi32(lo[t & 1], codes[t], _mm512_set1_epi32(lo4[t]));
      }
      // |254 * sum (q + 128) hi| <= 254 * 32 * 255 * 127, about 2^28; 128 * |codes_sum| < 2^28: inside int32
      const __m512i with_offset = _mm512_add_epi32(
          _mm512_mullo_epi32(_mm512_add_epi32(hi[0], hi[1]), _mm512_set1_epi32(254)), _mm512_add_epi32(lo[0], lo[1]));
      const __m512i both = _mm512_sub_epi32(with_offset, _mm512_set1_epi32(128 * x.codes_sum[rg]));
      acc[r] = _mm512_fmadd_ps(scale, _mm512_mul_ps(_mm512_cvtepi32_ps(both), _mm512_set1_ps(x.d[rg])), acc[r]);
    }
  }
  for (int r = 0; r < MB; ++r) _mm512_storeu_ps(out + (m + r) * N, acc[r]);
}

#else
// AVX2, FMA and F16C (e.g. AMD Zen 2/3): the same numbers, 8 lanes wide. A 64-byte k-step holds
// two halves of 8 output rows each, taken one after the other. VPMADDUBSW multiplies unsigned by
// signed bytes into saturating int16 pairs, so each use below is bounded to stay exact.

// Blocks of 8 activation rows unpack each weight group once for 8 rows, not twice for 4: int4 layers
// 1.2-1.4x faster at 8 and 16 rows on a Zen 3 (bench/results/2026-12-07.md).
constexpr bool kWideRows = true;
constexpr bool kInt8Int16Codes = true;  // Q8_0 here reads 254 * hi + lo as one int16 (block_rows_int8)

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// 32 int32 (each inside -127..127) in four vectors -> 32 int8 in the same order: the packs work per
// 128-bit lane, the permute puts the 4-byte pieces back in order.
inline __m256i to_bytes(const __m256i v[4]) {
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, bool int16_codes) {
  QuantizedRows q(M, K, int16_codes);
  const int64_t G = q.G;
  const __m256 sign = _mm256_set1_ps(-0.f), steps = _mm256_set1_ps(kLowSteps);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t i = 0; i < M * G; ++i) {  // one group of 32 = four vectors of 8
    __m256 xs[4];
    for (int h = 0; h < 4; ++h) xs[h] = _mm256_loadu_ps(x + i * 32 + 8 * h);
    const float amax = max8(_mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, xs[0]), _mm256_andnot_ps(sign, xs[1])),
                                          _mm256_max_ps(_mm256_andnot_ps(sign, xs[2]), _mm256_andnot_ps(sign, xs[3]))));
    const float step = amax / 127.f / kLowSteps;
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 1.f / step : 0.f);
    __m256i hi_codes[4], lo_codes[4], both[4];  // no codes_sum: block_rows_int8 below has no offset
    for (int h = 0; h < 4; ++h) {
      const __m256 v = _mm256_mul_ps(xs[h], inv);
      const __m256 hi = _mm256_round_ps(_mm256_div_ps(v, steps), kNearest);
      const __m256 lo = _mm256_round_ps(_mm256_fnmadd_ps(hi, steps, v), kNearest);
      if (int16_codes) {
        both[h] = _mm256_cvtps_epi32(_mm256_fmadd_ps(hi, steps, lo));  // exact: |.| <= 254 * 127 + 127 < 2^15
      } else {
        hi_codes[h] = _mm256_cvtps_epi32(hi);
        lo_codes[h] = _mm256_cvtps_epi32(lo);
      }
    }
    if (int16_codes) {
      for (int h = 0; h < 2; ++h)  // the packs interleave the 128-bit lanes; the permute restores k's order
        _mm256_storeu_si256((__m256i*)(q.codes.data() + i * 32 + 16 * h),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(both[2 * h], both[2 * h + 1]), 0xD8));
    } else {
      _mm256_storeu_si256((__m256i*)(q.hi.data() + i * 32), to_bytes(hi_codes));
      _mm256_storeu_si256((__m256i*)(q.lo.data() + i * 32), to_bytes(lo_codes));
    }
    q.d[i] = step;
    q.sum[i] = sum8(_mm256_add_ps(_mm256_add_ps(xs[0], xs[1]), _mm256_add_ps(xs[2], xs[3])));
  }
  return q;
}

inline __m256 load_fp16x8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// Both kernels' first pass over a block (half 0) prefetches its codes 2 KB ahead of the loads: the
// rest of the block, then the next one's, which follows it in memory. At one activation row a core
// streams the weights slower than the memory serves them, and the hardware prefetcher alone does not
// run far enough ahead. On a Zen 3 at one row: the LM head 1.20 -> 0.93 ms, the int4 layers 7%
// faster; at 4 and 8 rows no loss (1, 2 and 4 KB within the noise of each other;
// bench/bench_kernels.py, bench/results/2026-12-08.md).
constexpr int64_t kPrefetchBytes = 2048;

template <int MB>
void block_rows(const uint8_t* w, const uint16_t* sm, const QuantizedRows& x, int64_t m, float* out, int64_t N) {
  // VPMADDWD with 254 (not 1) sums the high part's int16 pairs already scaled, sparing a VPMULLD
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), steps = _mm256_set1_epi16(254);
  for (int half = 0; half < 2; ++half) {  // output rows 8 * half .. 8 * half + 7
    __m256 acc[MB];
    for (int r = 0; r < MB; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < x.G; ++g) {
      __m256i codes[8];
      if (half == 0)  // a hint: no fault past the end of the weights
        for (int j = 0; j < 4; ++j) _mm_prefetch((const char*)(w + (g * 4 + j) * 64 + kPrefetchBytes), _MM_HINT_T0);
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + (g * 4 + j) * 64 + 32 * half));
        codes[2 * j] = _mm256_and_si256(v, low4);
        codes[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
      const __m256 scale = load_fp16x8(sm + g * 32 + 8 * half), minimum = load_fp16x8(sm + g * 32 + 16 + 8 * half);
      for (int r = 0; r < MB; ++r) {
        const int64_t rg = (m + r) * x.G + g;
        const int32_t* hi4 = reinterpret_cast<const int32_t*>(x.hi.data() + rg * 32);
        const int32_t* lo4 = reinterpret_cast<const int32_t*>(x.lo.data() + rg * 32);
        // a group's int16 pair sums stay exact: 8 steps x 2 products x 15 x 127 = 30480 < 2^15
        __m256i hi = _mm256_setzero_si256(), lo = _mm256_setzero_si256();
        for (int t = 0; t < 8; ++t) {
          hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(codes[t], _mm256_set1_epi32(hi4[t])));
          lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(codes[t], _mm256_set1_epi32(lo4[t])));
        }
        const __m256i both = _mm256_add_epi32(_mm256_madd_epi16(hi, steps), _mm256_madd_epi16(lo, ones));
        const __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(both), _mm256_set1_ps(x.d[rg]));
        acc[r] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(x.sum[rg]), _mm256_fmadd_ps(scale, dot, acc[r]));
      }
    }
    for (int r = 0; r < MB; ++r) _mm256_storeu_ps(out + (m + r) * N + 8 * half, acc[r]);
  }
}

// Q8_0: VPMADDUBSW's unsigned operand would be q + 128 (up to 255), whose pair sums overflow int16,
// so the codes are sign-extended to int16 and multiplied by 254 * hi + lo in one int16 with
// VPMADDWD: the same integer sum as two byte passes, in half the instructions. Unpacking a k-step's
// 8 rows x 4 codes within each 128-bit lane gives rows (0, 1 | 4, 5) and (2, 3 | 6, 7), two int32
// lanes per row; one VPHADDD at the group's end puts rows 0..7 in order.
template <int MB>
void block_rows_int8(const uint8_t* w, const uint16_t* sc, const QuantizedRows& x, int64_t m, float* out, int64_t N) {
  const __m256i offset = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
  for (int half = 0; half < 2; ++half) {
    __m256 acc[MB];
    for (int r = 0; r < MB; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < x.G; ++g) {
      if (half == 0)  // a hint: no fault past the end of the weights
        for (int j = 0; j < 8; ++j) _mm_prefetch((const char*)(w + (g * 8 + j) * 64 + kPrefetchBytes), _MM_HINT_T0);
      __m256i front[8], back[8];  // q as int16: rows 0, 1 | 4, 5 and rows 2, 3 | 6, 7, 4 codes each
      for (int j = 0; j < 8; ++j) {
        const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + (g * 8 + j) * 64 + 32 * half)),
                                           offset);
        const __m256i sign = _mm256_cmpgt_epi8(zero, q);
        front[j] = _mm256_unpacklo_epi8(q, sign);
        back[j] = _mm256_unpackhi_epi8(q, sign);
      }
      const __m256 scale = load_fp16x8(sc + g * 16 + 8 * half);
      for (int r = 0; r < MB; ++r) {
        const int64_t rg = (m + r) * x.G + g;
        const int64_t* codes4 = reinterpret_cast<const int64_t*>(x.codes.data() + rg * 32);  // 8 steps of 4
        // |sum| <= 32 x 127 x 32385, about 2^27: inside int32
        __m256i sum_front = zero, sum_back = zero;
        for (int t = 0; t < 8; ++t) {
          const __m256i a = _mm256_set1_epi64x(codes4[t]);
          sum_front = _mm256_add_epi32(sum_front, _mm256_madd_epi16(front[t], a));
          sum_back = _mm256_add_epi32(sum_back, _mm256_madd_epi16(back[t], a));
        }
        const __m256i both = _mm256_hadd_epi32(sum_front, sum_back);
        acc[r] = _mm256_fmadd_ps(scale, _mm256_mul_ps(_mm256_cvtepi32_ps(both), _mm256_set1_ps(x.d[rg])), acc[r]);
      }
    }
    for (int r = 0; r < MB; ++r) _mm256_storeu_ps(out + (m + r) * N + 8 * half, acc[r]);
  }
}

#endif

// What differs between the two weight formats, for the shared driver below.
struct Int4Format {
  static constexpr int kCodesPerStep = 8;  // a 64-byte k-step holds 8 codes per row
  static constexpr int kScalesPerRow = 2;  // per group: scale and minimum
  static constexpr bool kInt16Codes = false;  // the activations as hi and lo bytes
  template <int MB>
  static void rows(const uint8_t* w, const uint16_t* s, const QuantizedRows& x, int64_t m, float* out, int64_t N) {
    block_rows<MB>(w, s, x, m, out, N);
  }
};

struct Int8Format {
  static constexpr int kCodesPerStep = 4;
  static constexpr int kScalesPerRow = 1;
  static constexpr bool kInt16Codes = kInt8Int16Codes;
  template <int MB>
  static void rows(const uint8_t* w, const uint16_t* s, const QuantizedRows& x, int64_t m, float* out, int64_t N) {
    block_rows_int8<MB>(w, s, x, m, out, N);
  }
};

// Codes the activations once, then each thread takes whole blocks of 16 output rows, activation rows
// in blocks of 8 (AVX2 only: kWideRows), 4, 2 and 1.
template <class Format>
at::Tensor quantized_mm(const char* name, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == 64, name, ": bad shapes");
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf, name, ": bad dtypes");
  const auto xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), blocks = packed.size(0), N = blocks * 16;
  const int64_t steps = K / Format::kCodesPerStep, block_scales = (K / 32) * 16 * Format::kScalesPerRow;
  TORCH_CHECK(K % 32 == 0 && packed.size(1) == steps && scales.numel() == blocks * block_scales, name,
              ": weights do not match K");
  auto out = at::empty({M, N}, xf.options());
  const QuantizedRows q = quantize_rows(xf.data_ptr<float>(), M, K, Format::kInt16Codes);
  const auto packed_c = packed.contiguous(), scales_c = scales.contiguous();
  const uint8_t* w = packed_c.data_ptr<uint8_t>();
  const auto* sc = reinterpret_cast<const uint16_t*>(scales_c.data_ptr<at::Half>());
  float* y = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = w + b * steps * 64;
      const uint16_t* sb = sc + b * block_scales;
      int64_t m = 0;
      for (; m + 8 <= M && kWideRows; m += 8) Format::template rows<8>(wb, sb, q, m, y + b * 16, N);
      for (; m + 4 <= M; m += 4) Format::template rows<4>(wb, sb, q, m, y + b * 16, N);
      for (; m + 2 <= M; m += 2) Format::template rows<2>(wb, sb, q, m, y + b * 16, N);
      for (; m < M; ++m) Format::template rows<1>(wb, sb, q, m, y + b * 16, N);
    }
  });
  return out;
}

at::Tensor int4_q8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_min) {
  return quantized_mm<Int4Format>("int4_q8_mm", x, packed, scale_min);
}

at::Tensor int8_q8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  return quantized_mm<Int8Format>("int8_q8_mm", x, packed, scale);
}

}  // namespace

TORCH_LIBRARY(fasb_kernels, m) {
  m.def("int4_q8_mm(Tensor x, Tensor packed, Tensor scale_min) -> Tensor");
  m.def("int8_q8_mm(Tensor x, Tensor packed, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fasb_kernels, CPU, m) {
  m.impl("int4_q8_mm", &int4_q8_mm);
  m.impl("int8_q8_mm", &int8_q8_mm);
}
