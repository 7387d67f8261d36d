// 16-float vectors for the CPU kernels (quant_cpu.cpp, step_cpu.cpp): one AVX-512 register, two AVX2
// registers, or a plain array the compiler vectorizes as it can, whichever -march=native allows.
#pragma once

#include <c10/util/Half.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace paged_simd {

#if defined(__AVX512F__)
struct V {
  __m512 a;
};
inline V zero() { return {_mm512_setzero_ps()}; }
inline V set1(float f) { return {_mm512_set1_ps(f)}; }
inline V load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v.a); }
inline V fma(V x, V y, V acc) { return {_mm512_fmadd_ps(x.a, y.a, acc.a)}; }
inline float hsum(V v) { return _mm512_reduce_add_ps(v.a); }
inline V from_i8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// 16 bfloat16 -> floats (a bfloat16 is the high half of a float32).
inline V from_bf16(const uint16_t* p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16))};
}
inline V add(V x, V y) { return {_mm512_add_ps(x.a, y.a)}; }
inline V sub(V x, V y) { return {_mm512_sub_ps(x.a, y.a)}; }
inline V mul(V x, V y) { return {_mm512_mul_ps(x.a, y.a)}; }
inline V max(V x, V y) { return {_mm512_max_ps(x.a, y.a)}; }
inline float hmax(V v) { return _mm512_reduce_max_ps(v.a); }
// x * 2^n for integral-valued n.
inline V scale2(V x, V n) { return {_mm512_scalef_ps(x.a, n.a)}; }
inline V round(V x) { return {_mm512_roundscale_ps(x.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
#elif defined(__AVX2__) && defined(__FMA__)
struct V {
  __m256 a, b;
};
inline V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V set1(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
inline V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, V v) {
  _mm256_storeu_ps(p, v.a);
  _mm256_storeu_ps(p + 8, v.b);
}
inline V fma(V x, V y, V acc) { return {_mm256_fmadd_ps(x.a, y.a, acc.a), _mm256_fmadd_ps(x.b, y.b, acc.b)}; }
inline float hsum(V v) {
  const __m256 s = _mm256_add_ps(v.a, v.b);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
inline V from_i8(const int8_t* p) {
  const __m128i lo = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))};
}
inline V from_bf16(const uint16_t* p) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(lo), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(hi), 16))};
}
inline V add(V x, V y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
inline V sub(V x, V y) { return {_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
inline V mul(V x, V y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
inline V max(V x, V y) { return {_mm256_max_ps(x.a, y.a), _mm256_max_ps(x.b, y.b)}; }
inline float hmax(V v) {
  const __m256 s = _mm256_max_ps(v.a, v.b);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
inline __m256 scale2_half(__m256 x, __m256 n) {  // adds n to the exponent (n in [-126, 127])
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(x, _mm256_castsi256_ps(e));
}
inline V scale2(V x, V n) { return {scale2_half(x.a, n.a), scale2_half(x.b, n.b)}; }
inline V round(V x) {
  return {_mm256_round_ps(x.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
          _mm256_round_ps(x.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
#else
struct V {
  float a[16];
};
inline V zero() { return V{}; }
inline V set1(float f) {
  V v;
  for (int i = 0; i < 16; ++i) v.a[i] = f;
  return v;
}
inline V load(const float* p) {
  V v;
  std::memcpy(v.a, p, sizeof(v.a));
  return v;
}
inline void store(float* p, V v) { std::memcpy(p, v.a, sizeof(v.a)); }
inline V fma(V x, V y, V acc) {
  for (int i = 0; i < 16; ++i) acc.a[i] += x.a[i] * y.a[i];
  return acc;
}
inline float hsum(V v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v.a[i];
  return s;
}
inline V from_i8(const int8_t* p) {
  V v;
  for (int i = 0; i < 16; ++i) v.a[i] = p[i];
  return v;
}
inline V from_bf16(const uint16_t* p) {
  V v;
  for (int i = 0; i < 16; ++i) {
    const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    std::memcpy(&v.a[i], &bits, 4);
  }
  return v;
}
#define PAGED_SIMD_LANEWISE(name, expr)     \
  inline V name(V x, V y) {                 \
    for (int i = 0; i < 16; ++i) x.a[i] = expr; \
    return x;                               \
  }
PAGED_SIMD_LANEWISE(add, x.a[i] + y.a[i])
PAGED_SIMD_LANEWISE(sub, x.a[i] - y.a[i])
PAGED_SIMD_LANEWISE(mul, x.a[i] * y.a[i])
PAGED_SIMD_LANEWISE(max, x.a[i] > y.a[i] ? x.a[i] : y.a[i])
PAGED_SIMD_LANEWISE(scale2, std::ldexp(x.a[i], static_cast<int>(y.a[i])))
#undef PAGED_SIMD_LANEWISE
inline float hmax(V v) {
  float m = v.a[0];
  for (int i = 1; i < 16; ++i) m = v.a[i] > m ? v.a[i] : m;
  return m;
}
inline V round(V x) {
  for (int i = 0; i < 16; ++i) x.a[i] = std::nearbyint(x.a[i]);
  return x;
}
#endif


// hsum16(v): lane l is hsum(v[l]), for 16 vectors at once (one output per channel of a 16-channel tile).
#if defined(__AVX512F__)
// Pairs of vectors are added half against half, four times: 15 additions in all where 16 hsums take 64.
// Lane 4a + b of the last step sums the vector fed in at 4b + a: feeding v[4(i % 4) + i / 4] at i puts
// v[l]'s sum in lane l.
inline V hsum16(const V* v) {
  __m512 r[8], s[4], u[2];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = v[4 * (2 * i % 4) + 2 * i / 4].a, b = v[4 * ((2 * i + 1) % 4) + (2 * i + 1) / 4].a;
    r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i)
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * i], s[2 * i + 1]), _mm512_unpackhi_ps(s[2 * i], s[2 * i + 1]));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(u[0]), _mm512_castps_pd(u[1]));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(u[0]), _mm512_castps_pd(u[1]));
  return {_mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi))};
}
#else
inline V hsum16(const V* v) {
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = hsum(v[i]);
  return load(f);
}
#endif

// The first lane of v equal to x, or -1.
#if defined(__AVX512F__)
inline int first_equal(V v, float x) {
  const __mmask16 hits = _mm512_cmp_ps_mask(v.a, _mm512_set1_ps(x), _CMP_EQ_OQ);
  return hits ? __builtin_ctz(hits) : -1;
}
#elif defined(__AVX2__) && defined(__FMA__)
inline int first_equal(V v, float x) {
  const __m256 s = _mm256_set1_ps(x);
  const int hits = _mm256_movemask_ps(_mm256_cmp_ps(v.a, s, _CMP_EQ_OQ)) |
                   (_mm256_movemask_ps(_mm256_cmp_ps(v.b, s, _CMP_EQ_OQ)) << 8);
  return hits ? __builtin_ctz(hits) : -1;
}
#else
inline int first_equal(V v, float x) {
  for (int i = 0; i < 16; ++i)
    if (v.a[i] == x) return i;
  return -1;
}
#endif

// 16 fp16 values, and one pair of fp16 values repeated in alternate lanes (a, b, a, b, ...), as floats.
#if defined(__AVX512F__)
inline V from_f16(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline V from_f16_pair(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, 4);
  return {_mm512_cvtph_ps(_mm256_set1_epi32(pair))};
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline V from_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline V from_f16_pair(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, 4);
  const __m256 v = _mm256_cvtph_ps(_mm_set1_epi32(pair));
  return {v, v};
}
#else
inline V from_f16(const uint16_t* p) {
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = c10::detail::fp16_ieee_to_fp32_value(p[i]);
  return load(f);
}
inline V from_f16_pair(const uint16_t* p) {
  float f[16];
  const float a = c10::detail::fp16_ieee_to_fp32_value(p[0]), b = c10::detail::fp16_ieee_to_fp32_value(p[1]);
  for (int i = 0; i < 16; i += 2) f[i] = a, f[i + 1] = b;
  return load(f);
}
#endif

// Q: 64 bytes for integer dot products of unsigned weights (int4 values 0..15) with signed int8 activations.
// dot_u8s8's lane l is the sum of the 4 products of bytes 4l..4l+3, as a float; vpdpbusd does it in one
// instruction with AVX512-VNNI, vpmaddubsw + vpmaddwd elsewhere (no overflow: 2 x 15 x 127 < 2^15).
#if defined(__AVX512F__) && defined(__AVX512BW__)
struct Q {
  __m512i a;
};
inline Q load_q(const int8_t* p) { return {_mm512_loadu_si512(p)}; }
// 32 bytes of nibbles -> their 32 low nibbles, then their 32 high nibbles.
inline Q unpack_u4(const uint8_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m = _mm256_set1_epi8(15);
  const __m256i lo = _mm256_and_si256(raw, m), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m);
  return {_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)};
}
inline V dot_u8s8(Q w, Q x) {
#if defined(__AVX512VNNI__)
  return {_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w.a, x.a))};
