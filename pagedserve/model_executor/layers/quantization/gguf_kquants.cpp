// Linear layers on GGUF's K-quant 256-weight super-blocks (Q4_K, Q5_K, Q6_K), computed on the blocks as stored.
// Block layouts (llama.cpp's ggml-common.h):
//   Q4_K (144 bytes): f16 d, f16 dmin, scales[12] (8 six-bit scales and 8 six-bit mins, packed), qs[128]: 8
//     sub-blocks of 32, w = d * scale_s * q - dmin * min_s, q a nibble; the 32 bytes qs[32j..] hold sub-block 2j
//     in their low nibbles and 2j + 1 in their high nibbles.
//   Q5_K (176 bytes): as Q4_K with qh[32] before qs: bit s of qh[l] is the fifth bit of weight l of sub-block s.
//   Q6_K (210 bytes): ql[128], qh[64], int8 scales[16] (one per 16 weights), f16 d: w = d * scale_g * (q - 32),
//     q six bits. Weights 128h + 32t + l (half h, quarter t, l < 32): low four bits from ql[64h + 32(t & 1) + l]
//     (low nibble for t < 2, high for t >= 2), top two from qh[32h + l] bits 2t, 2t + 1.
// In all three, unpacking 64 consecutive weights gives them in their natural order (see `unpack`).
//
// gemv: out[M, N] = x[M, K] W^T for small M. Each activation row is quantized per 32-weight sub-block to int8 as
// in gguf_q4_q8.cpp (step d_x = amax / 127, plus a second int8 for the remainder in steps of d_x / 128, so that
// x = d_x (q1 + q2 / 128) within d_x / 256; int8 alone costs accuracy, see docs/architecture.md). Four vpdpbusd
// pairs per super-block (unsigned weights x signed activations, 64 weights each) give int32 lanes of four products;
// each lane is scaled into a float accumulator by its sub-block's weight scale (d * scale) times d_x / 128. The
// Q4_K / Q5_K min term is dmin * min_s times the exact float sum of the sub-block's activations; Q6_K's -32
// offset is subtracted in the integer dot from the activations' sums. Threads split the output rows; each weight
// block is unpacked once for all M activation rows. Without VNNI (or `portable`) a plain loop dequantizes a block
// to float and dots it.
// gemm (bf16 x, batches; CPUs with AMX): out^T = W x^T on AMX tiles, as gguf_q4_q8.cpp's gemm (read its header),
// without the whole bf16 weight ever existing. Every K-quant 32-weight sub-block is affine in its stored values
// (Q4_K / Q5_K: one scale and offset per 32; Q6_K: two scales, one per 16), so a strip of 32 weight rows is
// dequantized one super-block at a time straight into A tiles ([sub-block][32 rows][32 k]: 16 rows of a sub-block
// are one 64-byte-row tile as they lie), with `dequant`'s values (the same unpack, fma and rounding; Q4_K / Q5_K
// by table look-ups, at most 32 values per sub-block). The super-block's tiles (16 KiB) stay in L1 while every x
// tile passes over them, the C tiles kept in memory between super-blocks; the first pass dequantizes super-block
// b + 1 while the tile unit multiplies b. x is packed once into AMX's pair layout and the C tiles are transposed
// back and rounded to bf16 (pack_x, store_tiles: native/amx.h, shared with gguf_q4_q8.cpp). Dequantizing is the
// cost bf16 weights do not pay: it sets the row range where this kernel runs (gguf_kquants.py: MIN_AMX_ROWS,
// MAX_AMX_ROWS).
// dequant: W to bf16 / float32 rows, for the batches the AMX kernel does not take (a matmul on the dequantized
// weight).
// Plain C ABI (called through ctypes), built on first use (see native/build.py).

#include <algorithm>
#include <cstdlib>

#include "simd.h"
#include "amx.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KQ_AVX512 1
#endif

