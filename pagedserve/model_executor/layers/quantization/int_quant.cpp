// Linear layers on integer-quantized weights (int_quant.py has the formats and the packed int4 layout).
//
// Activations are quantized on the fly to int8 plus an int8 remainder in steps of 1/128 of the int8 step,
// x = d (q + r / 128), within d / 256: int8 alone (vLLM's W8A8 dynamic per-token scheme) moved SmolLM2-135M's
// teacher-forced top-1 token off the float model's on 11% of positions against 4.5% for int8 weights with exact
// activations; with the remainder it is 4.5% too (the same finding as gguf_q4_q8.cpp's).
//
// int8 (w = q * s[n]): one d per row of x. q and r are stored + 128 as unsigned bytes for AVX512-VNNI's vpdpbusd
// (unsigned x signed, four products per int32 lane), with separate int32 accumulators (128 q + r would overflow
// on long rows); the offsets are removed with 128 * the weight row's sum. Register blocking: a tile of kCols
// weight rows times kRows x rows, each loaded vector used several times. Batches run on AMX int8 tiles
// (tdpbusd) with the same arithmetic: the result is the same to the bit.
//
// int4 (w = (q - z[n, g]) * s[n, g]): one d per 32-block of x, as gguf_q4_q8.cpp does for Q4_1. The 0..15
// weights are unsigned already: vpdpbusd(w, q) * 128 + vpdpbusd(w, r), scaled per int32 lane by s_w * d / 128.
// The zero term, sum_g s z sum_{k in g} x, uses the group sums of the quantized x, so the result is exactly
// W (x quantized) up to float rounding. Batches of bf16 x run on AMX bf16 tiles, the weight dequantized strip
// by strip (a 16-entry bf16 table per group, looked up with vpermw); `int4_dequant` writes the whole weight for
// the other batched path (torch's matmul on it).
//
// Without VNNI (or with `portable`) plain loops dot float weights with the exact activations.
// Plain C ABI (called through ctypes), built on first use (see native/build.py).

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "amx.h"


namespace {

using native::store;
using native::to_float;

inline int64_t chunks64(int64_t k) { return (k + 63) / 64; }

// One int4 row to float: chunk c holds weights 64c + j (low nibble of byte j) and 64c + 32 + j (high nibble).
inline void int4_row(const uint8_t* packed, const float* scale, const uint8_t* zero, int64_t k, int64_t group,
                     float* w) {
  for (int64_t c = 0; c < chunks64(k); ++c) {
    for (int64_t j = 0; j < 32; ++j) {
      const uint8_t byte = packed[32 * c + j];
      const int64_t lo = 64 * c + j, hi = lo + 32;
      w[lo] = float(int(byte & 0xf) - int(zero[lo / group])) * scale[lo / group];
      if (hi < k) w[hi] = float(int(byte >> 4) - int(zero[hi / group])) * scale[hi / group];
    }
  }
}

template <typename T>
void int8_portable(const T* x, const int8_t* w, const float* ws, T* out, int64_t m, int64_t n, int64_t k) {
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* row = w + r * k;
    for (int64_t i = 0; i < m; ++i) {
      float s = 0.f;
      for (int64_t j = 0; j < k; ++j) s += to_float(x[i * k + j]) * float(row[j]);
      store(out + i * n + r, s * ws[r]);
    }
  }
}

