// Linear layers on GGUF's legacy 32-weight blocks (Q4_0, Q4_1, Q8_0), computed on the blocks as stored.
// Block layouts (llama.cpp's ggml-common.h): Q4_0 = f16 d, 16 bytes of nibbles (w = d * (q - 8)); Q4_1 = f16 d,
// f16 m, 16 bytes of nibbles (w = d * q + m); Q8_0 = f16 d, 32 int8 (w = d * q). In a nibble block, weight j is
// the low nibble of byte j and weight j + 16 its high nibble.
//
// gemv: out[M, N] = x[M, K] W^T for small M. Each activation row is quantized per 32-block to int8 as llama.cpp's
// Q8_0 activations (step d_x = amax / 127), plus a second int8 for the remainder in steps of d_x / 128: x = d_x *
// (q1 + q2 / 128) within d_x / 256. Int8 alone moved SmolLM2-135M's teacher-forced top-1 tokens off the bf16
// model's on 10% of positions (exact float: 2.5%); with the remainder it is as exact as float. Two blocks at a time
// the dot products run on AVX512-VNNI (vpdpbusd: unsigned x signed bytes, four products per int32 lane; 128 * q1 .
// w + q2 . w fits int32), and are scaled into float accumulators by d_w * d_x / 128; the block sums Q4_1 needs
// are exact float sums. Threads split the output rows; each weight block is unpacked once for all M activation
// rows. Without VNNI (or `portable`), a plain loop dequantizes a block to float and dots it.
// dequant: W to bf16 / float32 rows, for the batched path (a matmul on the dequantized weight).
// Plain C ABI (called through ctypes), built on first use (see native.py).

#include "../../native_simd.h"

namespace {

using native::store;
using native::to_float;

enum Format { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
constexpr int64_t kBlockBytes[] = {18, 20, 34};

inline float f16(const uint8_t* p) {  // IEEE half at p -> float (portable: no F16C needed)
  uint16_t h;
  std::memcpy(&h, p, 2);
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

// One block of 32 weights to float.
template <Format F>
inline void dequant_block(const uint8_t* b, float* w) {
  const float d = f16(b);
  if constexpr (F == Q8_0) {
    for (int j = 0; j < 32; ++j) w[j] = d * float(int8_t(b[2 + j]));
  } else {
    const float m = F == Q4_1 ? f16(b + 2) : -8.f * d;
    const uint8_t* qs = b + (F == Q4_1 ? 4 : 2);
    for (int j = 0; j < 16; ++j) {
      w[j] = d * float(qs[j] & 0xf) + m;
      w[j + 16] = d * float(qs[j] >> 4) + m;
    }
  }
}

template <Format F, typename T>
void dequant(const uint8_t* blocks, T* out, int64_t n, int64_t k) {
  const int64_t nb = k / 32;
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = blocks + r * nb * kBlockBytes[F];
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* block = row + b * kBlockBytes[F];
      T* o = out + r * k + b * 32;
#ifdef __AVX512F__
      const __m512 d = _mm512_set1_ps(f16(block));
      if constexpr (F == Q8_0) {
        for (int h = 0; h < 2; ++h) {
          const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 + 16 * h));
          native::store16(o + 16 * h, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))));
        }
      } else {
        const __m512 m = _mm512_set1_ps(F == Q4_1 ? f16(block + 2) : -8.f * f16(block));
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (F == Q4_1 ? 4 : 2))));
        const __m512i mask = _mm512_set1_epi32(0x0f);
        native::store16(o, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(q, mask)), m));
        native::store16(o + 16, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), m));
      }
#else
      float w[32];
      dequant_block<F>(block, w);
      for (int j = 0; j < 32; ++j) store(o + j, w[j]);
#endif
    }
  }
}