namespace {

using native::f16;
using native::store;
using native::to_float;

enum Format { Q4_K = 0, Q5_K = 1, Q6_K = 2 };
constexpr int64_t kBlockBytes[] = {144, 176, 210};
constexpr int kBlock = 256;  // weights per super-block

// The 8 six-bit scales and 8 six-bit mins of a Q4_K / Q5_K block from its 12 packed bytes (ggml's
// get_scale_min_k4, four bytes at a time): bytes 0-3 hold scales 0-3 and the top bits of scales 4-7, bytes 4-7
// mins 0-3 and the top bits of mins 4-7, bytes 8-11 the low nibbles of scales 4-7 and mins 4-7.
inline void k_scales(const uint8_t* packed, uint8_t scales[8], uint8_t mins[8]) {
  uint32_t u[3];
  std::memcpy(u, packed, 12);
  constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0x03030303;
  const uint32_t s[2] = {u[0] & low6, (u[2] & low4) | (((u[0] >> 6) & top2) << 4)};
  const uint32_t m[2] = {u[1] & low6, ((u[2] >> 4) & low4) | (((u[1] >> 6) & top2) << 4)};
  std::memcpy(scales, s, 8);
  std::memcpy(mins, m, 8);
}

// Per 16 weights of a block: w = scale * q + offset, q the unsigned value as stored (Q6_K: 0..63).
template <Format F>
inline void group_affine(const uint8_t* b, float scale[16], float offset[16]) {
  if constexpr (F == Q6_K) {
    const float d = f16(b + 208);
    for (int g = 0; g < 16; ++g) {
      scale[g] = d * float(int8_t(b[192 + g]));
      offset[g] = -32.f * scale[g];
    }
  } else {
    uint8_t sc[8], mn[8];
    k_scales(b + 4, sc, mn);
    const float d = f16(b), dmin = f16(b + 2);
    for (int g = 0; g < 16; ++g) {
      scale[g] = d * float(sc[g / 2]);
      offset[g] = -dmin * float(mn[g / 2]);
    }
  }
}

// The 256 unsigned values of a block in weight order (scalar).
template <Format F>
inline void unpack_block(const uint8_t* b, uint8_t q[kBlock]) {
  for (int i = 0; i < kBlock; ++i) {
    if constexpr (F == Q6_K) {
      const int half = i / 128, t = (i % 128) / 32, l = i % 32;
      const int low = (b[64 * half + 32 * (t & 1) + l] >> (4 * (t >> 1))) & 0xf;
      const int high = (b[128 + 32 * half + l] >> (2 * t)) & 3;
      q[i] = uint8_t(low | high << 4);
    } else {
      const int s = i / 32, l = i % 32;
      const uint8_t* qs = b + (F == Q5_K ? 48 : 16);
      int v = (qs[32 * (s / 2) + l] >> (4 * (s & 1))) & 0xf;
      if constexpr (F == Q5_K) v |= ((b[16 + l] >> s) & 1) << 4;
      q[i] = uint8_t(v);
    }
  }
}

template <Format F>
inline void dequant_block(const uint8_t* b, float* w) {
  uint8_t q[kBlock];
  float scale[16], offset[16];
  unpack_block<F>(b, q);
  group_affine<F>(b, scale, offset);
  for (int i = 0; i < kBlock; ++i) w[i] = std::fma(float(q[i]), scale[i / 16], offset[i / 16]);
}

#ifdef KQ_AVX512
// Weights 64v .. 64v + 63 of the block at b as unsigned bytes, in weight order.
template <Format F>
inline __m512i unpack(const uint8_t* b, int v) {
  if constexpr (F == Q6_K) {  // half v / 2; quarters 0, 1 (v even: low nibbles) or 2, 3 (v odd: high nibbles)
    const int shift = 4 * (v & 1);
    const __m512i ql = _mm512_loadu_si512(b + 64 * (v / 2));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * (v / 2)));
    const __m512i low = _mm512_and_si512(_mm512_srli_epi16(ql, shift), _mm512_set1_epi8(0x0f));
    const __m512i high = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(qh, shift)),
                                            _mm256_srli_epi16(qh, shift + 2), 1);
    return _mm512_or_si512(low, _mm512_slli_epi16(_mm512_and_si512(high, _mm512_set1_epi8(3)), 4));
  } else {  // sub-blocks 2v (low nibbles) and 2v + 1 (high nibbles)
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (F == Q5_K ? 48 : 16) + 32 * v));
    __m256i lo = _mm256_and_si256(q, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
    if constexpr (F == Q5_K) {  // bit s of qh to bit 4 (16-bit shifts: the mask drops what crosses bytes)
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
      const __m256i bit4 = _mm256_set1_epi8(0x10);
      const int s = 2 * v;
      const __m256i lo_bit = s < 4 ? _mm256_slli_epi16(qh, 4 - s) : _mm256_srli_epi16(qh, s - 4);
      const __m256i hi_bit = s + 1 < 4 ? _mm256_slli_epi16(qh, 3 - s) : _mm256_srli_epi16(qh, s - 3);
      lo = _mm256_or_si256(lo, _mm256_and_si256(lo_bit, bit4));
      hi = _mm256_or_si256(hi, _mm256_and_si256(hi_bit, bit4));
    }
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
}
#endif

