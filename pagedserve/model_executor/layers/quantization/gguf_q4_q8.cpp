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
// rows. Without VNNI (or `portable`), a block is dequantized to float and dotted: in AVX2 + FMA vectors where the
// build targets them (8 float lanes per activation row, summed at the end), else a plain loop.
// gemm (bf16 x, batches; CPUs with AMX): out^T = W x^T on AMX tiles, without the whole bf16 weight ever existing.
// W is the A operand: a strip of 32 weight rows is dequantized to bf16 one block (32 k) at a time, and a block of
// 16 rows is one A tile (16 rows x 64 bytes) as it lies, no reordering. x is the B operand, packed once per call
// into AMX's VNNI layout (pairs of k per 32-bit lane, by 16 x 16 transposes); the C tiles (16 weight rows x 16
// x rows, float) are transposed back into out. Per block step two weight tiles x two x tiles, four accumulators.
// The first pass over a strip dequantizes block s + 1 while the tile unit multiplies block s (the vector ports
// and the tile unit work at once); further x tiles reuse the strip from L1. 4-bit blocks are dequantized two rows
// at a time as table look-ups: only 16 values d q + m exist per block, so both blocks' 32 values are computed in
// float, rounded to bf16, and vpermw picks each weight's by its nibble; Q8_0 goes through float. The values are
// `dequant`'s. Dequantizing is the cost that bf16 weights do not pay (~4 cycles per block of 32 weights here):
// it sets the row range where this kernel runs (gguf_q4_q8.py: MIN_AMX_ROWS, MAX_AMX_ROWS).
// dequant: W to bf16 / float32 rows, for the batched path elsewhere (a matmul on the dequantized weight).
// Plain C ABI (called through ctypes), built on first use (see native/build.py).

#include <algorithm>

#include "simd.h"
#include "amx.h"


namespace {

using native::f16;
using native::store;
using native::to_float;

enum Format { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
constexpr int64_t kBlockBytes[] = {18, 20, 34};

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

#if defined(__AVX2__) && defined(__FMA__)
// AVX2 (CPUs without AVX-512, and the portable path's build on them): a block as four vectors of 8 floats, the same
// values as dequant_block (d q + m, one rounding).
template <Format F>
inline void dequant_block8(const uint8_t* b, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(f16(b));
  if constexpr (F == Q8_0) {
    for (int v = 0; v < 4; ++v) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * v));
      w[v] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
  } else {
    const __m256 m = _mm256_set1_ps(F == Q4_1 ? f16(b + 2) : -8.f * f16(b));
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (F == Q4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    w[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), m);
    w[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), m);
    w[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), m);
    w[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), m);
  }
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bfloat16 -> 8 float32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

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
#elif defined(__AVX2__) && defined(__FMA__)
      __m256 w8[4];
      dequant_block8<F>(block, w8);
      alignas(32) float w[32];
      for (int v = 0; v < 4; ++v) _mm256_store_ps(w + 8 * v, w8[v]);
      for (int j = 0; j < 32; ++j) store(o + j, w[j]);
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
#if defined(__AVX2__) && defined(__FMA__)
    for (int64_t i0 = 0; i0 < m; i0 += 8) {  // eight float lanes of each activation row's sum, added at the end
      const int64_t rows = m - i0 < 8 ? m - i0 : 8;
      __m256 acc[8];
      for (int64_t i = 0; i < rows; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        __m256 w[4];
        dequant_block8<F>(row + b * kBlockBytes[F], w);
        for (int64_t i = 0; i < rows; ++i) {
          const T* xb = x + (i0 + i) * k + b * 32;
          for (int v = 0; v < 4; ++v) acc[i] = _mm256_fmadd_ps(w[v], load8(xb + 8 * v), acc[i]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) store(out + (i0 + i) * n + r, sum8(acc[i]));
    }
#else
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
#endif
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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__F16C__)
constexpr int64_t kTile = 16;       // rows of a tile: weight rows of A and C, pairs of k of B (x rows per B row)
constexpr int64_t kStripRows = 32;  // weight rows per strip: two A tiles (tmm4, tmm5)



// A strip's block scales as floats, [row][block]: d, and the offset m (Q4_1's m, Q4_0's -8 d; not for Q8_0).
// One gather reads 16 blocks' leading 4 bytes (d, m as halves) of a row.
template <Format F>
void strip_scales(const uint8_t* row0, int64_t row_bytes, int64_t rows, int64_t nb, float* ds, float* ms) {
  const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(int(kBlockBytes[F])));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t s = 0; s < nb; s += 16) {
      const __mmask16 valid = nb - s >= 16 ? __mmask16(0xffff) : __mmask16((1u << (nb - s)) - 1);
      const __m512i halves = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, offsets,
                                                          row0 + r * row_bytes + s * kBlockBytes[F], 1);
      const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(halves));
      _mm512_mask_storeu_ps(ds + r * nb + s, valid, d);
      if constexpr (F == Q4_1) {
        const __m512 m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(halves, 16)));
        _mm512_mask_storeu_ps(ms + r * nb + s, valid, m);
      } else if constexpr (F == Q4_0) {
        _mm512_mask_storeu_ps(ms + r * nb + s, valid, _mm512_mul_ps(d, _mm512_set1_ps(-8.f)));
      }
    }
  }
}