template <typename T>
void int4_portable(const T* x, const uint8_t* packed, const float* scales, const uint8_t* zeros, T* out, int64_t m,
                   int64_t n, int64_t k, int64_t group) {
  const int64_t row_bytes = 32 * chunks64(k), groups = k / group;
#pragma omp parallel if (n * k > 65536)
  {
    float* w = static_cast<float*>(std::malloc(sizeof(float) * k));
#pragma omp for
    for (int64_t r = 0; r < n; ++r) {
      int4_row(packed + r * row_bytes, scales + r * groups, zeros + r * groups, k, group, w);
      for (int64_t i = 0; i < m; ++i) {
        float s = 0.f;
        for (int64_t j = 0; j < k; ++j) s += to_float(x[i * k + j]) * w[j];
        store(out + i * n + r, s);
      }
    }
    std::free(w);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kHasVnni = true;

// ---- int8 ----

constexpr int kRows = 2;  // x rows per tile (two accumulators each: the int8 part and the remainder)
constexpr int kCols = 4;  // weight rows per tile

// x quantized per row for the int8 kernels, rows padded to whole 64-byte chunks: x = d (q + r / 128), q and r
// stored + 128 as unsigned bytes (r is within +-64), and step[i] = d / 128.
struct XInt8 {
  int64_t kp;
  uint8_t* q;
  uint8_t* r;
  float* step;
  XInt8(int64_t rows, int64_t k)
      : kp(64 * chunks64(k)),
        q(static_cast<uint8_t*>(std::aligned_alloc(64, 2 * rows * kp))),
        r(q + rows * kp),
        step(static_cast<float*>(std::malloc(sizeof(float) * rows))) {
    std::memset(q, 128, 2 * rows * kp);  // padding (and rows that are not there) are x = 0
  }
  XInt8(const XInt8&) = delete;
  XInt8& operator=(const XInt8&) = delete;
  ~XInt8() {
    std::free(step);
    std::free(q);
  }
};

template <typename T>
void quantize_rows_int8(const T* x, int64_t m, int64_t k, XInt8& xq) {
#pragma omp parallel for if (m * k > 65536)
  for (int64_t i = 0; i < m; ++i) {
    const T* row = x + i * k;
    __m512 amax = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(native::load16(row + j)));
    float a = _mm512_reduce_max_ps(amax);
    for (int64_t t = j; t < k; ++t) a = std::fmax(a, std::fabs(to_float(row[t])));
    const float d = a / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    xq.step[i] = d / 128.f;
    uint8_t *q = xq.q + i * xq.kp, *r = xq.r + i * xq.kp;
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i offset = _mm512_set1_epi32(128);
    for (j = 0; j + 16 <= k; j += 16) {
      const __m512 scaled = _mm512_mul_ps(native::load16(row + j), vid);
      const __m512 q1 = _mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i q2 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(scaled, q1), _mm512_set1_ps(128.f)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j),
                       _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q1), offset)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(r + j), _mm512_cvtepi32_epi8(_mm512_add_epi32(q2, offset)));
    }
    for (; j < k; ++j) {
      const float scaled = to_float(row[j]) * id, q1 = std::nearbyint(scaled);
      q[j] = uint8_t(int(q1) + 128);
      r[j] = uint8_t(int(std::nearbyint((scaled - q1) * 128.f)) + 128);
    }
  }
}

// 128 * the sum of each of the C weight rows (k bytes apart): what the + 128 of x adds to a dot product.
template <int C>
inline void int8_offsets(const int8_t* w, int64_t k, int32_t* offsets) {
  const int64_t nc = chunks64(k);
  const __mmask64 tail = k % 64 ? (__mmask64(1) << (k % 64)) - 1 : ~__mmask64(0);
  for (int c = 0; c < C; ++c) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t ch = 0; ch < nc; ++ch) {
      const __m512i v = _mm512_maskz_loadu_epi8(ch + 1 < nc ? ~__mmask64(0) : tail, w + c * k + 64 * ch);
      s = _mm512_dpbusd_epi32(s, _mm512_set1_epi8(1), v);
    }
    offsets[c] = 128 * _mm512_reduce_add_epi32(s);
  }
}

// One output from the two dot products (int8 part, remainder) less x's + 128 offsets. The AMX kernels' 16-lane
// version does the same float operations: both give the same bits.
inline float int8_output(int32_t dot_q, int32_t dot_r, float step, float scale) {
  return (float(dot_q) * 128.f + float(dot_r)) * step * scale;
}
inline __m512 int8_output16(__m512i dot_q, __m512i dot_r, float step, __m512 scale) {
  const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_q), _mm512_set1_ps(128.f), _mm512_cvtepi32_ps(dot_r));
  return _mm512_mul_ps(_mm512_mul_ps(sum, _mm512_set1_ps(step)), scale);  // * 128 is exact: fma or not, same sum
}