template <Format F, typename T>
void dequant(const uint8_t* blocks, T* out, int64_t n, int64_t k) {
  const int64_t nb = k / kBlock;
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = blocks + r * nb * kBlockBytes[F];
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* block = row + b * kBlockBytes[F];
      T* o = out + r * k + b * kBlock;
#ifdef KQ_AVX512
      alignas(64) uint8_t q[kBlock];
      float scale[16], offset[16];
      for (int v = 0; v < 4; ++v) _mm512_store_si512(q + 64 * v, unpack<F>(block, v));
      group_affine<F>(block, scale, offset);
      for (int g = 0; g < 16; ++g) {
        const __m128i group = _mm_load_si128(reinterpret_cast<const __m128i*>(q + 16 * g));
        const __m512 values = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(group));
        native::store16(o + 16 * g, _mm512_fmadd_ps(values, _mm512_set1_ps(scale[g]), _mm512_set1_ps(offset[g])));
      }
#else
      float w[kBlock];
      dequant_block<F>(block, w);
      for (int j = 0; j < kBlock; ++j) store(o + j, w[j]);
#endif
    }
  }
}

template <Format F, typename T>
void gemv_portable(const T* x, const uint8_t* blocks, T* out, int64_t m, int64_t n, int64_t k) {
  const int64_t nb = k / kBlock;
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = blocks + r * nb * kBlockBytes[F];
    float w[kBlock];
    float acc[8] = {};
    for (int64_t i0 = 0; i0 < m; i0 += 8) {
      const int64_t rows = m - i0 < 8 ? m - i0 : 8;
      for (int64_t i = 0; i < rows; ++i) acc[i] = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        dequant_block<F>(row + b * kBlockBytes[F], w);
        for (int64_t i = 0; i < rows; ++i) {
          const T* xb = x + (i0 + i) * k + b * kBlock;
          float s = 0.f;
          for (int j = 0; j < kBlock; ++j) s += w[j] * to_float(xb[j]);
          acc[i] += s;
        }
      }
      for (int64_t i = 0; i < rows; ++i) store(out + (i0 + i) * n + r, acc[i]);
    }
  }
}

#if defined(KQ_AVX512) && defined(__AVX512VNNI__) && defined(__F16C__)
constexpr bool kHasVnni = true;
constexpr int kMaxRows = 8;  // activation rows per pass over the weights

// One activation row's 256 values for one super-block, quantized per 32-weight sub-block, in weight order (the
// order `unpack` gives). Per int32 lane of the four 64-byte dot products (lane l of vector v covers values
// 64v + 4l .. 64v + 4l + 3): its sub-block's d_x / 128 and (Q6_K) 32 x its four values as 128 q + r.
struct alignas(64) BlockX {
  int8_t q[kBlock];
  int8_t r[kBlock];  // the remainder, in steps of d_x / 128
  float dx[64];
  int32_t c[64];  // Q6_K
  float sum[8];   // Q4_K, Q5_K: each sub-block's float sum (for the dmin * min term)
};

template <Format F, typename T>
void quantize_row(const T* x, int64_t k, BlockX* out) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    BlockX& bx = out[b];
    for (int s = 0; s < 8; ++s) {
      const T* xs = x + b * kBlock + 32 * s;
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < 32; ++j) {
        amax = std::fmax(amax, std::fabs(to_float(xs[j])));
        sum += to_float(xs[j]);
      }
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      for (int j = 0; j < 32; ++j) {
        const float scaled = to_float(xs[j]) * id;
        const float q = std::nearbyint(scaled);
        bx.q[32 * s + j] = int8_t(q);
        bx.r[32 * s + j] = int8_t(std::nearbyint((scaled - q) * 128.f));  // |.| <= 64
      }
      bx.sum[s] = sum;
      for (int lane = 8 * s; lane < 8 * s + 8; ++lane) {
        bx.dx[lane] = d / 128.f;
        int32_t q = 0, r = 0;
        for (int i = 4 * lane; i < 4 * lane + 4; ++i) q += bx.q[i], r += bx.r[i];
        bx.c[lane] = 32 * (128 * q + r);
      }
    }
  }
}