// One block's 32 weights in bf16, in order: the same values (float math, then round to nearest even) as
// `dequant` writes.
template <Format F>
inline void block_bf16(const uint8_t* b, float scale, float offset, uint16_t* w) {
  const __m512 d = _mm512_set1_ps(scale);
  __m512 lo, hi;
  if constexpr (F == Q8_0) {
    const __m128i* q = reinterpret_cast<const __m128i*>(b + 2);
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))));
  } else {
    const __m512 m = _mm512_set1_ps(offset);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (F == Q4_1 ? 4 : 2))));
    lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0f))), m);
    hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), m);
  }
  _mm512_store_si512(w, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

// The same block of two 4-bit weight rows (b0, b1) in bf16, into w (64 values: the two 64-byte tile rows). Only
// 16 values per block exist, d q + m for q = 0..15: one table of both blocks' 32 values (float math, then round to
// nearest even, as `block_bf16`), then each weight is a table look-up by its nibble (vpermw).
template <Format F>
inline void block_pair_bf16(const uint8_t* b0, const uint8_t* b1, const float* scale, const float* offset,
                            uint16_t* w) {
  static_assert(F != Q8_0);
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i table = reinterpret_cast<__m512i>(
      _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(iota, _mm512_set1_ps(scale[1]), _mm512_set1_ps(offset[1])),
                          _mm512_fmadd_ps(iota, _mm512_set1_ps(scale[0]), _mm512_set1_ps(offset[0]))));
  constexpr int off = F == Q4_1 ? 4 : 2;
  const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(b1 + off),
                                                             reinterpret_cast<const __m128i*>(b0 + off)));
  const __m512i second = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);  // b1's table half
  const __m512i lo = _mm512_or_si512(_mm512_and_si512(q, _mm512_set1_epi16(0x0f)), second);
  const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(q, 4), second);
  _mm512_store_si512(w, _mm512_permutexvar_epi16(_mm512_shuffle_i64x2(lo, hi, 0x44), table));
  _mm512_store_si512(w + 32, _mm512_permutexvar_epi16(_mm512_shuffle_i64x2(lo, hi, 0xee), table));
}

// Block s of a strip of up to 32 weight rows in bf16, as two AMX A tiles at strip + s * 1024 (the strip is
// [block][32 rows][32 k]): a block is one 64-byte tile row as it lies, no reordering; rows past `rows` are zero.
// ds, ms are [row][block]; the 4-bit formats go two rows at a time (block_pair_bf16).
template <Format F>
void dequant_step(const uint8_t* row0, int64_t row_bytes, int64_t rows, int64_t nb, const float* ds,
                  const float* ms, int64_t s, uint16_t* strip) {
  uint16_t* w = strip + s * kStripRows * 32;
  const uint8_t* block = row0 + s * kBlockBytes[F];
  int64_t r = 0;
  if constexpr (F != Q8_0) {
    alignas(8) float scale[2], offset[2];
    for (; r + 1 < rows; r += 2) {
      scale[0] = ds[r * nb + s], scale[1] = ds[(r + 1) * nb + s];
      offset[0] = ms[r * nb + s], offset[1] = ms[(r + 1) * nb + s];
      block_pair_bf16<F>(block + r * row_bytes, block + (r + 1) * row_bytes, scale, offset, w + r * 32);
    }
  }
  for (; r < rows; ++r) {
    block_bf16<F>(block + r * row_bytes, ds[r * nb + s], F == Q8_0 ? 0.f : ms[r * nb + s], w + r * 32);
  }
  for (; r < kStripRows; ++r) _mm512_store_si512(w + r * 32, _mm512_setzero_si512());
}

