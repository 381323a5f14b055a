// Paged prefill attention for the CPU with AMX tiles: the prompt chunks of a step, each query attending causally
// to its sequence's keys, read in place through the block table (the chunk's own K/V are in the cache already),
// optionally within a sliding window (a query at p sees keys p - W < k <= p) and with soft-capped scores
// (s -> cap * tanh(s / cap), Gemma 2).
//
// PyTorch's CPU flash attention runs its matmuls at about 0.5 TFLOP/s here, where oneDNN's AMX matmuls reach
// over 2: attention was 40% of a 1,024-token prefill and 60% of a turn after 3,000 cached tokens. This is
// FlashAttention-2 on AMX's bf16 tile multiply, arranged so that nothing is transposed per key block:
// - scores are computed transposed, S^T = K Q^T: the A operand is a block's K rows as they lie in the cache, the
//   B operand the tile's queries in AMX's VNNI layout, built once per query tile;
// - the online softmax runs down the key rows of S^T, 16 queries per vector: no horizontal reductions;
// - the output is accumulated transposed too, O^T += V^T P^T: P^T's VNNI layout is two key rows of S^T
//   interleaved, and V^T is transposed once per step into a scratch buffer shared by all query tiles.
// A task is (chunk, KV head, 16 query columns), a column being one (query position, query head of the group).
// Keys go 32 at a time (two 16-key tiles of S^T), so every tile shape is 16 rows x 64 bytes. With a window, a task
// starts at the first 32 keys its earliest query sees, and V^T at the chunk's earliest visible key: O(window) work.
// head_dims 0-63 of O^T stay in tile registers (tmm4-7); with head_dim 128, dims 64-127 stay in memory and each
// 16-dim tile goes through tmm0 (free once the step's scores are stored). Other sizes take the PyTorch path.

#include <algorithm>
#include <vector>

#include "simd.h"
#include "amx.h"

#if defined(__AMX_BF16__) && defined(__AVX512BF16__)

namespace {

// exp for probabilities that are rounded to bf16 (8 significant bits) right after: exp16's range reduction
// with a degree-4 polynomial (relative error ~5e-5, against ~1e-7), two FMAs fewer per 16 scores.
inline __m512 exp16_bf16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.69314718056f), x);
  __m512 p = _mm512_set1_ps(1.f / 24);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, k);
}

constexpr int64_t TILE = 16;  // keys per S^T tile, query columns per task, head dims per O^T tile
constexpr int64_t STEP = 32;  // keys per softmax step
constexpr float RESCALE_MARGIN = 8.f;


struct Chunk {
  int64_t query_start, query_len, context_len;
  int64_t first_key;  // the earliest key any of its queries sees, rounded down to TILE (0 without a window)
  const int64_t* table;
};

// V^T of one (chunk, KV head), keys first_key onwards: [HEAD_DIM][padded] bf16, the padding past the context zero.
template <int64_t HEAD_DIM>
void transpose_values(uint16_t* vt, int64_t padded, const uint16_t* values, const Chunk& c, int64_t block_size) {
  for (int64_t j = 0; j < padded; ++j) {
    const int64_t key = c.first_key + j;
    if (key >= c.context_len) {
      for (int64_t d = 0; d < HEAD_DIM; ++d) vt[d * padded + j] = 0;
      continue;
    }
    const uint16_t* row = values + (c.table[key / block_size] * block_size + key % block_size) * HEAD_DIM;
    for (int64_t d = 0; d < HEAD_DIM; ++d) vt[d * padded + j] = row[d];
  }
}