// out[R rows, C cols] for C weight rows w (k bytes apart) and R rows of x from row i0.
template <int R, int C, typename T>
inline void int8_tile(const XInt8& xq, int64_t i0, const int8_t* w, const float* ws, const int32_t* offsets, T* out,
                      int64_t n, int64_t k) {
  const int64_t nc = chunks64(k);
  const __mmask64 tail = k % 64 ? (__mmask64(1) << (k % 64)) - 1 : ~__mmask64(0);
  __m512i acc_q[R][C], acc_r[R][C];  // separate: 128 q + r would overflow int32 for long rows
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc_q[i][c] = acc_r[i][c] = _mm512_setzero_si512();
  for (int64_t ch = 0; ch < nc; ++ch) {
    const __mmask64 mask = ch + 1 < nc ? ~__mmask64(0) : tail;
    __m512i wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_maskz_loadu_epi8(mask, w + c * k + 64 * ch);
    for (int i = 0; i < R; ++i) {
      const __m512i xv = _mm512_load_si512(xq.q + (i0 + i) * xq.kp + 64 * ch);
      const __m512i xr = _mm512_load_si512(xq.r + (i0 + i) * xq.kp + 64 * ch);
      for (int c = 0; c < C; ++c) {
        acc_q[i][c] = _mm512_dpbusd_epi32(acc_q[i][c], xv, wv[c]);
        acc_r[i][c] = _mm512_dpbusd_epi32(acc_r[i][c], xr, wv[c]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c)
      store(out + i * n + c, int8_output(_mm512_reduce_add_epi32(acc_q[i][c]) - offsets[c],
                                         _mm512_reduce_add_epi32(acc_r[i][c]) - offsets[c], xq.step[i0 + i], ws[c]));
}

template <int C, typename T>
inline void int8_cols(const XInt8& xq, const int8_t* w, const float* ws, T* out, int64_t m, int64_t n, int64_t k) {
  int32_t offsets[C];
  int8_offsets<C>(w, k, offsets);
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) int8_tile<kRows, C>(xq, i, w, ws, offsets, out + i * n, n, k);
  if (i < m) int8_tile<1, C>(xq, i, w, ws, offsets, out + i * n, n, k);
}

template <typename T>
void int8_vnni(const T* x, const int8_t* w, const float* ws, T* out, int64_t m, int64_t n, int64_t k) {
  XInt8 xq(m, k);
  quantize_rows_int8(x, m, k, xq);
  const int64_t tiles = (n + kCols - 1) / kCols;
#pragma omp parallel for if (n * k > 65536)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r = t * kCols;
    if (r + kCols <= n) {
      int8_cols<kCols>(xq, w + r * k, ws + r, out + r, m, n, k);
    } else {
      for (int64_t c = r; c < n; ++c) int8_cols<1>(xq, w + c * k, ws + c, out + c, m, n, k);
    }
  }
}

// ---- int4 ----

constexpr int kMaxRows4 = 8;  // x rows per pass over the int4 weights

// One 64-weight chunk of a quantized x row: q1 and the remainder q2 in weight order, and per int32 lane of the
// dot product its block's d / 128 (lanes 0-7: weights 0-31, lanes 8-15: weights 32-63).
struct ChunkX {
  int8_t q[64];
  int8_t r[64];
  float dx[16];
};

// A row of x per 32-block to ChunkX (a missing last block stays zero), and the sums of the quantized x over each
// group (for the zero term).
template <typename T>
void quantize_row_int4(const T* x, int64_t k, int64_t group, ChunkX* chunks, float* group_sums) {
  const int64_t nc = chunks64(k);
  std::memset(chunks, 0, sizeof(ChunkX) * nc);
  for (int64_t g = 0; g < k / group; ++g) group_sums[g] = 0.f;
  for (int64_t b = 0; b < k / 32; ++b) {
    const T* xb = x + 32 * b;
    const __m512 v0 = native::load16(xb), v1 = native::load16(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    ChunkX& cx = chunks[b / 2];
    const int h = int(b % 2);
    __m512i sum = _mm512_setzero_si512();
    for (int half = 0; half < 2; ++half) {
      const __m512 scaled = _mm512_mul_ps(half ? v1 : v0, _mm512_set1_ps(id));
      const __m512 q1 = _mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i i1 = _mm512_cvtps_epi32(q1);
      const __m512i i2 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(scaled, q1), _mm512_set1_ps(128.f)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(cx.q + 32 * h + 16 * half), _mm512_cvtepi32_epi8(i1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(cx.r + 32 * h + 16 * half), _mm512_cvtepi32_epi8(i2));
      sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_slli_epi32(i1, 7), i2));
    }
    for (int lane = 8 * h; lane < 8 * h + 8; ++lane) cx.dx[lane] = d / 128.f;
    group_sums[32 * b / group] += d / 128.f * float(_mm512_reduce_add_epi32(sum));
  }
}

// 64 int4 weights of one chunk (32 bytes) as 64 unsigned bytes in order.
inline __m512i unpack_chunk(const uint8_t* p) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i mask = _mm256_set1_epi8(0x0f);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, mask)),
                            _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask), 1);
}

// sum_g scale[g] zero[g] sums[g]: the zero term of one output.
inline float zero_term(const float* scale, const uint8_t* zero, const float* sums, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (groups - g)) - 1);
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zero + g)));
    const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scale + g), z);
    acc = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mask, sums + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// chunk_groups[2 ch + h]: the group of block h of chunk ch (worked out once: no divisions in the loop).
