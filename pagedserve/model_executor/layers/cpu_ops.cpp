// Fused element-wise layer ops for the CPU, one pass over memory each: RMSNorm, residual add + RMSNorm, and
// rotary embeddings applied in place. In PyTorch each is several ops (square, mean, rsqrt, multiply, cast; or
// two multiplies, a negation, a concatenation and an add), each a full pass over the activations; at prefill
// sizes those passes were about a quarter of a step. Math in float32, one rounding when stored.
// Plain C ABI (called through ctypes), built on first use like the attention kernel (see native/build.py).

#include "simd.h"

namespace {

using native::store;
using native::to_float;
#ifdef __AVX512F__
using native::load16;
using native::store16;
#endif

// out[r] = x[r] / rms(x[r]) * weight; x and out may be the same rows. Rows are `stride` elements apart.
template <typename T>
void rms_norm_row(T* out, const T* x, const T* weight, int64_t dim, float eps) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= dim; i += 16) {
    __m512 v = load16(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < dim; ++i) sum += to_float(x[i]) * to_float(x[i]);
  const float scale = 1.f / std::sqrt(sum / float(dim) + eps);
  i = 0;
#ifdef __AVX512F__
  const __m512 s = _mm512_set1_ps(scale);
  for (; i + 16 <= dim; i += 16) store16(out + i, _mm512_mul_ps(_mm512_mul_ps(load16(x + i), s), load16(weight + i)));
#endif
  for (; i < dim; ++i) store(out + i, to_float(x[i]) * scale * to_float(weight[i]));
}

template <typename T>
void rms_norm(T* out, const T* x, const T* weight, int64_t rows, int64_t dim, int64_t stride, float eps) {
#pragma omp parallel for if (rows > 8)
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(out + r * dim, x + r * stride, weight, dim, eps);
}

// residual[r] += x[r] (rounded to T, as an add in T), then x[r] = rms_norm(residual[r]) * weight.
template <typename T>
void add_rms_norm(T* x, T* residual, const T* weight, int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for if (rows > 8)
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = x + r * dim;
    T* rr = residual + r * dim;
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= dim; i += 16) store16(rr + i, _mm512_add_ps(load16(xr + i), load16(rr + i)));
#endif
    for (; i < dim; ++i) store(rr + i, to_float(xr[i]) + to_float(rr[i]));
    rms_norm_row(xr, rr, weight, dim, eps);
  }
}

// Rotate-half rotary embedding, in place, of `heads` heads of each token (the first `rotary_dim` of each head;
// the rest passes through). x: token t, head h at x + t * token_stride + h * head_dim; cos, sin: float32
// [tokens, rotary_dim] (each half repeated, as RotaryEmbedding makes them).
template <typename T>
void rope(T* x, const float* cos, const float* sin, int64_t tokens, int64_t heads, int64_t token_stride,
          int64_t head_dim, int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2;
#pragma omp parallel for if (tokens > 8)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos + t * rotary_dim;
    const float* s = sin + t * rotary_dim;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + t * token_stride + h * head_dim;
      int64_t i = 0;
#ifdef __AVX512F__
      for (; i + 16 <= half; i += 16) {
        __m512 a = load16(v + i), b = load16(v + half + i);
        store16(v + i, _mm512_fmsub_ps(a, _mm512_loadu_ps(c + i), _mm512_mul_ps(b, _mm512_loadu_ps(s + i))));
        store16(v + half + i,
                _mm512_fmadd_ps(b, _mm512_loadu_ps(c + half + i), _mm512_mul_ps(a, _mm512_loadu_ps(s + half + i))));
      }
#endif
      for (; i < half; ++i) {
        const float a = to_float(v[i]), b = to_float(v[half + i]);
        store(v + i, a * c[i] - b * s[i]);
        store(v + half + i, b * c[half + i] + a * s[half + i]);
      }
    }
  }
}

}  // namespace

extern "C" {

void rms_norm_f32(float* out, const float* x, const float* w, int64_t rows, int64_t dim, int64_t stride, float eps) {
  rms_norm(out, x, w, rows, dim, stride, eps);
}
void rms_norm_bf16(uint16_t* out, const uint16_t* x, const uint16_t* w, int64_t rows, int64_t dim, int64_t stride,
                   float eps) {
  rms_norm(out, x, w, rows, dim, stride, eps);
}
void add_rms_norm_f32(float* x, float* residual, const float* w, int64_t rows, int64_t dim, float eps) {
  add_rms_norm(x, residual, w, rows, dim, eps);
}
void add_rms_norm_bf16(uint16_t* x, uint16_t* residual, const uint16_t* w, int64_t rows, int64_t dim, float eps) {
  add_rms_norm(x, residual, w, rows, dim, eps);
}
void rope_f32(float* x, const float* cos, const float* sin, int64_t tokens, int64_t heads, int64_t token_stride,
              int64_t head_dim, int64_t rotary_dim) {
  rope(x, cos, sin, tokens, heads, token_stride, head_dim, rotary_dim);
}
void rope_bf16(uint16_t* x, const float* cos, const float* sin, int64_t tokens, int64_t heads, int64_t token_stride,
               int64_t head_dim, int64_t rotary_dim) {
  rope(x, cos, sin, tokens, heads, token_stride, head_dim, rotary_dim);
}
}