template <int64_t HEAD_DIM>
void attend_tile(uint16_t* out, int64_t out_stride, const uint16_t* q, int64_t q_stride, const uint16_t* keys,
                 const uint16_t* vt, int64_t padded, const Chunk& c, int64_t block_size, int64_t num_heads,
                 int64_t group, int64_t kv_head, int64_t first_column, float scale, int64_t window, float soft_cap) {
  constexpr int64_t D_TILES = HEAD_DIM / 32;  // S^T's multiplies: 32 head dims each
  alignas(64) uint32_t q_vnni[D_TILES][TILE][TILE];  // B operand of S^T: [32 head dims][d pair][column]
  alignas(64) float scores[STEP][TILE];
  alignas(64) uint32_t p_vnni[TILE][TILE];  // B operand of O^T: [key pair][column]
  alignas(64) float acc[HEAD_DIM][TILE];    // O^T: dims 0-63 when taken out of the tiles, the rest always
  int32_t position[TILE], lowest[TILE];  // a column sees keys lowest[i] .. position[i]
  int64_t row_of[TILE], head_of[TILE];
  int64_t last_position = -1;
  const int64_t first_position = c.context_len - c.query_len;
  for (int64_t i = 0; i < TILE; ++i) {
    const int64_t column = first_column + i, qi = column / group;
    const bool valid = qi < c.query_len;
    row_of[i] = c.query_start + qi;
    head_of[i] = kv_head * group + column % group;
    position[i] = valid ? int32_t(first_position + qi) : -1;  // -1: sees nothing
    lowest[i] = window > 0 ? int32_t(first_position + qi - window + 1) : 0;
    last_position = valid ? first_position + qi : last_position;
    const uint32_t* query = reinterpret_cast<const uint32_t*>(q + row_of[i] * q_stride + head_of[i] * HEAD_DIM);
    for (int64_t pair = 0; pair < HEAD_DIM / 2; ++pair) q_vnni[pair / TILE][pair % TILE][i] = valid ? query[pair] : 0;
  }
  const __m512i positions = _mm512_loadu_si512(position), lowests = _mm512_loadu_si512(lowest);
  __m512 running_max = _mm512_set1_ps(-INFINITY), running_sum = _mm512_setzero_ps();
  _tile_zero(4);  // O^T, 16 head dims each
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t d = 64; d < HEAD_DIM; ++d) _mm512_store_ps(acc[d], _mm512_setzero_ps());
  const int64_t num_keys = last_position + 1;
  // column 0 has the earliest position: keys before its window are seen by no column, their steps are skipped
  const int64_t start = c.first_key + std::max<int64_t>(0, lowest[0] - c.first_key) / STEP * STEP;
  const __m512 scale16 = _mm512_set1_ps(scale);
  const bool capped = soft_cap > 0.f;
  const __m512 cap16 = _mm512_set1_ps(soft_cap), scale_over_cap = _mm512_set1_ps(capped ? scale / soft_cap : 0.f);
  const __m512 margin = _mm512_set1_ps(RESCALE_MARGIN);
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);

  for (int64_t key0 = start; key0 < num_keys; key0 += STEP) {
    // S^T of keys key0 .. key0 + 15 (tmm0) and key0 + 16 .. key0 + 31 (tmm3), interleaved so that the two
    // accumulators' multiplies overlap and each half of Q^T is loaded once
    const bool second = key0 + TILE < num_keys;
    const uint16_t* k0 = keys + (c.table[key0 / block_size] * block_size + key0 % block_size) * HEAD_DIM;
    const int64_t key1 = key0 + TILE;
    const uint16_t* k1 = second ? keys + (c.table[key1 / block_size] * block_size + key1 % block_size) * HEAD_DIM
                                : k0;
    _tile_zero(0);
    _tile_zero(3);
    for (int64_t t = 0; t < D_TILES; ++t) {
      _tile_loadd(2, q_vnni[t], TILE * 4);
      _tile_loadd(1, k0 + 32 * t, HEAD_DIM * 2);
      _tile_dpbf16ps(0, 1, 2);
      _tile_loadd(1, k1 + 32 * t, HEAD_DIM * 2);
      _tile_dpbf16ps(3, 1, 2);
    }
    _tile_stored(0, scores[0], TILE * 4);
    _tile_stored(3, scores[TILE], TILE * 4);  // keys past num_keys are masked below
    // online softmax down the key rows: key k is visible to column i iff lowest[i] <= k <= position[i]; the cap
    // goes first (tanh(-inf) is finite)
    __m512 step_max = _mm512_set1_ps(-INFINITY);
    for (int64_t r = 0; r < STEP; ++r) {
      const __m512i key = _mm512_set1_epi32(int32_t(key0 + r));
      const __mmask16 visible = _mm512_mask_cmpge_epi32_mask(_mm512_cmple_epi32_mask(key, positions), key, lowests);
      const __m512 s =
          capped ? _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), visible, cap16,
                                      native::tanh16(_mm512_mul_ps(_mm512_load_ps(scores[r]), scale_over_cap)))
                 : _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), visible, _mm512_load_ps(scores[r]), scale16);
      _mm512_store_ps(scores[r], s);
      step_max = _mm512_max_ps(step_max, s);
    }
    // Lazy rescaling: the reference max moves only when a score passes it by more than RESCALE_MARGIN, so P
    // may reach e^8 (exact enough in bf16's float32 range) and O^T is rescaled a few times, not every step.
    const __mmask16 grown = _mm512_cmp_ps_mask(step_max, _mm512_add_ps(running_max, margin), _CMP_GT_OQ);
    const __m512 new_max = _mm512_mask_max_ps(running_max, grown, running_max, step_max);
    // a column that has seen no key yet keeps -inf: exp against 0 then gives exact zeros, not NaN
    const __mmask16 seen = _mm512_cmp_ps_mask(new_max, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m512 base = _mm512_maskz_mov_ps(seen, new_max);
    const __m512 alpha = exp16_bf16(_mm512_sub_ps(running_max, base));
    __m512 step_sum = _mm512_setzero_ps();
    for (int64_t r = 0; r < STEP; ++r) {
      const __m512 p = _mm512_maskz_mov_ps(
          _mm512_cmp_ps_mask(_mm512_load_ps(scores[r]), _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
          exp16_bf16(_mm512_sub_ps(_mm512_load_ps(scores[r]), base)));
      _mm512_store_ps(scores[r], p);
      step_sum = _mm512_add_ps(step_sum, p);
    }
    running_sum = _mm512_fmadd_ps(running_sum, alpha, step_sum);
    if (grown && key0 > start) {  // rescale O^T by alpha
      _tile_stored(4, acc[0], TILE * 4);
      _tile_stored(5, acc[16], TILE * 4);
      _tile_stored(6, acc[32], TILE * 4);
      _tile_stored(7, acc[48], TILE * 4);
      for (int64_t d = 0; d < HEAD_DIM; ++d) _mm512_store_ps(acc[d], _mm512_mul_ps(_mm512_load_ps(acc[d]), alpha));
      _tile_loadd(4, acc[0], TILE * 4);
      _tile_loadd(5, acc[16], TILE * 4);
      _tile_loadd(6, acc[32], TILE * 4);
      _tile_loadd(7, acc[48], TILE * 4);
    }
    running_max = new_max;
    for (int64_t pair = 0; pair < TILE; ++pair) {  // P^T in VNNI: keys 2 pair and 2 pair + 1 interleaved
      const __m512i packed = reinterpret_cast<__m512i>(
          _mm512_cvtne2ps_pbh(_mm512_load_ps(scores[2 * pair + 1]), _mm512_load_ps(scores[2 * pair])));
      _mm512_store_si512(p_vnni[pair], _mm512_permutexvar_epi16(interleave, packed));
    }
    _tile_loadd(2, p_vnni, TILE * 4);
    for (int64_t t = 0; t < HEAD_DIM / TILE; ++t) {  // O^T[16 t .. 16 t + 15] += V^T[those dims, the 32 keys] P^T
      _tile_loadd(1, vt + (t * TILE) * padded + (key0 - c.first_key), padded * 2);
      switch (t) {  // tile register numbers must be constants
        case 0: _tile_dpbf16ps(4, 1, 2); break;
        case 1: _tile_dpbf16ps(5, 1, 2); break;
        case 2: _tile_dpbf16ps(6, 1, 2); break;
        case 3: _tile_dpbf16ps(7, 1, 2); break;
        default:
          _tile_loadd(0, acc[t * TILE], TILE * 4);
          _tile_dpbf16ps(0, 1, 2);
          _tile_stored(0, acc[t * TILE], TILE * 4);
      }
    }
  }
  _tile_stored(4, acc[0], TILE * 4);
  _tile_stored(5, acc[16], TILE * 4);
  _tile_stored(6, acc[32], TILE * 4);
  _tile_stored(7, acc[48], TILE * 4);
  alignas(64) float inverse_sum[TILE];
  _mm512_store_ps(inverse_sum, _mm512_div_ps(_mm512_set1_ps(1.f), running_sum));
  for (int64_t i = 0; i < TILE; ++i) {
    if (position[i] < 0) continue;
    uint16_t* o = out + row_of[i] * out_stride + head_of[i] * HEAD_DIM;
    for (int64_t d = 0; d < HEAD_DIM; ++d) native::store(o + d, acc[d][i] * inverse_sum[i]);
  }
}

