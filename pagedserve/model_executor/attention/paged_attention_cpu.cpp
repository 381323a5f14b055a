// Paged decode attention for the CPU: one query token per sequence, K/V read in place through the block table.
//
// The portable PyTorch path gathers every block of the batch into a contiguous copy before its matmuls; at long
// contexts that copy is most of the step. Here each (sequence, KV head) pair is one task: its query heads are
// scored against K block by block, soft-maxed in float32, and V is accumulated, reading each K/V row once.
// Plain C ABI (called through ctypes with raw pointers), so it builds in about a second with no torch headers.
// OpenMP is the same libgomp the torch wheel loads (same soname), so one thread pool serves both.

#include <vector>

#include "simd.h"

namespace {

using native::store;
using native::to_float;
#ifdef __AVX512F__
using native::exp16;
using native::load16;
#endif

// rows of scores -> probabilities, in place, in float32
void softmax_rows(float* scores, int64_t rows, int64_t len) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * len;
    float max_score = -INFINITY;
    for (int64_t i = 0; i < len; ++i) max_score = s[i] > max_score ? s[i] : max_score;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) {
      s[i] = std::exp(s[i] - max_score);
      sum += s[i];
    }
    const float inv_sum = 1.f / sum;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) s[i] *= inv_sum;
  }
}

#ifdef __AVX512F__
// the first min(n, 16) lanes
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// softmax_rows with AVX-512 arithmetic and exp16
void softmax_rows_avx512(float* scores, int64_t rows, int64_t len) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * len;
    __m512 max16 = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = first_lanes(len - i);
      max16 = _mm512_mask_max_ps(max16, m, max16, _mm512_maskz_loadu_ps(m, s + i));
    }
    const __m512 max_score = _mm512_set1_ps(_mm512_reduce_max_ps(max16));
    __m512 sum16 = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = first_lanes(len - i);
      const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), max_score)));
      sum16 = _mm512_add_ps(sum16, e);
      _mm512_mask_storeu_ps(s + i, m, e);
    }
    const __m512 inv_sum = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum16));
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = first_lanes(len - i);
      _mm512_mask_storeu_ps(s + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + i), inv_sum));
    }
  }
}

// lane t of the result = sum of the 16 lanes of v[t]: a transpose-and-add tree, ~50 instructions for 16 sums
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for a = v[2i], b = v[2i+1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane L: the lane-L partial sums of v[4i .. 4i+3]
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // add the four 128-bit lanes of quads[i] into lane i of the result
  const __m512 q01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44), _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  const __m512 q23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44), _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(q01, q23, 0x88), _mm512_shuffle_f32x4(q01, q23, 0xDD));
}