// The block's weight scales (d * scale) where `lane_scales` can spread them over a vector's lanes: Q4_K / Q5_K
// the 8 sub-block scales (and, in `mins`, dmin * min), Q6_K the 16 group scales.
template <Format F>
inline __m512 block_scales(const uint8_t* b, __m256& mins) {
  if constexpr (F == Q6_K) {
    uint16_t d;
    std::memcpy(&d, b + 208, 2);
    const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    return _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(d)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(scales)));
  } else {
    alignas(8) uint8_t sc[8], mn[8];
    k_scales(b + 4, sc, mn);
    uint16_t d, dmin;
    std::memcpy(&d, b, 2);
    std::memcpy(&dmin, b + 2, 2);
    const auto widen = [](const uint8_t* p) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    };
    mins = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(dmin)), widen(mn));
    return _mm512_castps256_ps512(_mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(d)), widen(sc)));
  }
}

// The lane -> scale index of vector v: sub-block 2v + l / 8 (Q4_K, Q5_K), group 4v + l / 4 (Q6_K).
template <Format F>
inline __m512i lane_scales(int v) {
  const __m512i first = F == Q6_K ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                  : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_add_epi32(first, _mm512_set1_epi32(F == Q6_K ? 4 * v : 2 * v));
}

template <Format F, int R, typename T>
void gemv_rows(const BlockX* xq, const uint8_t* blocks, T* out, int64_t n, int64_t k) {
  const int64_t nb = k / kBlock, row_bytes = nb * kBlockBytes[F];
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = blocks + r * row_bytes;
    __m512 acc[R];
    __m256 acc_min[R];  // Q4_K, Q5_K: the dmin * min terms, per sub-block
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps(), acc_min[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* block = row + b * kBlockBytes[F];
      for (int line = 0; line < kBlockBytes[F]; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(block + 2 * kBlockBytes[F] + line), _MM_HINT_T0);
      }
      __m256 mins;
      const __m512 scales = block_scales<F>(block, mins);
      for (int v = 0; v < 4; ++v) {
        const __m512i w = unpack<F>(block, v);
        const __m512 ws = _mm512_permutexvar_ps(lane_scales<F>(v), scales);
        for (int i = 0; i < R; ++i) {
          const BlockX& bx = xq[i * nb + b];
          __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_load_si512(bx.q + 64 * v));
          dot = _mm512_dpbusd_epi32(_mm512_slli_epi32(dot, 7), w, _mm512_load_si512(bx.r + 64 * v));
          if constexpr (F == Q6_K) dot = _mm512_sub_epi32(dot, _mm512_load_si512(bx.c + 16 * v));
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_load_ps(bx.dx + 16 * v)), acc[i]);
        }
      }
      if constexpr (F != Q6_K) {
        for (int i = 0; i < R; ++i) acc_min[i] = _mm256_fmadd_ps(mins, _mm256_load_ps(xq[i * nb + b].sum), acc_min[i]);
      }
    }
    for (int i = 0; i < R; ++i) {
      store(out + i * n + r, _mm512_reduce_add_ps(_mm512_sub_ps(acc[i], _mm512_zextps256_ps512(acc_min[i]))));
    }
  }
}