// out, q: [tokens, num_heads * HEAD_DIM] bf16 rows (strides out_stride, q_stride elements); kv_cache: [2,
// num_kv_heads, num_blocks, block_size, HEAD_DIM]; chunk i: query rows query_starts[i] .. + query_lens[i], the last
// of its context_lens[i] positions, block table row i of block_tables (row stride block_table_stride).
template <int64_t HEAD_DIM>
void prefill_attention(uint16_t* out, int64_t out_stride, const uint16_t* q, int64_t q_stride,
                       const uint16_t* kv_cache, int64_t num_blocks, int64_t block_size, int64_t num_chunks,
                       const int64_t* query_starts, const int64_t* query_lens, const int64_t* context_lens,
                       const int64_t* block_tables, int64_t block_table_stride, int64_t num_heads,
                       int64_t num_kv_heads, float scale, int64_t window, float soft_cap) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t head_stride = num_blocks * block_size * HEAD_DIM;
  std::vector<Chunk> chunks(num_chunks);
  std::vector<int64_t> vt_offset(num_chunks + 1, 0), padded(num_chunks), task_offset(num_chunks + 1, 0);
  for (int64_t i = 0; i < num_chunks; ++i) {
    const int64_t first_position = context_lens[i] - query_lens[i];
    const int64_t first_key = window > 0 ? std::max<int64_t>(0, first_position - window + 1) / TILE * TILE : 0;
    chunks[i] = {query_starts[i], query_lens[i], context_lens[i], first_key, block_tables + i * block_table_stride};
    padded[i] = (context_lens[i] - first_key + STEP - 1) / STEP * STEP;
    vt_offset[i + 1] = vt_offset[i] + num_kv_heads * HEAD_DIM * padded[i];
    task_offset[i + 1] = task_offset[i] + num_kv_heads * ((query_lens[i] * group + TILE - 1) / TILE);
  }
  static std::vector<uint16_t> vt;  // V^T of every (chunk, KV head); one engine thread calls this at a time
  vt.resize(vt_offset[num_chunks]);

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t job = 0; job < num_chunks * num_kv_heads; ++job) {
    const int64_t i = job / num_kv_heads, h = job % num_kv_heads;
    transpose_values<HEAD_DIM>(vt.data() + vt_offset[i] + h * HEAD_DIM * padded[i], padded[i],
                               kv_cache + (num_kv_heads + h) * head_stride, chunks[i], block_size);
  }

  const int64_t num_tasks = task_offset[num_chunks];