// One (sequence, KV head) task with AVX-512, 16 positions at a time: their K (then V) rows are converted to float
// once into `rows`, then used by every query head of the group. query: [group, HEAD_DIM] float, scaled;
// scores: [group, len] scratch; acc: [group, HEAD_DIM] float output.
template <typename T, int HEAD_DIM>
void attend_avx512(const float* query, const T* keys, const T* values, const int64_t* table, int64_t first,
                   int64_t context_len, int64_t group, int64_t block_size, float soft_cap, float* scores, float* acc) {
  constexpr int kVectors = HEAD_DIM / 16;
  alignas(64) float rows[16 * HEAD_DIM];
  const int64_t len = context_len - first, block_stride = block_size * HEAD_DIM;
  // rows of 16 positions -> float, prefetching the next 16: rows sit in blocks scattered over the cache, and
  // waiting on their loads, not arithmetic, was the limit
  auto load_rows = [&](const T* cache, int64_t pos0, int n) {
    for (int64_t pos = pos0 + 16; pos < pos0 + 32 && pos < context_len; ++pos) {
      const char* src = reinterpret_cast<const char*>(cache + table[pos / block_size] * block_stride + (pos % block_size) * HEAD_DIM);
      for (int line = 0; line < int(HEAD_DIM * sizeof(T)); line += 64) _mm_prefetch(src + line, _MM_HINT_T0);
    }
    for (int t = 0; t < n; ++t) {
      const int64_t pos = pos0 + t;
      const T* src = cache + table[pos / block_size] * block_stride + (pos % block_size) * HEAD_DIM;
      for (int c = 0; c < kVectors; ++c) _mm512_store_ps(rows + t * HEAD_DIM + 16 * c, load16(src + 16 * c));
    }
  };
  for (int64_t pos0 = first; pos0 < context_len; pos0 += 16) {
    const int n = context_len - pos0 < 16 ? int(context_len - pos0) : 16;
    const __mmask16 valid = first_lanes(n);
    load_rows(keys, pos0, n);
    for (int64_t g = 0; g < group; ++g) {
      __m512 q[kVectors], dots[16];
      for (int c = 0; c < kVectors; ++c) q[c] = _mm512_loadu_ps(query + g * HEAD_DIM + 16 * c);
      for (int t = 0; t < 16; ++t) {
        dots[t] = _mm512_setzero_ps();
        if (t < n)
          for (int c = 0; c < kVectors; ++c) dots[t] = _mm512_fmadd_ps(q[c], _mm512_load_ps(rows + t * HEAD_DIM + 16 * c), dots[t]);
      }
      float* out = scores + g * len + (pos0 - first);
      _mm512_mask_storeu_ps(out, valid, sum_lanes16(dots));
      if (soft_cap > 0.f)
        for (int t = 0; t < n; ++t) out[t] = soft_cap * std::tanh(out[t] / soft_cap);
    }
  }
  softmax_rows_avx512(scores, group, len);
  for (int64_t i = 0; i < group * HEAD_DIM; ++i) acc[i] = 0.f;
  for (int64_t pos0 = first; pos0 < context_len; pos0 += 16) {
    const int n = context_len - pos0 < 16 ? int(context_len - pos0) : 16;
    load_rows(values, pos0, n);
    for (int64_t g = 0; g < group; ++g) {
      __m512 a[kVectors];
      for (int c = 0; c < kVectors; ++c) a[c] = _mm512_loadu_ps(acc + g * HEAD_DIM + 16 * c);
      const float* p = scores + g * len + (pos0 - first);
      for (int t = 0; t < n; ++t) {
        const __m512 weight = _mm512_set1_ps(p[t]);
        for (int c = 0; c < kVectors; ++c) a[c] = _mm512_fmadd_ps(weight, _mm512_load_ps(rows + t * HEAD_DIM + 16 * c), a[c]);
      }
      for (int c = 0; c < kVectors; ++c) _mm512_storeu_ps(acc + g * HEAD_DIM + 16 * c, a[c]);
    }
  }
}
#endif