#else
  return {_mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(w.a, x.a), _mm512_set1_epi16(1)))};
#endif
}
#elif !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
struct Q {
  __m256i a, b;
};
inline Q load_q(const int8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
inline Q unpack_u4(const uint8_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m = _mm256_set1_epi8(15);
  return {_mm256_and_si256(raw, m), _mm256_and_si256(_mm256_srli_epi16(raw, 4), m)};
}
inline V dot_u8s8(Q w, Q x) {
  const __m256i one = _mm256_set1_epi16(1);
  return {_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w.a, x.a), one)),
          _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w.b, x.b), one))};
}
#else
struct Q {
  uint8_t a[64];
};
inline Q load_q(const int8_t* p) {
  Q q;
  std::memcpy(q.a, p, 64);
  return q;
}
inline Q unpack_u4(const uint8_t* p) {
  Q q;
  for (int i = 0; i < 32; ++i) {
    q.a[i] = p[i] & 15;
    q.a[i + 32] = p[i] >> 4;
  }
  return q;
}
inline V dot_u8s8(Q w, Q x) {
  float f[16];
  for (int l = 0; l < 16; ++l) {
    int32_t s = 0;
    for (int b = 4 * l; b < 4 * l + 4; ++b) s += static_cast<int32_t>(w.a[b]) * static_cast<int8_t>(x.a[b]);
    f[l] = static_cast<float>(s);
  }
  return load(f);
}
#endif

// e^x for x <= 0 (softmax arguments: scores minus their maximum), to about 2 ulp; below -87 it is 0.
inline V exp_nonpositive(V x) {
  x = max(x, set1(-87.f));
  const V n = round(mul(x, set1(1.44269504088896341f)));
  // f = x - n ln 2, with ln 2 in two parts to keep f exact.
  V f = fma(n, set1(-0.693359375f), x);
  f = fma(n, set1(2.12194440e-4f), f);
  V p = set1(1.9875691500e-4f);
  p = fma(p, f, set1(1.3981999507e-3f));
  p = fma(p, f, set1(8.3334519073e-3f));
  p = fma(p, f, set1(4.1665795894e-2f));
  p = fma(p, f, set1(1.6666665459e-1f));
  p = fma(p, f, set1(5.0000001201e-1f));
  p = fma(mul(p, f), f, add(f, set1(1.f)));
  return scale2(p, n);
}

}  // namespace paged_simd