template <int R, typename T>
void int4_rows(const ChunkX* xq, const float* sums, const uint8_t* packed, const float* scales, const uint8_t* zeros,
               const int32_t* chunk_groups, T* out, int64_t n, int64_t k, int64_t group) {
  const int64_t nc = chunks64(k), groups = k / group, row_bytes = 32 * nc;
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = packed + r * row_bytes;
    const float* scale = scales + r * groups;
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t ch = 0; ch < nc; ++ch) {
      _mm_prefetch(reinterpret_cast<const char*>(row + 32 * ch + 512), _MM_HINT_T0);
      const __m512i w = unpack_chunk(row + 32 * ch);
      const __m512 ws = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(scale[chunk_groups[2 * ch]]),
                                             _mm512_set1_ps(scale[chunk_groups[2 * ch + 1]]));
      for (int i = 0; i < R; ++i) {
        const ChunkX& cx = xq[i * nc + ch];
        __m512i dot = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(cx.q)), 7);
        dot = _mm512_dpbusd_epi32(dot, w, _mm512_loadu_si512(cx.r));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_loadu_ps(cx.dx)), acc[i]);
      }
    }
    for (int i = 0; i < R; ++i)
      store(out + i * n + r,
            _mm512_reduce_add_ps(acc[i]) - zero_term(scale, zeros + r * groups, sums + i * groups, groups));
  }
}

template <typename T>
void int4_vnni(const T* x, const uint8_t* packed, const float* scales, const uint8_t* zeros, T* out, int64_t m,
               int64_t n, int64_t k, int64_t group) {
  const int64_t nc = chunks64(k), groups = k / group;
  ChunkX* xq = static_cast<ChunkX*>(std::aligned_alloc(64, sizeof(ChunkX) * kMaxRows4 * nc));
  float* sums = static_cast<float*>(std::malloc(sizeof(float) * kMaxRows4 * groups));
  int32_t* chunk_groups = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * 2 * nc));
  // a missing last block (k % 64 == 32) takes the group before it: its x is zero
  for (int64_t b = 0; b < 2 * nc; ++b) chunk_groups[b] = int32_t(std::min(32 * b, k - 1) / group);
  for (int64_t i0 = 0; i0 < m; i0 += kMaxRows4) {
    const int rows = int(m - i0 < kMaxRows4 ? m - i0 : kMaxRows4);
    for (int i = 0; i < rows; ++i) quantize_row_int4(x + (i0 + i) * k, k, group, xq + i * nc, sums + i * groups);
    T* o = out + i0 * n;
    switch (rows) {
      case 1: int4_rows<1>(xq, sums, packed, scales, zeros, chunk_groups, o, n, k, group); break;
      case 2: int4_rows<2>(xq, sums, packed, scales, zeros, chunk_groups, o, n, k, group); break;
      case 3: int4_rows<3>(xq, sums, packed, scales, zeros, chunk_groups, o, n, k, group); break;
      case 4: int4_rows<4>(xq, sums, packed, scales, zeros, chunk_groups, o, n, k, group); break;
      case 5: int4_rows<5>(xq, sums, packed, scales, zeros, chunk_groups, o, n, k, group); break;
      case 6: int4_rows<6>(xq, sums, packed, scales, zeros, chunk_groups, o, n, k, group); break;
      case 7: int4_rows<7>(xq, sums, packed, scales, zeros, chunk_groups, o, n, k, group); break;
      default: int4_rows<8>(xq, sums, packed, scales, zeros, chunk_groups, o, n, k, group); break;
    }
  }
  std::free(chunk_groups);
  std::free(sums);
  std::free(xq);
}

#ifdef __AVX512BF16__
// The 16 values (q - zero) * scale, q = 0..15, in bf16 (float math, then round to nearest even: the values
// int4_dequant writes), in the low half: the table vpermw looks the weights up in.
inline __m512i int4_table(float scale, float zero) {
  const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m256bh t = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(zero)), _mm512_set1_ps(scale)));
  return _mm512_castsi256_si512(reinterpret_cast<__m256i>(t));
}

// The 32 weights of block s of an int4 row in bf16, in order.
inline __m512i int4_block_bf16(const uint8_t* row, int64_t s, __m512i table) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * (s / 2)));
  const __m256i q = _mm256_and_si256(s % 2 ? _mm256_srli_epi16(bytes, 4) : bytes, _mm256_set1_epi8(0x0f));
  return _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(q), table);
}

// The weight in bf16 by table look-ups (a table per group, then one vpermw per 32 weights).
void int4_dequant_bf16(const uint8_t* packed, const float* scales, const uint8_t* zeros, uint16_t* out, int64_t n,
                       int64_t k, int64_t group) {
  const int64_t row_bytes = 32 * chunks64(k), groups = k / group, per_group = group / 32;
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i table = int4_table(scales[r * groups + g], float(zeros[r * groups + g]));
      for (int64_t s = g * per_group; s < (g + 1) * per_group; ++s)
        _mm512_storeu_si512(out + r * k + 32 * s, int4_block_bf16(packed + r * row_bytes, s, table));
    }
  }
}
#endif

