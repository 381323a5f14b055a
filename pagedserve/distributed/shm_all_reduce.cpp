// All-reduce (sum) and gather between the tensor-parallel ranks of one machine through a shared memory segment:
// each rank copies its tensor into its own slot, publishes a sequence number, and waits for every rank's; then
// each sums all slots in rank order (in float32), so every rank gets bit-identical results, or, for a gather,
// rank 0 lays the slots side by side. Two slots per rank alternate between calls: a rank can only write slot s % 2
// again at call s + 2, after every rank has published s + 1, i.e. finished reading call s. See shm_all_reduce.py
// for the segment's layout.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>

#include "simd.h"

namespace {

constexpr int64_t kHeader = 4096;  // one 64-byte line per rank's sequence number, up to 64 ranks

std::atomic<int64_t>* counter(char* base, int64_t rank) {
  return reinterpret_cast<std::atomic<int64_t>*>(base + 64 * rank);
}

char* slot(char* base, int64_t rank, int64_t seq, int64_t slot_bytes) {
  return base + kHeader + (2 * rank + (seq & 1)) * slot_bytes;
}

// Wait until every rank has published `seq`; false after `timeout_s` (a rank died or stopped calling).
bool wait_all(char* base, int64_t world, int64_t seq, double timeout_s) {
  auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < world; ++r) {
    int64_t spins = 0;
    while (counter(base, r)->load(std::memory_order_acquire) < seq) {
      if (++spins < 4096) {
#ifdef __x86_64__
        __builtin_ia32_pause();
#endif
        continue;
      }
      std::this_thread::yield();  // the other rank may share this core: give it the core
      if ((spins & 1023) == 0 &&
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s) {
        return false;
      }
    }
  }
  return true;
}

template <typename T>
int64_t all_reduce(char* base, int64_t rank, int64_t world, int64_t slot_bytes, T* x, int64_t n, int64_t seq,
                   double timeout_s) {
  std::memcpy(slot(base, rank, seq, slot_bytes), x, n * sizeof(T));
  counter(base, rank)->store(seq, std::memory_order_release);
  if (!wait_all(base, world, seq, timeout_s)) return -1;
  const T* slots[64];
  for (int64_t r = 0; r < world; ++r) slots[r] = reinterpret_cast<const T*>(slot(base, r, seq, slot_bytes));
#pragma omp parallel for if (n > (1 << 16))
  for (int64_t start = 0; start < n; start += 4096) {
    const int64_t end = start + 4096 < n ? start + 4096 : n;
    int64_t i = start;
#ifdef __AVX512F__
    for (; i + 16 <= end; i += 16) {
      __m512 sum = native::load16(slots[0] + i);
      for (int64_t r = 1; r < world; ++r) sum = _mm512_add_ps(sum, native::load16(slots[r] + i));
      native::store16(x + i, sum);
    }
#endif
    for (; i < end; ++i) {
      float sum = native::to_float(slots[0][i]);
      for (int64_t r = 1; r < world; ++r) sum += native::to_float(slots[r][i]);
      native::store(x + i, sum);
    }
  }
  return 0;
}

}  // namespace

extern "C" {
// rows x row_bytes of every rank -> out (rank 0; nullptr elsewhere): row i is rank 0's row i, then rank 1's, ...
int64_t shm_gather(char* base, int64_t rank, int64_t world, int64_t slot_bytes, const char* x, int64_t rows,
                   int64_t row_bytes, char* out, int64_t seq, double timeout_s) {
  std::memcpy(slot(base, rank, seq, slot_bytes), x, rows * row_bytes);
  counter(base, rank)->store(seq, std::memory_order_release);
  if (!wait_all(base, world, seq, timeout_s)) return -1;
  if (out == nullptr) return 0;
  for (int64_t r = 0; r < world; ++r) {
    const char* from = slot(base, r, seq, slot_bytes);
    for (int64_t i = 0; i < rows; ++i) std::memcpy(out + (i * world + r) * row_bytes, from + i * row_bytes, row_bytes);
  }
  return 0;
}

int64_t shm_all_reduce_f32(char* base, int64_t rank, int64_t world, int64_t slot_bytes, float* x, int64_t n,
                           int64_t seq, double timeout_s) {
  return all_reduce(base, rank, world, slot_bytes, x, n, seq, timeout_s);
}
int64_t shm_all_reduce_bf16(char* base, int64_t rank, int64_t world, int64_t slot_bytes, uint16_t* x, int64_t n,
                            int64_t seq, double timeout_s) {
  return all_reduce(base, rank, world, slot_bytes, x, n, seq, timeout_s);
}
}