template <Format F, typename T>
void gemv_portable(const T* x, const uint8_t* blocks, T* out, int64_t m, int64_t n, int64_t k) {
  const int64_t nb = k / 32;
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = blocks + r * nb * kBlockBytes[F];
    float w[32];
    float acc[8] = {};
    for (int64_t i0 = 0; i0 < m; i0 += 8) {
      const int64_t rows = m - i0 < 8 ? m - i0 : 8;
      for (int64_t i = 0; i < rows; ++i) acc[i] = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        dequant_block<F>(row + b * kBlockBytes[F], w);
        for (int64_t i = 0; i < rows; ++i) {
          const T* xb = x + (i0 + i) * k + b * 32;
          float s = 0.f;
          for (int j = 0; j < 32; ++j) s += w[j] * to_float(xb[j]);
          acc[i] += s;
        }
      }
      for (int64_t i = 0; i < rows; ++i) store(out + (i0 + i) * n + r, acc[i]);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
constexpr bool kHasVnni = true;
constexpr int kMaxRows = 8;  // activation rows per pass over the weights

// One activation row quantized for a pass, per pair of blocks (two 32-blocks = 64 bytes = one vpdpbusd):
// the int8 values in the order the weights are unpacked (nibble formats: [x0 lo16, x1 lo16, x0 hi16, x1 hi16],
// Q8_0: [x0, x1]), and per int32 lane of the dot product: its block's d_x / 128, and for Q4_0 8 x the lane's
// four values as 128 q + r (the -8 offset of the weights), for Q4_1 an eighth of the block's float sum (times m_w
// over a block's 8 lanes: m_w * sum(x)).
struct PairX {
  int8_t q[64];
  int8_t r[64];  // the remainder, in steps of d_x / 128
  float dx[16];
  float sx[16];   // Q4_1
  int32_t c[16];  // Q4_0
};

// Lane l of the int32 dot covers bytes 4l..4l+3; which block (0 or 1) of the pair is that?
template <Format F>
inline int lane_block(int lane) {
  return F == Q8_0 ? lane / 8 : (lane / 4) & 1;
}

template <Format F, typename T>
void quantize_row(const T* x, int64_t k, PairX* pairs) {
  const int64_t nb = k / 32, np = (nb + 1) / 2;
  for (int64_t p = 0; p < np; ++p) {
    PairX& px = pairs[p];
    std::memset(&px, 0, sizeof px);
    for (int h = 0; h < 2 && 2 * p + h < nb; ++h) {  // an odd tail leaves block 1 zero: it adds nothing
      const T* xb = x + (2 * p + h) * 32;
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < 32; ++j) {
        amax = std::fmax(amax, std::fabs(to_float(xb[j])));
        sum += to_float(xb[j]);
      }
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      for (int j = 0; j < 32; ++j) {
        const float scaled = to_float(xb[j]) * id;
        const float q = std::nearbyint(scaled);
        const int pos = F == Q8_0 ? 32 * h + j : (j < 16 ? 16 * h + j : 32 + 16 * h + j - 16);
        px.q[pos] = int8_t(q);
        px.r[pos] = int8_t(std::nearbyint((scaled - q) * 128.f));  // |.| <= 64
      }
      for (int lane = 0; lane < 16; ++lane) {
        if (lane_block<F>(lane) != h) continue;
        px.dx[lane] = d / 128.f;
        px.sx[lane] = sum / 8.f;
        int32_t q = 0, r = 0;
        for (int b = 4 * lane; b < 4 * lane + 4; ++b) q += px.q[b], r += px.r[b];
        px.c[lane] = 8 * (128 * q + r);
      }
    }
  }
}

// The two weight blocks at b0, b1 as 64 bytes in PairX order (nibble formats unsigned 0..15, Q8_0 signed).
template <Format F>
inline __m512i load_pair(const uint8_t* b0, const uint8_t* b1) {
  if constexpr (F == Q8_0) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2)), 1);
  } else {
    constexpr int off = F == Q4_1 ? 4 : 2;
    const __m256i q = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(b1 + off),
                                          reinterpret_cast<const __m128i*>(b0 + off));
    const __m256i mask = _mm256_set1_epi8(0x0f);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, mask)),
                              _mm256_and_si256(_mm256_srli_epi16(q, 4), mask), 1);
  }
}

// d (and m) of the two blocks spread over the 16 lanes as lane_block says.
template <Format F>
inline void pair_scales(const uint8_t* b0, const uint8_t* b1, __m512& d, __m512& m) {
  // [d0, m0, d1, m1] as halves (m only read for Q4_1)
  uint32_t h0, h1;
  std::memcpy(&h0, b0, 4);
  std::memcpy(&h1, b1, 4);
  const __m512 s = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_set_epi32(0, 0, int(h1), int(h0))));
  const __m512i di = F == Q8_0 ? _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0)
                               : _mm512_set_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0);
  d = _mm512_permutexvar_ps(di, s);
  if constexpr (F == Q4_1) m = _mm512_permutexvar_ps(_mm512_add_epi32(di, _mm512_set1_epi32(1)), s);
}