template <typename T>
void int4_dequant(const uint8_t* packed, const float* scales, const uint8_t* zeros, T* out, int64_t n, int64_t k,
                  int64_t group) {
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<T, uint16_t>) return int4_dequant_bf16(packed, scales, zeros, out, n, k, group);
#endif
  const int64_t nc = chunks64(k), groups = k / group;
  std::vector<int64_t> block_group(k / 32);  // worked out once: no divisions in the loop
  for (int64_t b = 0; b < k / 32; ++b) block_group[b] = 32 * b / group;
#pragma omp parallel for if (n * k > 65536)
  for (int64_t r = 0; r < n; ++r) {
    const float* scale = scales + r * groups;
    const uint8_t* zero = zeros + r * groups;
    for (int64_t ch = 0; ch < nc; ++ch) {
      alignas(64) uint8_t w[64];
      _mm512_store_si512(w, unpack_chunk(packed + r * 32 * nc + 32 * ch));
      for (int64_t q = 0; q < 4 && 64 * ch + 16 * q < k; ++q) {  // 16 weights: one group (a multiple of 32)
        const int64_t j = 64 * ch + 16 * q, g = block_group[j / 32];
        const __m512i v = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(w + 16 * q)));
        const __m512 z = _mm512_set1_ps(float(zero[g]));
        native::store16(out + r * k + j, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(v), z),
                                                       _mm512_set1_ps(scale[g])));
      }
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
// ---- AMX, for batches: int8 on int8 tiles (tdpbsud), int4 dequantized to bf16 tiles (tdpbf16ps) ----
// A tiles are 16 weight rows (64 bytes of k per step, as stored: no transposition of the weight), B tiles 16 rows
// of x transposed once per call into VNNI layout (16 lanes of 4 int8 / 2 bf16 along k, by 16 rows of x), C tiles
// [16 weight rows][16 rows of x], transposed on the way out. Each thread fills a strip of 32 weight rows (two A
// tiles per step) and runs every x tile of a block of kBlockTiles through it.

constexpr int64_t kTile = 16;
constexpr int64_t kStripRows = 32;
constexpr int64_t kBlockTiles = 32;  // x tiles (512 rows) per pass over the strips: x's block stays in L2
constexpr int64_t kTileWords = kTile * kTile;



// x as B tiles into xt, [x tile][step][16 lanes of k][16 rows] words: row_step(i, s) is row i's 64 bytes of step
// s. A worksharing loop: called inside gemm_amx's parallel region (no region of its own to start).
template <typename RowStep>
void transpose_x(int64_t m_tiles, int64_t steps, RowStep row_step, uint32_t* xt) {
#pragma omp for
  for (int64_t ts = 0; ts < m_tiles * steps; ++ts) {
    const int64_t t = ts / steps, s = ts % steps;
    __m512i r[16];
    for (int64_t i = 0; i < kTile; ++i) r[i] = row_step(kTile * t + i, s);
    transpose16(r);
    for (int64_t p = 0; p < kTile; ++p) _mm512_storeu_si512(xt + ts * kTileWords + p * kTile, r[p]);
  }
}

// C tiles [two B tiles][two A tiles] of 16 x 16 words for one strip (A tiles at strip[2 s], strip[2 s + 1]) and
// B tiles b0, b1 ([step] tiles each; b1 may be null).
template <bool Int8>
void multiply_strip(const uint32_t* strip, const uint32_t* b0, const uint32_t* b1, int64_t steps, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, strip + 2 * s * kTileWords, 64);
    _tile_loadd(5, strip + (2 * s + 1) * kTileWords, 64);
    _tile_loadd(6, b0 + s * kTileWords, 64);
    if constexpr (Int8) {
      _tile_dpbsud(0, 4, 6);
      _tile_dpbsud(1, 5, 6);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
    }
    if (b1 != nullptr) {
      _tile_loadd(7, b1 + s * kTileWords, 64);
      if constexpr (Int8) {
        _tile_dpbsud(2, 4, 7);
        _tile_dpbsud(3, 5, 7);
      } else {
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + kTileWords, 64);
  _tile_stored(2, c + 2 * kTileWords, 64);
  _tile_stored(3, c + 3 * kTileWords, 64);
}