#pragma omp parallel
  {
    configure_tiles();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; ++task) {
      // later tiles see more keys: take them first, so the long tasks do not end the step alone
      const int64_t t = num_tasks - 1 - task;
      const int64_t i = std::upper_bound(task_offset.begin(), task_offset.end(), t) - task_offset.begin() - 1;
      const int64_t tiles = (task_offset[i + 1] - task_offset[i]) / num_kv_heads;
      const int64_t h = (t - task_offset[i]) / tiles, tile = (t - task_offset[i]) % tiles;
      attend_tile<HEAD_DIM>(out, out_stride, q, q_stride, kv_cache + h * head_stride,
                            vt.data() + vt_offset[i] + h * HEAD_DIM * padded[i], padded[i], chunks[i], block_size,
                            num_heads, group, h, tile * TILE, scale, window, soft_cap);
    }
    _tile_release();
  }
}

}  // namespace

extern "C" {

int paged_prefill_attention_supported(int64_t head_dim, int64_t block_size) {
  return (head_dim == 64 || head_dim == 128) && block_size % TILE == 0 && amx_permitted();
}

// The prefill chunks of a step (see prefill_attention), head_dim 64 or 128. window <= 0: none; soft_cap <= 0: none.
void paged_prefill_attention_bf16(uint16_t* out, int64_t out_stride, const uint16_t* q, int64_t q_stride,
                                  const uint16_t* kv_cache, int64_t num_blocks, int64_t block_size,
                                  int64_t head_dim, int64_t num_chunks, const int64_t* query_starts,
                                  const int64_t* query_lens, const int64_t* context_lens,
                                  const int64_t* block_tables, int64_t block_table_stride, int64_t num_heads,
                                  int64_t num_kv_heads, float scale, int64_t window, float soft_cap) {
  if (!amx_permitted()) return;  // callers ask paged_prefill_attention_supported first
  auto run = head_dim == 64 ? prefill_attention<64> : prefill_attention<128>;
  run(out, out_stride, q, q_stride, kv_cache, num_blocks, block_size, num_chunks, query_starts, query_lens,
      context_lens, block_tables, block_table_stride, num_heads, num_kv_heads, scale, window, soft_cap);
}
}

#else  // no AMX here: the PyTorch path

extern "C" {
int paged_prefill_attention_supported(int64_t, int64_t) { return 0; }
void paged_prefill_attention_bf16(uint16_t*, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t,
                                  int64_t, int64_t, const int64_t*, const int64_t*, const int64_t*, const int64_t*,
                                  int64_t, int64_t, int64_t, float, int64_t, float) {}
}
#endif