template <Format F, typename T>
void gemv_vnni(const T* x, const uint8_t* blocks, T* out, int64_t m, int64_t n, int64_t k) {
  const int64_t nb = k / kBlock;
  BlockX* xq = static_cast<BlockX*>(std::aligned_alloc(64, sizeof(BlockX) * kMaxRows * nb));
  for (int64_t i0 = 0; i0 < m; i0 += kMaxRows) {
    const int rows = int(m - i0 < kMaxRows ? m - i0 : kMaxRows);
    for (int i = 0; i < rows; ++i) quantize_row<F>(x + (i0 + i) * k, k, xq + i * nb);
    T* o = out + i0 * n;
    switch (rows) {
      case 1: gemv_rows<F, 1>(xq, blocks, o, n, k); break;
      case 2: gemv_rows<F, 2>(xq, blocks, o, n, k); break;
      case 3: gemv_rows<F, 3>(xq, blocks, o, n, k); break;
      case 4: gemv_rows<F, 4>(xq, blocks, o, n, k); break;
      case 5: gemv_rows<F, 5>(xq, blocks, o, n, k); break;
      case 6: gemv_rows<F, 6>(xq, blocks, o, n, k); break;
      case 7: gemv_rows<F, 7>(xq, blocks, o, n, k); break;
      default: gemv_rows<F, 8>(xq, blocks, o, n, k); break;
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

#if defined(KQ_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
constexpr int64_t kTile = 16;       // rows of a tile: weight rows of A and C, pairs of k of B (x rows per B row)
constexpr int64_t kStripRows = 32;  // weight rows per strip: two A tiles (tmm4, tmm5)
constexpr int64_t kSubTile = kStripRows * 32;  // bf16 values of one sub-block of a strip

// A block's `group_affine` (the same products, so the same values) in vectors: Q4_K / Q5_K per 32-weight
// sub-block (their two 16-weight groups share it), Q6_K per 16-weight group.
template <Format F>
inline void block_affine(const uint8_t* b, float scale[16], float offset[16]) {
  if constexpr (F == Q6_K) {
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    const __m512 s = _mm512_mul_ps(_mm512_set1_ps(f16(b + 208)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
    _mm512_storeu_ps(scale, s);
    _mm512_storeu_ps(offset, _mm512_mul_ps(_mm512_set1_ps(-32.f), s));
  } else {
    alignas(8) uint8_t sc[8], mn[8];
    k_scales(b + 4, sc, mn);
    const auto widen = [](const uint8_t* p) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    };
    _mm256_storeu_ps(scale, _mm256_mul_ps(_mm256_set1_ps(f16(b)), widen(sc)));
    _mm256_storeu_ps(offset, _mm256_mul_ps(_mm256_set1_ps(-f16(b + 2)), widen(mn)));
  }
}

// The 32 bf16 values fma(q, scale, offset) for the 16 q of q0 with (scale0, offset0), then the 16 of q1 with
// (scale1, offset1), rounded as `dequant` rounds: a look-up table for vpermw.
inline __m512i affine_table(__m512 q0, float scale0, float offset0, __m512 q1, float scale1, float offset1) {
  const __m512 first = _mm512_fmadd_ps(q0, _mm512_set1_ps(scale0), _mm512_set1_ps(offset0));
  const __m512 second = _mm512_fmadd_ps(q1, _mm512_set1_ps(scale1), _mm512_set1_ps(offset1));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(second, first));
}

// Super-block b of a strip's rows r0 .. r1 - 1 (rows past `rows` zero) in bf16 into w, 8 sub-block slots of
// [32 rows][32 k] (16 rows of a slot are one A tile as they lie): `dequant`'s values, fma(q, scale, offset)
// rounded to nearest even. vcvtne2ps2bf16 rounds as native::store16 except for float32 subnormals, which no
// K-quant weight is (nonzero ones are multiples of 2^-24). Q4_K and Q5_K have at most 32 values per sub-block:
// they are computed once as a table and each weight is looked up by its q (vpermw).
template <Format F>
void dequant_super(const uint8_t* row0, int64_t row_bytes, int64_t rows, int64_t b, int64_t r0, int64_t r1,
                   uint16_t* w) {
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 iota16 = _mm512_add_ps(iota, _mm512_set1_ps(16.f));
  for (int64_t r = r0; r < r1; ++r) {
    if (r >= rows) {
      for (int j = 0; j < 8; ++j) _mm512_store_si512(w + j * kSubTile + r * 32, _mm512_setzero_si512());
      continue;
    }
    const uint8_t* block = row0 + r * row_bytes + b * kBlockBytes[F];
    float scale[16], offset[16];
    block_affine<F>(block, scale, offset);
    if constexpr (F == Q4_K) {  // 32 bytes: sub-block 2v in the low nibbles, 2v + 1 in the high ones
      for (int v = 0; v < 4; ++v) {
        const int j = 2 * v;
        const __m512i table = affine_table(iota, scale[j], offset[j], iota, scale[j + 1], offset[j + 1]);
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16 + 32 * v));
        const __m512i q = _mm512_cvtepu8_epi16(bytes);
        const __m512i low = _mm512_and_si512(q, _mm512_set1_epi16(0x0f));
        const __m512i high = _mm512_or_si512(_mm512_srli_epi16(q, 4), _mm512_set1_epi16(16));
        _mm512_store_si512(w + j * kSubTile + r * 32, _mm512_permutexvar_epi16(low, table));
        _mm512_store_si512(w + (j + 1) * kSubTile + r * 32, _mm512_permutexvar_epi16(high, table));
      }
    } else if constexpr (F == Q5_K) {  // q = 0..31: one table per sub-block
      for (int v = 0; v < 4; ++v) {
        const __m512i q = unpack<F>(block, v);
        const __m256i halves[2] = {_mm512_castsi512_si256(q), _mm512_extracti64x4_epi64(q, 1)};
        for (int h = 0; h < 2; ++h) {
          const int j = 2 * v + h;
          const __m512i table = affine_table(iota, scale[j], offset[j], iota16, scale[j], offset[j]);
          _mm512_store_si512(w + j * kSubTile + r * 32,
                             _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(halves[h]), table));
        }
      }
    } else {  // Q6_K: 64 values per 16 weights, computed directly
      alignas(64) uint8_t q[kBlock];
      for (int v = 0; v < 4; ++v) _mm512_store_si512(q + 64 * v, unpack<F>(block, v));
      for (int j = 0; j < 8; ++j) {  // sub-block j: groups 2j, 2j + 1
        __m512 half[2];
        for (int h = 0; h < 2; ++h) {
          const int g = 2 * j + h;
          const __m128i group = _mm_load_si128(reinterpret_cast<const __m128i*>(q + 16 * g));
          const __m512 values = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(group));
          half[h] = _mm512_fmadd_ps(values, _mm512_set1_ps(scale[g]), _mm512_set1_ps(offset[g]));
        }
        const __m512bh bf16 = _mm512_cvtne2ps_pbh(half[1], half[0]);
        _mm512_store_si512(w + j * kSubTile + r * 32, reinterpret_cast<__m512i>(bf16));
      }
    }
  }
}