// The tiled product over x tiles xt ([m_tiles][steps] B tiles), which prepare() writes (transpose_x) first in the
// same parallel region. Int8: one x tile per pass, xt its int8 part and xt_rem its remainder; bf16 (xt_rem null):
// two x tiles per pass. fill(n0, rows, strip) fills a strip, A tiles [step][two tiles] (rows past `rows` zero);
// epilogue(c, c_rem, m0, n0, rows, cols) writes one C tile, transposed ([n][m] words).
template <bool Int8, typename Prepare, typename Fill, typename Epilogue>
void gemm_amx(int64_t m, int64_t n, int64_t steps, const uint32_t* xt, const uint32_t* xt_rem, Prepare prepare,
              Fill fill, Epilogue epilogue) {
  const int64_t strips = (n + kStripRows - 1) / kStripRows, m_tiles = (m + kTile - 1) / kTile;
  auto x_tile = [&](const uint32_t* base, int64_t t) { return base + t * steps * kTileWords; };
#pragma omp parallel
  {
    prepare();
    configure_tiles();
    uint32_t* strip = static_cast<uint32_t*>(std::aligned_alloc(64, steps * 2 * kTileWords * 4));
    alignas(64) int32_t c[4 * kTileWords];
    for (int64_t first = 0; first < m_tiles; first += kBlockTiles) {
      const int64_t last = std::min(m_tiles, first + kBlockTiles);
#pragma omp for schedule(static)
      for (int64_t si = 0; si < strips; ++si) {
        const int64_t n0 = si * kStripRows, rows = std::min(kStripRows, n - n0);
        fill(n0, rows, strip);
        for (int64_t t = first; t < last; t += Int8 ? 1 : 2) {
          const bool pair = !Int8 && t + 1 < last;
          multiply_strip<Int8>(strip, x_tile(xt, t), Int8 ? x_tile(xt_rem, t) : pair ? x_tile(xt, t + 1) : nullptr,
                               steps, c);
          for (int64_t i = 0; i < (pair ? 2 : 1); ++i) {
            for (int64_t j = 0; j < 2; ++j) {
              const int64_t m0 = (t + i) * kTile, c0 = n0 + j * kTile;
              if (c0 < n) {
                epilogue(c + (2 * i + j) * kTileWords, Int8 ? c + (2 + j) * kTileWords : nullptr, m0, c0,
                         std::min(kTile, m - m0), std::min(kTile, n - c0));
              }
            }
          }
        }
      }
    }
    std::free(strip);
    _tile_release();
  }
}

// Row i of a transposed C tile, 16 outputs, into out (only `cols` of them).
template <typename T>
inline void store_row(T* out, __m512 v, int64_t cols) {
  if (cols == kTile) {
    native::store16(out, v);
  } else {
    alignas(64) float row[kTile];
    _mm512_store_ps(row, v);
    for (int64_t j = 0; j < cols; ++j) store(out + j, row[j]);
  }
}

template <typename T>
void int8_amx(const T* x, const int8_t* w, const float* ws, T* out, int64_t m, int64_t n, int64_t k) {
  const int64_t nc = chunks64(k), m_tiles = (m + kTile - 1) / kTile;
  XInt8 xq(kTile * m_tiles, k);
  quantize_rows_int8(x, m, k, xq);
  auto rows_of = [&](const uint8_t* base) {
    return [&xq, base](int64_t i, int64_t ch) { return _mm512_load_si512(base + i * xq.kp + 64 * ch); };
  };
  std::unique_ptr<uint32_t[]> xt(new uint32_t[2 * m_tiles * nc * kTileWords]);
  uint32_t* xt_rem = xt.get() + m_tiles * nc * kTileWords;
  auto prepare = [&] {
    transpose_x(m_tiles, nc, rows_of(xq.q), xt.get());
    transpose_x(m_tiles, nc, rows_of(xq.r), xt_rem);
  };
  const __mmask64 tail = k % 64 ? (__mmask64(1) << (k % 64)) - 1 : ~__mmask64(0);
  std::vector<int32_t> offsets(n);  // written by the thread that owns the strip (the same one in every pass)
  auto fill = [&](int64_t n0, int64_t rows, uint32_t* strip) {
    for (int64_t row = 0; row < kStripRows; ++row) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t ch = 0; ch < nc; ++ch) {
        const __mmask64 mask = ch + 1 < nc ? ~__mmask64(0) : tail;
        const __m512i v = row < rows ? _mm512_maskz_loadu_epi8(mask, w + (n0 + row) * k + 64 * ch) : _mm512_setzero_si512();
        sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), v);
        _mm512_store_si512(strip + 2 * ch * kTileWords + row * kTile, v);
      }
      if (row < rows) offsets[n0 + row] = 128 * _mm512_reduce_add_epi32(sum);
    }
  };
  auto epilogue = [&](const int32_t* c, const int32_t* c_rem, int64_t m0, int64_t c0, int64_t rows, int64_t cols) {
    __m512i q[16], r[16];
    for (int64_t i = 0; i < kTile; ++i) {
      q[i] = _mm512_load_si512(c + i * kTile);
      r[i] = _mm512_load_si512(c_rem + i * kTile);
    }
    transpose16(q);
    transpose16(r);
    const __mmask16 valid = __mmask16((1u << cols) - 1);
    const __m512i offset = _mm512_maskz_loadu_epi32(valid, offsets.data() + c0);
    const __m512 scale = _mm512_maskz_loadu_ps(valid, ws + c0);
    for (int64_t i = 0; i < rows; ++i) {
      store_row(out + (m0 + i) * n + c0,
                int8_output16(_mm512_sub_epi32(q[i], offset), _mm512_sub_epi32(r[i], offset), xq.step[m0 + i], scale),
                cols);
    }
  };
  gemm_amx<true>(m, n, nc, xt.get(), xt_rem, prepare, fill, epilogue);
}

