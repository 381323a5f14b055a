// AMX pieces shared by the native kernels that use tiles (the prefill attention kernel, the GGUF and integer
// batched matmuls): the tile configuration, the one-time permission Linux requires, a 16 x 16 transpose of 32-bit
// lanes, and for the GGUF matmuls bf16 x packed as B tiles (pack_x) and C tiles stored back as bf16 rows
// (store_tiles). Header-only; each kernel is one translation unit. Include after <immintrin.h>.
#pragma once

#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <mutex>

struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline bool amx_permitted() {  // Linux gives a process the AMX tile state only when it asks once
  static bool permitted = false;
  static std::once_flag once;
  std::call_once(once, [] { permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0; });
  return permitted;
}

inline void configure_tiles() {  // every tile register: 16 rows of 64 bytes
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}
#endif

#if defined(__AVX512F__)
// r[i] (16 x 32-bit lanes) becomes column i of the 16 x 16 matrix the rows r[0..15] held.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}
#endif

#if defined(__AMX_TILE__) && defined(__AVX512BF16__)
// x (bf16 [m, k], k a multiple of 32) as AMX B tiles, [16-row tile][32 k][16 pairs of k][16 rows], 32 bits each
// (the VNNI pair layout): each tile of x transposed once per call; rows past m are zero. A worksharing loop: call
// it inside a parallel region (it ends in the loop's barrier).
inline void pack_x(const uint16_t* x, int64_t m, int64_t k, uint32_t* xv) {
  const int64_t nb = k / 32, m_tiles = (m + 15) / 16;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < m_tiles; ++t) {
    for (int64_t s = 0; s < nb; ++s) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t row = t * 16 + i;
        r[i] = row < m ? _mm512_loadu_si512(x + row * k + s * 32) : _mm512_setzero_si512();
      }
      transpose16(r);
      uint32_t* tile = xv + (t * nb + s) * 16 * 16;
      for (int64_t p = 0; p < 16; ++p) _mm512_store_si512(tile + p * 16, r[p]);
    }
  }
}

// A C tile (float [16 weight rows][16 rows of x]) transposed to rows of x in bf16: rounded first, two weight rows
// per 32-bit lane, so that the transpose moves 8 x 16 lanes, not 16 x 16.
inline void transpose_tile(const float* c, __m256i rows[16]) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512i q[8];  // lane i of q[j]: weight rows 2j, 2j + 1 of x row i
  for (int j = 0; j < 8; ++j) {
    const __m512 even = _mm512_load_ps(c + 2 * j * 16), odd = _mm512_load_ps(c + (2 * j + 1) * 16);
    q[j] = _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even)));
  }
  __m512i a[8], e[2][4];  // e[g][i]: 128-bit lane l holds q[4g..4g+3] of x row 4l + i
  for (int j = 0; j < 4; ++j) {
    a[2 * j] = _mm512_unpacklo_epi32(q[2 * j], q[2 * j + 1]);
    a[2 * j + 1] = _mm512_unpackhi_epi32(q[2 * j], q[2 * j + 1]);
  }
  for (int g = 0; g < 2; ++g) {
    e[g][0] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    e[g][1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    e[g][2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    e[g][3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);  // x rows i, 4 + i
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);  // x rows 8 + i, 12 + i
  for (int i = 0; i < 4; ++i) {
    const __m512i low = _mm512_permutex2var_epi64(e[0][i], first, e[1][i]);
    const __m512i high = _mm512_permutex2var_epi64(e[0][i], second, e[1][i]);
    rows[i] = _mm512_castsi512_si256(low);
    rows[4 + i] = _mm512_extracti64x4_epi64(low, 1);
    rows[8 + i] = _mm512_castsi512_si256(high);
    rows[12 + i] = _mm512_extracti64x4_epi64(high, 1);
  }
}

// The two C tiles of a strip and an x tile (c: [weight tile][16][16]) into out, whole 64-byte rows: only the
// rows < m, columns < n that exist.
inline void store_tiles(const float* c, uint16_t* out, int64_t ldo, int64_t rows, int64_t cols) {
  __m256i left[16], right[16];
  transpose_tile(c, left);
  transpose_tile(c + 16 * 16, right);
  const __mmask32 valid = cols >= 2 * 16 ? ~__mmask32(0) : __mmask32((1u << cols) - 1);
  for (int64_t i = 0; i < rows; ++i) {
    _mm512_mask_storeu_epi16(out + i * ldo, valid, _mm512_inserti64x4(_mm512_castsi256_si512(left[i]), right[i], 1));
  }
}

#endif