// Per strip of 32 weight rows, super-block by super-block: the super-block's A tiles (16 KiB, double-buffered) stay
// in L1 while every x tile passes (two at a time, four accumulators, C kept in memory between super-blocks); the
// first pass dequantizes the next super-block, four rows per sub-block step, while the tile unit multiplies.
template <Format F>
void gemm_amx(const uint16_t* x, const uint8_t* blocks, uint16_t* out, int64_t m, int64_t n, int64_t k) {
  const int64_t nb = k / kBlock, subs = k / 32, row_bytes = nb * kBlockBytes[F];
  const int64_t strips = (n + kStripRows - 1) / kStripRows, m_tiles = (m + kTile - 1) / kTile;
  const int64_t tile_size = subs * kTile * kTile;  // 32-bit lanes of one x tile's B tiles
  constexpr int64_t kC = kTile * kTile;            // floats of one C tile
  uint32_t* xv = static_cast<uint32_t*>(std::aligned_alloc(64, m_tiles * tile_size * 4));
#pragma omp parallel
  {
    pack_x(x, m, k, xv);  // ends in a barrier
    configure_tiles();
    uint16_t* a = static_cast<uint16_t*>(std::aligned_alloc(64, 2 * 8 * kSubTile * 2));  // two super-blocks
    float* c = static_cast<float*>(std::aligned_alloc(64, (m_tiles + 1) * 2 * kC * 4));  // [x tile][weight tile]
#pragma omp for schedule(static)
    for (int64_t si = 0; si < strips; ++si) {
      const int64_t n0 = si * kStripRows, rows = std::min(kStripRows, n - n0);
      const uint8_t* row0 = blocks + n0 * row_bytes;
      dequant_super<F>(row0, row_bytes, rows, 0, 0, kStripRows, a);
      for (int64_t b = 0; b < nb; ++b) {
        const uint16_t* ab = a + (b & 1) * 8 * kSubTile;
        uint16_t* next = a + ((b + 1) & 1) * 8 * kSubTile;
        for (int64_t t = 0; t < m_tiles; t += 2) {
          const bool pair = t + 1 < m_tiles;
          float* ct = c + t * 2 * kC;
          if (b == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, ct, 64);
            _tile_loadd(1, ct + kC, 64);
            if (pair) {
              _tile_loadd(2, ct + 2 * kC, 64);
              _tile_loadd(3, ct + 3 * kC, 64);
            }
          }
          const uint32_t* b0 = xv + t * tile_size + 8 * b * kC;
          for (int64_t j = 0; j < 8; ++j) {
            if (t == 0 && b + 1 < nb) dequant_super<F>(row0, row_bytes, rows, b + 1, 4 * j, 4 * j + 4, next);
            _tile_loadd(4, ab + j * kSubTile, 64);
            _tile_loadd(5, ab + j * kSubTile + kTile * 32, 64);
            _tile_loadd(6, b0 + j * kC, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            if (pair) {
              _tile_loadd(7, b0 + tile_size + j * kC, 64);
              _tile_dpbf16ps(2, 4, 7);
              _tile_dpbf16ps(3, 5, 7);
            }
          }
          _tile_stored(0, ct, 64);
          _tile_stored(1, ct + kC, 64);
          _tile_stored(2, ct + 2 * kC, 64);  // c has a spare x tile for an odd count
          _tile_stored(3, ct + 3 * kC, 64);
        }
      }
      for (int64_t t = 0; t < m_tiles; ++t) {
        store_tiles(c + t * 2 * kC, out + t * kTile * n + n0, n, std::min(kTile, m - t * kTile), n - n0);
      }
    }
    std::free(c);
    std::free(a);
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
    case Q4_K:
      return portable ? gemv_portable<Q4_K>(x, blocks, out, m, n, k) : gemv_vnni<Q4_K>(x, blocks, out, m, n, k);
    case Q5_K:
      return portable ? gemv_portable<Q5_K>(x, blocks, out, m, n, k) : gemv_vnni<Q5_K>(x, blocks, out, m, n, k);
    default:
      return portable ? gemv_portable<Q6_K>(x, blocks, out, m, n, k) : gemv_vnni<Q6_K>(x, blocks, out, m, n, k);
  }
}