void int4_amx(const uint16_t* x, const uint8_t* packed, const float* scales, const uint8_t* zeros, uint16_t* out,
              int64_t m, int64_t n, int64_t k, int64_t group) {
  const int64_t nb = k / 32, row_bytes = 32 * chunks64(k), groups = k / group, m_tiles = (m + kTile - 1) / kTile;
  std::unique_ptr<uint32_t[]> xt(new uint32_t[m_tiles * nb * kTileWords]);
  auto prepare = [&] {
    transpose_x(m_tiles, nb, [&](int64_t i, int64_t s) {
      return i < m ? _mm512_loadu_si512(x + i * k + 32 * s) : _mm512_setzero_si512();
    }, xt.get());
  };
  std::vector<int64_t> block_group(nb);  // worked out once: a division per block costs as much as the block
  for (int64_t s = 0; s < nb; ++s) block_group[s] = 32 * s / group;
  auto fill = [&](int64_t n0, int64_t rows, uint32_t* strip) {
    __m512i tables[kStripRows];  // each row's table for the current group
    for (int64_t s = 0; s < nb; ++s) {
      const bool new_group = s == 0 || block_group[s] != block_group[s - 1];
      for (int64_t row = 0; row < kStripRows; ++row) {
        __m512i v = _mm512_setzero_si512();
        if (row < rows) {
          const int64_t g = (n0 + row) * groups + block_group[s];
          if (new_group) tables[row] = int4_table(scales[g], float(zeros[g]));
          v = int4_block_bf16(packed + (n0 + row) * row_bytes, s, tables[row]);
        }
        _mm512_store_si512(strip + 2 * s * kTileWords + row * kTile, v);
      }
    }
  };
  auto epilogue = [&](const int32_t* c, const int32_t*, int64_t m0, int64_t c0, int64_t rows, int64_t cols) {
    __m512i v[16];
    for (int64_t i = 0; i < kTile; ++i) v[i] = _mm512_load_si512(c + i * kTile);
    transpose16(v);
    for (int64_t i = 0; i < rows; ++i) store_row(out + (m0 + i) * n + c0, _mm512_castsi512_ps(v[i]), cols);
  };
  gemm_amx<false>(m, n, nb, xt.get(), nullptr, prepare, fill, epilogue);
}
bool has_amx() { return amx_permitted(); }
#else
bool has_amx() { return false; }
template <typename T>
void int8_amx(const T* x, const int8_t* w, const float* ws, T* out, int64_t m, int64_t n, int64_t k) {
  int8_vnni(x, w, ws, out, m, n, k);
}
void int4_amx(const uint16_t* x, const uint8_t* packed, const float* scales, const uint8_t* zeros, uint16_t* out,
              int64_t m, int64_t n, int64_t k, int64_t group) {
  int4_vnni(x, packed, scales, zeros, out, m, n, k, group);
}
#endif
#else
constexpr bool kHasVnni = false;
bool has_amx() { return false; }
template <typename T>
void int8_amx(const T* x, const int8_t* w, const float* ws, T* out, int64_t m, int64_t n, int64_t k) {
  int8_portable(x, w, ws, out, m, n, k);
}
void int4_amx(const uint16_t* x, const uint8_t* packed, const float* scales, const uint8_t* zeros, uint16_t* out,
              int64_t m, int64_t n, int64_t k, int64_t group) {
  int4_portable(x, packed, scales, zeros, out, m, n, k, group);
}
template <typename T>
void int8_vnni(const T* x, const int8_t* w, const float* ws, T* out, int64_t m, int64_t n, int64_t k) {
  int8_portable(x, w, ws, out, m, n, k);
}
template <typename T>
void int4_vnni(const T* x, const uint8_t* packed, const float* scales, const uint8_t* zeros, T* out, int64_t m,
               int64_t n, int64_t k, int64_t group) {
  int4_portable(x, packed, scales, zeros, out, m, n, k, group);
}
template <typename T>
void int4_dequant(const uint8_t* packed, const float* scales, const uint8_t* zeros, T* out, int64_t n, int64_t k,
                  int64_t group) {
  const int64_t row_bytes = 32 * chunks64(k), groups = k / group;
#pragma omp parallel
  {
    float* w = static_cast<float*>(std::malloc(sizeof(float) * k));
#pragma omp for
    for (int64_t r = 0; r < n; ++r) {
      int4_row(packed + r * row_bytes, scales + r * groups, zeros + r * groups, k, group, w);
      for (int64_t j = 0; j < k; ++j) store(out + r * k + j, w[j]);
    }
    std::free(w);
  }
}
#endif