template <Format F, int R, typename T>
void gemv_rows(const PairX* xq, int64_t np, const uint8_t* blocks, T* out, int64_t n, int64_t k) {
  const int64_t nb = k / 32, row_bytes = nb * kBlockBytes[F];
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = blocks + r * row_bytes;
    __m512 acc[R], acc_m[R];  // the d and (Q4_1) m terms: two shorter dependency chains
    for (int i = 0; i < R; ++i) acc[i] = acc_m[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; ++p) {
      const uint8_t* b0 = row + 2 * p * kBlockBytes[F];
      const uint8_t* b1 = 2 * p + 1 < nb ? b0 + kBlockBytes[F] : b0;  // odd tail: its x block is zero
      _mm_prefetch(reinterpret_cast<const char*>(b0 + 8 * kBlockBytes[F]), _MM_HINT_T0);
      __m512i w = load_pair<F>(b0, b1);
      __m512 d, m;
      pair_scales<F>(b0, b1, d, m);
      __mmask64 negative = 0;
      if constexpr (F == Q8_0) {  // vpdpbusd wants unsigned weights: |w|, and x negated where w < 0
        negative = _mm512_movepi8_mask(w);
        w = _mm512_abs_epi8(w);
      }
      for (int i = 0; i < R; ++i) {
        const PairX& px = xq[i * np + p];
        __m512i xq = _mm512_loadu_si512(px.q), xr = _mm512_loadu_si512(px.r);
        if constexpr (F == Q8_0) {
          xq = _mm512_mask_sub_epi8(xq, negative, _mm512_setzero_si512(), xq);
          xr = _mm512_mask_sub_epi8(xr, negative, _mm512_setzero_si512(), xr);
        }
        __m512i dot = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xq), 7);
        dot = _mm512_dpbusd_epi32(dot, w, xr);
        if constexpr (F == Q4_0) dot = _mm512_sub_epi32(dot, _mm512_loadu_si512(px.c));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_loadu_ps(px.dx)), acc[i]);
        if constexpr (F == Q4_1) acc_m[i] = _mm512_fmadd_ps(m, _mm512_loadu_ps(px.sx), acc_m[i]);
      }
    }
    for (int i = 0; i < R; ++i) store(out + i * n + r, _mm512_reduce_add_ps(_mm512_add_ps(acc[i], acc_m[i])));
  }
}

template <Format F, typename T>
void gemv_vnni(const T* x, const uint8_t* blocks, T* out, int64_t m, int64_t n, int64_t k) {
  const int64_t np = (k / 32 + 1) / 2;
  PairX* xq = static_cast<PairX*>(std::aligned_alloc(64, sizeof(PairX) * kMaxRows * np));
  for (int64_t i0 = 0; i0 < m; i0 += kMaxRows) {
    const int rows = int(m - i0 < kMaxRows ? m - i0 : kMaxRows);
    for (int i = 0; i < rows; ++i) quantize_row<F>(x + (i0 + i) * k, k, xq + i * np);
    T* o = out + i0 * n;
    switch (rows) {
      case 1: gemv_rows<F, 1>(xq, np, blocks, o, n, k); break;
      case 2: gemv_rows<F, 2>(xq, np, blocks, o, n, k); break;
      case 3: gemv_rows<F, 3>(xq, np, blocks, o, n, k); break;
      case 4: gemv_rows<F, 4>(xq, np, blocks, o, n, k); break;
      case 5: gemv_rows<F, 5>(xq, np, blocks, o, n, k); break;
      case 6: gemv_rows<F, 6>(xq, np, blocks, o, n, k); break;
      case 7: gemv_rows<F, 7>(xq, np, blocks, o, n, k); break;
      default: gemv_rows<F, 8>(xq, np, blocks, o, n, k); break;
    }
  }
  std::free(xq);
}
#else
constexpr bool kHasVnni = false;
template <Format F, typename T>
void gemv_vnni(const T* x, const uint8_t* blocks, T* out, int64_t m, int64_t n, int64_t k) {
  gemv_portable<F>(x, blocks, out, m, n, k);
}
#endif

template <typename T>
void gemv(const T* x, const uint8_t* blocks, T* out, int64_t m, int64_t n, int64_t k, int format, int portable) {
  switch (format) {
    case Q4_0: return portable ? gemv_portable<Q4_0>(x, blocks, out, m, n, k) : gemv_vnni<Q4_0>(x, blocks, out, m, n, k);
    case Q4_1: return portable ? gemv_portable<Q4_1>(x, blocks, out, m, n, k) : gemv_vnni<Q4_1>(x, blocks, out, m, n, k);
    default: return portable ? gemv_portable<Q8_0>(x, blocks, out, m, n, k) : gemv_vnni<Q8_0>(x, blocks, out, m, n, k);
  }
}

template <typename T>
void dequantize(const uint8_t* blocks, T* out, int64_t n, int64_t k, int format) {
  switch (format) {
    case Q4_0: return dequant<Q4_0>(blocks, out, n, k);
    case Q4_1: return dequant<Q4_1>(blocks, out, n, k);
    default: return dequant<Q8_0>(blocks, out, n, k);
  }
}

}  // namespace

extern "C" {

// format: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0; k a multiple of 32; x [m, k], out [m, n], blocks [n, k / 32 blocks].
int gguf_has_vnni() { return kHasVnni; }
void gguf_gemv_f32(const float* x, const uint8_t* blocks, float* out, int64_t m, int64_t n, int64_t k, int format,
                   int portable) {
  gemv(x, blocks, out, m, n, k, format, portable);
}
void gguf_gemv_bf16(const uint16_t* x, const uint8_t* blocks, uint16_t* out, int64_t m, int64_t n, int64_t k,
                    int format, int portable) {
  gemv(x, blocks, out, m, n, k, format, portable);
}
void gguf_dequant_f32(const uint8_t* blocks, float* out, int64_t n, int64_t k, int format) {
  dequantize(blocks, out, n, k, format);
}
void gguf_dequant_bf16(const uint8_t* blocks, uint16_t* out, int64_t n, int64_t k, int format) {
  dequantize(blocks, out, n, k, format);
}
}