// One (sequence, KV head) task, any head_dim: the portable version of attend_avx512 (see there).
template <typename T>
void attend(const float* query, const T* keys, const T* values, const int64_t* table, int64_t first,
            int64_t context_len, int64_t group, int64_t head_dim, int64_t block_size, float soft_cap, float* scores,
            float* row, float* acc) {
  const int64_t len = context_len - first, block_stride = block_size * head_dim;
  for (int64_t pos = first; pos < context_len; ++pos) {
    const T* key = keys + table[pos / block_size] * block_stride + (pos % block_size) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(key[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = query + g * head_dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * row[d];
      if (soft_cap > 0.f) dot = soft_cap * std::tanh(dot / soft_cap);
      scores[g * len + (pos - first)] = dot;
    }
  }
  softmax_rows(scores, group, len);
  for (int64_t i = 0; i < group * head_dim; ++i) acc[i] = 0.f;
  for (int64_t pos = first; pos < context_len; ++pos) {
    const T* value = values + table[pos / block_size] * block_stride + (pos % block_size) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(value[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * len + (pos - first)];
      float* a = acc + g * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p * row[d];
    }
  }
}

template <typename T>
void decode_attention(T* out, const T* q, int64_t q_stride, const T* kv_cache, const int64_t* block_tables, int64_t block_table_stride,
                      const int64_t* context_lens, const int64_t* window_starts, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t num_blocks, int64_t block_size, float scale,
                      float soft_cap) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t head_stride = num_blocks * block_size * head_dim;  // one (K or V, KV head) slice of the cache
  int64_t max_context = 0;
  for (int64_t s = 0; s < num_seqs; ++s) max_context = context_lens[s] > max_context ? context_lens[s] : max_context;

#pragma omp parallel
  {
    std::vector<float> query(group * head_dim), row(head_dim), acc(group * head_dim), scores(group * max_context);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_seqs * num_kv_heads; ++task) {
      const int64_t seq = task / num_kv_heads, kv_head = task % num_kv_heads;
      const int64_t context_len = context_lens[seq];
      const int64_t first = window_starts && window_starts[seq] > 0 ? window_starts[seq] : 0;
      const int64_t* table = block_tables + seq * block_table_stride;
      const T* keys = kv_cache + kv_head * head_stride;
      const T* values = kv_cache + (num_kv_heads + kv_head) * head_stride;
      const T* q_seq = q + seq * q_stride + kv_head * group * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) query[i] = to_float(q_seq[i]) * scale;
      const float* qf = query.data();
      float* sc = scores.data();
      float* ac = acc.data();
      switch (head_dim) {
#ifdef __AVX512F__
        case 64:
          attend_avx512<T, 64>(qf, keys, values, table, first, context_len, group, block_size, soft_cap, sc, ac);
          break;
        case 128:
          attend_avx512<T, 128>(qf, keys, values, table, first, context_len, group, block_size, soft_cap, sc, ac);
          break;
        case 256:
          attend_avx512<T, 256>(qf, keys, values, table, first, context_len, group, block_size, soft_cap, sc, ac);
          break;
#endif
        default:
          attend(qf, keys, values, table, first, context_len, group, head_dim, block_size, soft_cap, sc, row.data(),
                 ac);
      }
      T* out_seq = out + (seq * num_heads + kv_head * group) * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) store(out_seq + i, acc[i]);
    }
  }
}

}  // namespace

extern "C" {

// Which loop decode_attention runs for this head_dim: 1 the AVX-512 one, 0 the portable one (for tests and logs).
int paged_decode_attention_path(int64_t head_dim) {
#ifdef __AVX512F__
  if (head_dim == 64 || head_dim == 128 || head_dim == 256) return 1;
#endif
  return 0;
}

// out: [num_seqs, num_heads, head_dim]; q: the same, rows q_stride elements apart (a view of the qkv projection
// is read in place); kv_cache: [2, num_kv_heads, num_blocks, block_size, head_dim];
// block_tables: [num_seqs, >= blocks used] with row stride block_table_stride; window_starts: first visible
// position per sequence, or null for all; soft_cap <= 0: none.
void paged_decode_attention_f32(float* out, const float* q, int64_t q_stride, const float* kv_cache, const int64_t* block_tables,
                                int64_t block_table_stride, const int64_t* context_lens, const int64_t* window_starts,
                                int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                int64_t num_blocks, int64_t block_size, float scale, float soft_cap) {
  decode_attention(out, q, q_stride, kv_cache, block_tables, block_table_stride, context_lens, window_starts, num_seqs,
                   num_heads, num_kv_heads, head_dim, num_blocks, block_size, scale, soft_cap);
}

void paged_decode_attention_bf16(uint16_t* out, const uint16_t* q, int64_t q_stride, const uint16_t* kv_cache,
                                 const int64_t* block_tables, int64_t block_table_stride, const int64_t* context_lens,
                                 const int64_t* window_starts, int64_t num_seqs, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, int64_t num_blocks, int64_t block_size,
                                 float scale, float soft_cap) {
  decode_attention(out, q, q_stride, kv_cache, block_tables, block_table_stride, context_lens, window_starts, num_seqs,
                   num_heads, num_kv_heads, head_dim, num_blocks, block_size, scale, soft_cap);
}
}