template <typename T>
void int8_matmul(const T* x, const int8_t* w, const float* ws, T* out, int64_t m, int64_t n, int64_t k,
                 int portable) {
  portable ? int8_portable(x, w, ws, out, m, n, k) : int8_vnni(x, w, ws, out, m, n, k);
}

template <typename T>
void int4_matmul(const T* x, const uint8_t* packed, const float* scales, const uint8_t* zeros, T* out, int64_t m,
                 int64_t n, int64_t k, int64_t group, int portable) {
  portable ? int4_portable(x, packed, scales, zeros, out, m, n, k, group)
           : int4_vnni(x, packed, scales, zeros, out, m, n, k, group);
}

}  // namespace

extern "C" {

// x [m, k], out [m, n]. int8: w int8 [n, k], ws float [n]. int4: packed uint8 [n, 32 * ceil(k / 64)], scales
// float [n, k / group], zeros uint8 [n, k / group], group a multiple of 32 dividing k.
int int_has_vnni() { return kHasVnni; }
int int_has_amx() { return has_amx(); }
// The batched kernels: callers ask int_has_amx() first (else they run the VNNI ones).
void int8_matmul_amx_f32(const float* x, const int8_t* w, const float* ws, float* out, int64_t m, int64_t n,
                         int64_t k) {
  int8_amx(x, w, ws, out, m, n, k);
}
void int8_matmul_amx_bf16(const uint16_t* x, const int8_t* w, const float* ws, uint16_t* out, int64_t m, int64_t n,
                          int64_t k) {
  int8_amx(x, w, ws, out, m, n, k);
}
void int4_matmul_amx_bf16(const uint16_t* x, const uint8_t* packed, const float* scales, const uint8_t* zeros,
                          uint16_t* out, int64_t m, int64_t n, int64_t k, int64_t group) {
  int4_amx(x, packed, scales, zeros, out, m, n, k, group);
}
void int8_matmul_f32(const float* x, const int8_t* w, const float* ws, float* out, int64_t m, int64_t n, int64_t k,
                     int portable) {
  int8_matmul(x, w, ws, out, m, n, k, portable);
}
void int8_matmul_bf16(const uint16_t* x, const int8_t* w, const float* ws, uint16_t* out, int64_t m, int64_t n,
                      int64_t k, int portable) {
  int8_matmul(x, w, ws, out, m, n, k, portable);
}
void int4_matmul_f32(const float* x, const uint8_t* packed, const float* scales, const uint8_t* zeros, float* out,
                     int64_t m, int64_t n, int64_t k, int64_t group, int portable) {
  int4_matmul(x, packed, scales, zeros, out, m, n, k, group, portable);
}
void int4_matmul_bf16(const uint16_t* x, const uint8_t* packed, const float* scales, const uint8_t* zeros,
                      uint16_t* out, int64_t m, int64_t n, int64_t k, int64_t group, int portable) {
  int4_matmul(x, packed, scales, zeros, out, m, n, k, group, portable);
}
void int4_dequant_f32(const uint8_t* packed, const float* scales, const uint8_t* zeros, float* out, int64_t n,
                      int64_t k, int64_t group) {
  int4_dequant(packed, scales, zeros, out, n, k, group);
}
void int4_dequant_bf16(const uint8_t* packed, const float* scales, const uint8_t* zeros, uint16_t* out, int64_t n,
                       int64_t k, int64_t group) {
  int4_dequant(packed, scales, zeros, out, n, k, group);
}
}