// The C tiles of one strip (two tiles of weight rows: tmm4, tmm5) against MT tiles of x (tmm6, tmm7), over all
// k, stored to c as [x tile][weight tile][16][16]. `ahead(s)` runs before block s is multiplied (the first pass
// over a strip dequantizes block s + 1 there, so that the vector units work while the tile unit multiplies).
template <int MT, typename Ahead>
void multiply_strip(const uint16_t* strip, const uint32_t* b0, const uint32_t* b1, int64_t nb, float* c,
                    const Ahead& ahead) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (MT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < nb; ++s) {
    ahead(s);
    _tile_loadd(4, strip + 2 * s * kTile * 32, 64);
    _tile_loadd(5, strip + (2 * s + 1) * kTile * 32, 64);
    _tile_loadd(6, b0 + s * kTile * kTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if constexpr (MT == 2) {
      _tile_loadd(7, b1 + s * kTile * kTile, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + kTile * kTile, 64);
  if constexpr (MT == 2) {
    _tile_stored(2, c + 2 * kTile * kTile, 64);
    _tile_stored(3, c + 3 * kTile * kTile, 64);
  }
}

template <Format F>
void gemm_amx(const uint16_t* x, const uint8_t* blocks, uint16_t* out, int64_t m, int64_t n, int64_t k) {
  const int64_t nb = k / 32, row_bytes = nb * kBlockBytes[F], strips = (n + kStripRows - 1) / kStripRows;
  const int64_t m_tiles = (m + kTile - 1) / kTile, tile_size = nb * kTile * kTile;
  uint32_t* xv = static_cast<uint32_t*>(std::aligned_alloc(64, m_tiles * tile_size * 4));
#pragma omp parallel
  {
    pack_x(x, m, k, xv);  // ends in a barrier
    configure_tiles();
    uint16_t* strip = static_cast<uint16_t*>(std::aligned_alloc(64, kStripRows * k * 2));
    float* ds = static_cast<float*>(std::aligned_alloc(64, kStripRows * nb * 4 * 2));  // then ms
    float* ms = ds + kStripRows * nb;
    alignas(64) float c[4 * kTile * kTile];
#pragma omp for schedule(static)
    for (int64_t si = 0; si < strips; ++si) {
      const int64_t n0 = si * kStripRows, rows = std::min(kStripRows, n - n0);
      const uint8_t* row0 = blocks + n0 * row_bytes;
      strip_scales<F>(row0, row_bytes, rows, nb, ds, ms);
      dequant_step<F>(row0, row_bytes, rows, nb, ds, ms, 0, strip);
      for (int64_t t = 0; t < m_tiles; t += 2) {
        auto ahead = [&](int64_t s) {  // the first pass dequantizes the strip's block s + 1
          if (t == 0 && s + 1 < nb) dequant_step<F>(row0, row_bytes, rows, nb, ds, ms, s + 1, strip);
        };
        const int64_t mt = std::min<int64_t>(2, m_tiles - t);
        const uint32_t* b0 = xv + t * tile_size;
        if (mt == 2) {
          multiply_strip<2>(strip, b0, b0 + tile_size, nb, c, ahead);
        } else {
          multiply_strip<1>(strip, b0, nullptr, nb, c, ahead);
        }
        for (int64_t i = 0; i < mt; ++i) {
          const int64_t m0 = (t + i) * kTile;
          store_tiles(c + 2 * i * kTile * kTile, out + m0 * n + n0, n, std::min(kTile, m - m0), n - n0);
        }
      }
    }
    std::free(ds);
    std::free(strip);
    _tile_release();
  }
  std::free(xv);
}

bool has_amx() { return amx_permitted(); }
#else
bool has_amx() { return false; }
template <Format F>
void gemm_amx(const uint16_t*, const uint8_t*, uint16_t*, int64_t, int64_t, int64_t) {}
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
int gguf_has_amx() { return has_amx(); }
// bf16 x [m, k] -> out [m, n] on AMX tiles; only where gguf_has_amx() says so.
void gguf_gemm_bf16(const uint16_t* x, const uint8_t* blocks, uint16_t* out, int64_t m, int64_t n, int64_t k,
                    int format) {
  if (!has_amx()) return;  // callers ask gguf_has_amx first
  switch (format) {
    case Q4_0: return gemm_amx<Q4_0>(x, blocks, out, m, n, k);
    case Q4_1: return gemm_amx<Q4_1>(x, blocks, out, m, n, k);
    default: return gemm_amx<Q8_0>(x, blocks, out, m, n, k);
  }
}
void gguf_dequant_f32(const uint8_t* blocks, float* out, int64_t n, int64_t k, int format) {
  dequantize(blocks, out, n, k, format);
}
void gguf_dequant_bf16(const uint8_t* blocks, uint16_t* out, int64_t n, int64_t k, int format) {
  dequantize(blocks, out, n, k, format);
}
}