template <typename T>
void dequantize(const uint8_t* blocks, T* out, int64_t n, int64_t k, int format) {
  switch (format) {
    case Q4_K: return dequant<Q4_K>(blocks, out, n, k);
    case Q5_K: return dequant<Q5_K>(blocks, out, n, k);
    default: return dequant<Q6_K>(blocks, out, n, k);
  }
}

}  // namespace

extern "C" {

// format: 0 = Q4_K, 1 = Q5_K, 2 = Q6_K; k a multiple of 256; x [m, k], out [m, n], blocks [n, k / 256 blocks].
int gguf_kquants_has_vnni() { return kHasVnni; }
void gguf_kquants_gemv_f32(const float* x, const uint8_t* blocks, float* out, int64_t m, int64_t n, int64_t k,
                           int format, int portable) {
  gemv(x, blocks, out, m, n, k, format, portable);
}
void gguf_kquants_gemv_bf16(const uint16_t* x, const uint8_t* blocks, uint16_t* out, int64_t m, int64_t n, int64_t k,
                            int format, int portable) {
  gemv(x, blocks, out, m, n, k, format, portable);
}
int gguf_kquants_has_amx() { return has_amx(); }
// bf16 x [m, k] -> out [m, n] on AMX tiles; only where gguf_kquants_has_amx() says so.
void gguf_kquants_gemm_bf16(const uint16_t* x, const uint8_t* blocks, uint16_t* out, int64_t m, int64_t n, int64_t k,
                            int format) {
  if (!has_amx()) return;  // callers ask gguf_kquants_has_amx first
  switch (format) {
    case Q4_K: return gemm_amx<Q4_K>(x, blocks, out, m, n, k);
    case Q5_K: return gemm_amx<Q5_K>(x, blocks, out, m, n, k);
    default: return gemm_amx<Q6_K>(x, blocks, out, m, n, k);
  }
}
void gguf_kquants_dequant_f32(const uint8_t* blocks, float* out, int64_t n, int64_t k, int format) {
  dequantize(blocks, out, n, k, format);
}
void gguf_kquants_dequant_bf16(const uint8_t* blocks, uint16_t* out, int64_t n, int64_t k, int format) {
  dequantize(blocks, out, n, k, format);
}
}
