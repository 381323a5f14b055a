// What the native CPU kernels share: bfloat16 <-> float32 conversions (scalar and 16 lanes of AVX-512) and a
// vectorised exp. Included by the .cpp files next to their Python wrappers (see build.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace native {

inline float f16(const uint8_t* p) {  // an IEEE half (GGUF's block scales) at p -> float
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef __F16C__
  return _cvtsh_ss(h);
#endif
  const uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: a normal float
    float f = std::ldexp(float(mant), -24);
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}


inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {  // bfloat16 bits -> float32: the upper half of the float
  uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (std::isnan(x)) {
    *p = 0x7fc0;
    return;
  }
  bits += 0x7fff + ((bits >> 16) & 1);
  *p = uint16_t(bits >> 16);
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 bfloat16 -> 16 float32
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(uint16_t* p, __m512 x) {  // round to nearest even (callers store no NaN)
  __m512i bits = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// exp of 16 floats (Cephes' expf: 2^k * exp(r), |r| <= ln2 / 2, degree-6 polynomial; ~1 ulp). Inputs below -87
// give ~1e-38 instead of 0, which is what softmax needs (they come only from scores far below the maximum).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, k);
}

// tanh of 16 floats: Eigen's [13/6] rational approximation (~3e-7 relative; no exp, half the cost of an exp-based
// one), x itself below |x| = 0.0004; inputs are clamped where it reaches +-1 exactly (NaN stays NaN).
inline __m512 tanh16(__m512 x) {
  const __m512 limit = _mm512_set1_ps(7.99881172180175781f);
  const __m512 c = _mm512_min_ps(limit, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), limit), x));
  const __m512 z = _mm512_mul_ps(c, c);
  __m512 p = _mm512_set1_ps(-2.76076847742355e-16f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.00018790482477e-13f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-8.60467152213735e-11f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(5.12229709037114e-08f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.48572235717979e-05f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(6.37261928875436e-04f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(4.89352455891786e-03f));
  __m512 q = _mm512_set1_ps(1.19825839466702e-06f);
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(1.18534705686654e-04f));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(2.26843463243900e-03f));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(4.89352518554385e-03f));
  const __m512 t = _mm512_div_ps(_mm512_mul_ps(p, c), q);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(4e-4f), _CMP_LT_OQ), t, x);
}
#endif

}  // namespace native
