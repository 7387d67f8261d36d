// The decode step's kernels besides the matrix products, for the CPU: attention straight over the paged
// KV pool, RMSNorm (alone or after the residual add), rotary embedding in place (alone or with the KV
// cache write), SwiGLU's silu(gate) * up, and the greedy choice with its log-probability. Each replaces a
// chain of small torch operations whose dispatch and memory traffic cost more than their arithmetic at
// decode sizes (docs/benchmarks.md).
//
// Built with quant_cpu.cpp by shard/paged/kernels.py and called as torch.ops.paged_step.*. Tensors are
// float32 or bfloat16; the arithmetic is float32 either way, rounded once on output.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "products.h"
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using namespace paged_simd;

// 16 elements of a float32 or bfloat16 row as floats.
inline V load16(const float* p) { return load(p); }
inline V load16(const c10::BFloat16* p) { return from_bf16(reinterpret_cast<const uint16_t*>(p)); }

inline void store_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row(c10::BFloat16* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

template <class T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// Asks for the head's rows of the block at `next` (`count` slots, `stride` elements apart) ahead of use: the
// blocks of a sequence lie anywhere in the pool, where the hardware's prefetcher cannot follow.
template <class T>
inline void prefetch_block(const T* next, int64_t count, int64_t stride, int64_t d) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(T)); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(next + j * stride) + b, _MM_HINT_T0);
}

// prefetch_block for the block holding position t (nothing past the end).
template <class T>
inline void prefetch_ahead(const T* head, const int64_t* blocks, int64_t t, int64_t len, int64_t bs, int64_t stride,
                           int64_t d) {
  if (t < len) prefetch_block(head + blocks[t / bs] * bs * stride, std::min(bs, len - t), stride, d);
}

// R query rows (R <= 4) that share one KV head, head size DV * 16, attend to a sequence's `len` cached
// positions, read through its block table (a block's positions lie in consecutive slots, `stride`
// elements apart). The rows' queries and accumulators stay in registers: a pass over the keys for the
// scores, a softmax, a pass over the values.
template <class T, int DV, int R>
void attend_rows(const float* query, const T* k_head, const T* v_head, int64_t stride, const int64_t* blocks,
                 int64_t len, int64_t bs, float* scores, T* out) {
  constexpr int64_t D = DV * 16;
  V qv[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) qv[r][c] = load(query + r * D + c * 16);
  for (int64_t t0 = 0; t0 < len; t0 += bs) {
    const int64_t t1 = std::min(len, t0 + bs);
    const T* kp = k_head + blocks[t0 / bs] * bs * stride;
    prefetch_ahead(k_head, blocks, t0 + bs, len, bs, stride, D);
    if (t0 + bs >= len) prefetch_ahead(v_head, blocks, 0, len, bs, stride, D);  // the values come next
    for (int64_t t = t0; t < t1; ++t, kp += stride) {
      V kv[DV];
      for (int c = 0; c < DV; ++c) kv[c] = load16(kp + c * 16);
      for (int r = 0; r < R; ++r) {
        V s = mul(qv[r][0], kv[0]);
        for (int c = 1; c < DV; ++c) s = fma(qv[r][c], kv[c], s);
        scores[r * len + t] = hsum(s);
      }
    }
  }
  float inv_sum[R];
  for (int r = 0; r < R; ++r) {
    float* sc = scores + r * len;
    float m = -INFINITY;
    for (int64_t t = 0; t < len; ++t) m = sc[t] > m ? sc[t] : m;
    const V mv = set1(m);
    V sum = zero();
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) {
      const V e = exp_nonpositive(sub(load(sc + t), mv));
      store(sc + t, e);
      sum = add(sum, e);
    }
    float total = hsum(sum);
    for (; t < len; ++t) {
      sc[t] = std::exp(sc[t] - m);
      total += sc[t];
    }
    inv_sum[r] = 1.f / total;
  }
  V acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) acc[r][c] = zero();
  for (int64_t t0 = 0; t0 < len; t0 += bs) {
    const int64_t t1 = std::min(len, t0 + bs);
    const T* vp = v_head + blocks[t0 / bs] * bs * stride;
    prefetch_ahead(v_head, blocks, t0 + bs, len, bs, stride, D);
    for (int64_t t = t0; t < t1; ++t, vp += stride) {
      V vv[DV];
      for (int c = 0; c < DV; ++c) vv[c] = load16(vp + c * 16);
      for (int r = 0; r < R; ++r) {
        const V p = set1(scores[r * len + t]);
        for (int c = 0; c < DV; ++c) acc[r][c] = fma(p, vv[c], acc[r][c]);
      }
    }
  }
  float row[D];
  for (int r = 0; r < R; ++r) {
    const V inv = set1(inv_sum[r]);
    for (int c = 0; c < DV; ++c) store(row + c * 16, mul(acc[r][c], inv));
    store_row(out + r * D, row, D);
  }
}

template <class T, int DV>
void attend_group(const float* query, const T* k_head, const T* v_head, int64_t stride, const int64_t* blocks,
                  int64_t len, int64_t bs, int64_t group, float* scores, T* out) {
  constexpr int64_t D = DV * 16;
  for (int64_t r = 0; r < group; r += 4) {
    const float* qr = query + r * D;
    T* o = out + r * D;
    switch (std::min<int64_t>(4, group - r)) {
      case 4: attend_rows<T, DV, 4>(qr, k_head, v_head, stride, blocks, len, bs, scores, o); break;
      case 3: attend_rows<T, DV, 3>(qr, k_head, v_head, stride, blocks, len, bs, scores, o); break;
      case 2: attend_rows<T, DV, 2>(qr, k_head, v_head, stride, blocks, len, bs, scores, o); break;
      default: attend_rows<T, DV, 1>(qr, k_head, v_head, stride, blocks, len, bs, scores, o); break;
    }
  }
}

// One sequence, KV heads [h0, h1), each with the `group` query heads that share it.
template <class T>
void attend(const T* q, const T* k_pool, const T* v_pool, const int64_t* blocks, int64_t len, int64_t bs,
            int64_t kv_heads, int64_t h0, int64_t h1, int64_t group, int64_t d, float scale, T* out,
            std::vector<float>& scratch) {
  scratch.resize(4 * len + group * d);
  float* scores = scratch.data();        // [4][len]
  float* query = scores + 4 * len;       // [group][d], scaled
  const int64_t stride = kv_heads * d;   // elements per slot
  for (int64_t h = h0; h < h1; ++h) {
    const T* qh = q + h * group * d;
    for (int64_t i = 0; i < group * d; ++i) query[i] = to_float(qh[i]) * scale;
    const T* kh = k_pool + h * d;
    const T* vh = v_pool + h * d;
    T* oh = out + h * group * d;
    switch (d / 16) {
      case 1: attend_group<T, 1>(query, kh, vh, stride, blocks, len, bs, group, scores, oh); break;
      case 2: attend_group<T, 2>(query, kh, vh, stride, blocks, len, bs, group, scores, oh); break;
      case 3: attend_group<T, 3>(query, kh, vh, stride, blocks, len, bs, group, scores, oh); break;
      case 4: attend_group<T, 4>(query, kh, vh, stride, blocks, len, bs, group, scores, oh); break;
      case 5: attend_group<T, 5>(query, kh, vh, stride, blocks, len, bs, group, scores, oh); break;
      case 6: attend_group<T, 6>(query, kh, vh, stride, blocks, len, bs, group, scores, oh); break;
      case 7: attend_group<T, 7>(query, kh, vh, stride, blocks, len, bs, group, scores, oh); break;
      default: attend_group<T, 8>(query, kh, vh, stride, blocks, len, bs, group, scores, oh); break;
    }
  }
}

template <class T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& table, const at::Tensor& lengths, int64_t bs, at::Tensor& out) {
  const int64_t b = table.size(0), width = table.size(1);
  const int64_t kv_heads = k_pool.size(1), d = k_pool.size(2);
  const int64_t heads = q.size(1) / d, group = heads / kv_heads;
  const int64_t q_stride = q.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  // A sequence per work item, all its KV heads at once, so that each cache line of the pool is read
  // once; with fewer sequences than threads, a KV head per item instead.
  const int64_t split = b < at::get_num_threads() ? kv_heads : 1, per = kv_heads / split;
  at::parallel_for(0, b * split, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = i / split, h0 = (i % split) * per;
      attend<T>(qp + s * q_stride, kp, vp, tp + s * width, lp[s], bs, kv_heads, h0, h0 + per, group, d, scale,
                op + s * heads * d, scratch);
    }
  });
}

// q [b, heads * d] (rows may be strided: a slice of the fused q/k/v product), pools [slots, kv_heads, d],
// table [b, width] block numbers, lengths [b] (each sequence's context, its newest token already written)
// -> [b, heads * d]. Query head j reads KV head j / (heads / kv_heads).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                            const at::Tensor& table, const at::Tensor& lengths, int64_t block_size) {
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  v_pool.sizes() == k_pool.sizes(), "pools: contiguous [slots, kv_heads, d]");
  const int64_t kv_heads = k_pool.size(1), d = k_pool.size(2);
  TORCH_CHECK(d % 16 == 0 && d <= 128, "head size must be a multiple of 16, at most 128");
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1 && q.size(1) % (kv_heads * d) == 0,
              "q: [b, heads * d] with unit column stride");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && v_pool.scalar_type() == k_pool.scalar_type(),
              "q and the pools must share a dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.is_contiguous() &&
                  table.size(0) == q.size(0), "table: int64 [b, width]");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == q.size(0) && lengths.is_contiguous(),
              "lengths: int64 [b]");
  const int64_t* lp = lengths.data_ptr<int64_t>();
  for (int64_t s = 0; s < q.size(0); ++s)
    TORCH_CHECK(lp[s] >= 1 && lp[s] <= table.size(1) * block_size, "length outside the block table");
  at::Tensor out = at::empty({q.size(0), q.size(1)}, q.options());
  if (q.scalar_type() == at::kFloat)
    decode_attention_impl<float>(q, k_pool, v_pool, table, lengths, block_size, out);
  else if (q.scalar_type() == at::kBFloat16)
    decode_attention_impl<c10::BFloat16>(q, k_pool, v_pool, table, lengths, block_size, out);
  else
    TORCH_CHECK(false, "decode_attention: float32 or bfloat16");
  return out;
}

template <class T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y) {
  const int64_t m = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, m, 32, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(n);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + r * n;
      double ss = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        row[i] = to_float(xr[i]);
        ss += static_cast<double>(row[i]) * row[i];
      }
      const float inv = 1.f / std::sqrt(static_cast<float>(ss / n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) row[i] = to_float(wp[i]) * static_cast<float>(T(row[i] * inv));
      store_row(yp + r * n, row.data(), n);
    }
  });
}

// x [m, n] -> x / sqrt(mean(x^2) + eps) * w, as transformers' LlamaRMSNorm (normalized in float32, rounded
// to x's dtype, then scaled by w).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1),
              "rms_norm: contiguous x [m, n] and w [n]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and w must share a dtype");
  at::Tensor y = at::empty_like(x);
  if (x.scalar_type() == at::kFloat)
    rms_norm_impl<float>(x, w, eps, y);
  else if (x.scalar_type() == at::kBFloat16)
    rms_norm_impl<c10::BFloat16>(x, w, eps, y);
  else
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16");
  return y;
}

template <class T>
void rotary_impl(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                 int64_t heads, int64_t d) {
  const int64_t tokens = x.size(0), row_stride = x.stride(0), half = d / 2;
  T* xp = x.data_ptr<T>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cp + pp[r] * half;
      const float* s = sp + pp[r] * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* a = xp + r * row_stride + h * d;
        T* b = a + half;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_float(a[i]), x2 = to_float(b[i]);
          a[i] = T(x1 * c[i] - x2 * s[i]);
          b[i] = T(x2 * c[i] + x1 * s[i]);
        }
      }
    }
  });
}

// Rotates, in place, the first `heads` heads of size d of each row of x [tokens, >= heads * d] (queries
// then keys of the fused product) by the row's position; cos and sin are float32 [max positions, d / 2]
// (the half-split layout of Hugging Face checkpoints).
void rotary_(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
             int64_t heads, int64_t d) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) >= heads * d && d % 2 == 0,
              "rotary_: x [tokens, >= heads * d] with unit column stride");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == x.size(0), "rotary_: int64 positions [tokens]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == d / 2 && sin.sizes() == cos.sizes(),
              "rotary_: float32 cos and sin [max positions, d / 2]");
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < positions.numel(); ++r)
    TORCH_CHECK(pp[r] >= 0 && pp[r] < cos.size(0), "rotary_: position outside the table");
  if (x.scalar_type() == at::kFloat)
    rotary_impl<float>(x, positions, cos, sin, heads, d);
  else if (x.scalar_type() == at::kBFloat16)
    rotary_impl<c10::BFloat16>(x, positions, cos, sin, heads, d);
  else
    TORCH_CHECK(false, "rotary_: float32 or bfloat16");
}

// Stores rows of the fused q/k/v product x [tokens, (heads + 2 kv_heads) d] (already rotated): each
// token's keys and values go to its slot of the pools [slots, kv_heads, d].
template <class T>
void store_kv_impl(const at::Tensor& x, int64_t heads, int64_t kv_heads, int64_t d, at::Tensor& k_pool,
                   at::Tensor& v_pool, const at::Tensor& slots) {
  const int64_t tokens = x.size(0), row_stride = x.stride(0), width = kv_heads * d;
  const T* xp = x.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  T* kp = k_pool.data_ptr<T>();
  T* vp = v_pool.data_ptr<T>();
  at::parallel_for(0, tokens, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = xp + r * row_stride + heads * d;
      std::memcpy(kp + sp[r] * width, row, width * sizeof(T));
      std::memcpy(vp + sp[r] * width, row + width, width * sizeof(T));
    }
  });
}

// rotary_ on the queries and keys of the fused q/k/v product x [tokens, (heads + 2 kv_heads) d], then
// each token's keys and values written to its slot of the pools [slots, kv_heads, d]: the decode step's
// rotation and cache write in one call instead of a rotation, a split, views and two index_copy_.
void rotary_store_(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                   int64_t heads, int64_t kv_heads, int64_t d, at::Tensor k_pool, at::Tensor v_pool,
                   const at::Tensor& slots) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) == (heads + 2 * kv_heads) * d,
              "rotary_store_: x [tokens, (heads + 2 kv_heads) d] with unit column stride");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  v_pool.sizes() == k_pool.sizes() && k_pool.size(1) == kv_heads && k_pool.size(2) == d,
              "rotary_store_: contiguous pools [slots, kv_heads, d]");
  TORCH_CHECK(k_pool.scalar_type() == x.scalar_type() && v_pool.scalar_type() == x.scalar_type(),
              "rotary_store_: x and the pools must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == x.size(0),
              "rotary_store_: int64 slots [tokens]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < slots.numel(); ++r)
    TORCH_CHECK(sp[r] >= 0 && sp[r] < k_pool.size(0), "rotary_store_: slot outside the pool");
  rotary_(x, positions, cos, sin, heads + kv_heads, d);
  if (x.scalar_type() == at::kFloat)
    store_kv_impl<float>(x, heads, kv_heads, d, k_pool, v_pool, slots);
  else
    store_kv_impl<c10::BFloat16>(x, heads, kv_heads, d, k_pool, v_pool, slots);
}

// silu(gate) * up for x [m, 2 n] = [gate | up] (the fused gate/up product) -> [m, n], in float32 with one
// rounding; silu(g) = g / (1 + e^-g), from e = e^-|g| so that the exponential never overflows.
template <class T>
void silu_mul_impl(const at::Tensor& x, at::Tensor& y) {
  const int64_t m = x.size(0), n = y.size(1);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, m, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> e(n);
    for (int64_t r = r0; r < r1; ++r) {
      const T* gate = xp + r * 2 * n;
      const T* up = gate + n;
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        const V g = load16(gate + i);
        store(e.data() + i, exp_nonpositive(sub(zero(), max(g, sub(zero(), g)))));
      }
      for (; i < n; ++i) e[i] = std::exp(-std::fabs(to_float(gate[i])));
      T* out = yp + r * n;
      for (int64_t j = 0; j < n; ++j) {
        const float g = to_float(gate[j]);
        const float sigmoid = (g >= 0.f ? 1.f : e[j]) / (1.f + e[j]);
        out[j] = T(g * sigmoid * to_float(up[j]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "silu_mul: contiguous x [m, 2 n]");
  at::Tensor y = at::empty({x.size(0), x.size(1) / 2}, x.options());
  if (x.scalar_type() == at::kFloat)
    silu_mul_impl<float>(x, y);
  else if (x.scalar_type() == at::kBFloat16)
    silu_mul_impl<c10::BFloat16>(x, y);
  else
    TORCH_CHECK(false, "silu_mul: float32 or bfloat16");
  return y;
}

template <class T>
void add_rms_norm_impl(at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps, at::Tensor& y) {
  const int64_t m = h.size(0), n = h.size(1);
  T* hp = h.data_ptr<T>();
  const T* dp = delta.data_ptr<T>();
  at::parallel_for(0, m, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < n; ++i) hp[r * n + i] = T(to_float(hp[r * n + i]) + to_float(dp[r * n + i]));
  });
  rms_norm_impl<T>(h, w, eps, y);
}

// The residual stream's h += delta (in place, rounded to h's dtype as torch's add), then rms_norm(h): the
// two operations between the halves of a decoder layer in one call. Returns the normalized rows.
at::Tensor add_rms_norm_(at::Tensor h, const at::Tensor& delta, const at::Tensor& w, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && delta.is_contiguous() && delta.sizes() == h.sizes(),
              "add_rms_norm_: contiguous h and delta [m, n]");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.size(0) == h.size(1), "add_rms_norm_: w [n]");
  TORCH_CHECK(h.scalar_type() == delta.scalar_type() && h.scalar_type() == w.scalar_type(),
              "add_rms_norm_: h, delta and w must share a dtype");
  at::Tensor y = at::empty_like(h);
  if (h.scalar_type() == at::kFloat)
    add_rms_norm_impl<float>(h, delta, w, eps, y);
  else if (h.scalar_type() == at::kBFloat16)
    add_rms_norm_impl<c10::BFloat16>(h, delta, w, eps, y);
  else
    TORCH_CHECK(false, "add_rms_norm_: float32 or bfloat16");
  return y;
}

// decode_layers: the kinds of product (shard/paged/model.py's DecodePlan names them the same) and the
// tensors of a layer in `weights`: its input and post-attention norms, then (a, b) for the q/k/v, output,
// gate/up and down products (dense: a = the float32 weight; int8: q, scale; int4: nibbles, scales), then
// the q/k/v bias (empty when none).
constexpr int64_t kDense = 0, kInt8 = 1, kInt4 = 2;
constexpr int64_t kLayerSlots = 11;

at::Tensor product(int64_t kind, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  if (kind == kDense) return paged_products::dense(x, a);
  if (kind == kInt8) return paged_products::int8(x, a, b);
  TORCH_CHECK(kind == kInt4, "decode_layers: unknown product kind ", kind);
  return paged_products::int4(x, a, b, x.size(1));
}

// Every decoder layer of a decode-only float32 step, then the final norm, in one call: the same
// operations as the fused Python path (shard/paged/model.py, LlamaModel._layers_fused), without a Python
// round trip and a dispatch per operation (about 30 operations per layer). h [b, hidden] is the residual
// stream (updated in place); returns the final norm's rows, for the LM head.
at::Tensor decode_layers(at::Tensor h, at::TensorList weights, at::IntArrayRef kinds, at::TensorList k_pools,
                         at::TensorList v_pools, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& slots, const at::Tensor& table,
                         const at::Tensor& lengths, int64_t block_size, int64_t heads, int64_t kv_heads, int64_t d,
                         double eps, const at::Tensor& final_norm) {
  const int64_t layers = static_cast<int64_t>(k_pools.size());
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(v_pools.size()) == layers &&
                  static_cast<int64_t>(weights.size()) == layers * kLayerSlots &&
                  static_cast<int64_t>(kinds.size()) == layers * 4,
              "decode_layers: ", kLayerSlots, " weights, 4 kinds and two pools per layer");
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kFloat && h.size(0) == table.size(0),
              "decode_layers: contiguous float32 h [b, hidden], a row per sequence");
  at::Tensor x = rms_norm(h, weights[0], eps);
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = weights.data() + i * kLayerSlots;
    const int64_t* kind = kinds.data() + i * 4;
    at::Tensor qkv = product(kind[0], x, w[2], w[3]);
    if (w[10].numel()) qkv.add_(w[10]);
    rotary_store_(qkv, positions, cos, sin, heads, kv_heads, d, k_pools[i], v_pools[i], slots);
    const at::Tensor attention =
        decode_attention(qkv.narrow(1, 0, heads * d), k_pools[i], v_pools[i], table, lengths, block_size);
    x = add_rms_norm_(h, product(kind[1], attention, w[4], w[5]), w[1], eps);
    const at::Tensor mlp = product(kind[3], silu_mul(product(kind[2], x, w[6], w[7])), w[8], w[9]);
    x = add_rms_norm_(h, mlp, i + 1 < layers ? weights[(i + 1) * kLayerSlots] : final_norm, eps);
  }
  return x;
}

// Greedy choice for rows of scores [b, vocab] float32: each row's first maximum and its log-probability
// (log_softmax at that index), in three passes over the row (max; where; sum of exponentials) instead of
// torch's log_softmax, argmax and gather, which write and read a whole [b, vocab] tensor more. A row with
// a NaN (or +inf) gets a NaN log-probability, as log_softmax would give it.
std::tuple<at::Tensor, at::Tensor> greedy(const at::Tensor& scores) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.dim() == 2 && scores.is_contiguous() &&
                  scores.size(1) > 0, "greedy: contiguous float32 [b, vocab]");
  const int64_t b = scores.size(0), n = scores.size(1), whole = n / 16 * 16;
  at::Tensor ids = at::empty({b}, scores.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({b}, scores.options());
  const float* sp = scores.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  at::parallel_for(0, b, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = sp + r * n;
      V mv = set1(-INFINITY);
      for (int64_t i = 0; i < whole; i += 16) mv = max(mv, load(x + i));
      float m = hmax(mv);
      for (int64_t i = whole; i < n; ++i) m = x[i] > m ? x[i] : m;
      int64_t at = -1;
      for (int64_t i = 0; i < whole && at < 0; i += 16) {
        const int lane = first_equal(load(x + i), m);
        if (lane >= 0) at = i + lane;
      }
      for (int64_t i = whole; i < n && at < 0; ++i)
        if (x[i] == m) at = i;
      const V mm = set1(m);
      V sum = zero(), check = zero();  // check: the sum of x - m, NaN when any x is (or m is infinite)
      for (int64_t i = 0; i < whole; i += 16) {
        const V d = sub(load(x + i), mm);
        check = add(check, d);
        sum = add(sum, exp_nonpositive(d));
      }
      float total = hsum(sum), checked = hsum(check);
      for (int64_t i = whole; i < n; ++i) {
        checked += x[i] - m;
        total += std::exp(x[i] - m);
      }
      ip[r] = at < 0 ? 0 : at;
      lp[r] = std::isnan(checked) || at < 0 ? NAN : -std::log(total);
    }
  });
  return {ids, logprobs};
}

}  // namespace

TORCH_LIBRARY(paged_step, lib) {
  lib.def("decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor table, Tensor lengths, int block_size) -> Tensor");
  lib.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  lib.def("rotary_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin, int heads, int d) -> ()");
  lib.def("greedy(Tensor scores) -> (Tensor, Tensor)");
  lib.def("rotary_store_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin, int heads, int kv_heads, int d, "
          "Tensor(b!) k_pool, Tensor(c!) v_pool, Tensor slots) -> ()");
  lib.def("silu_mul(Tensor x) -> Tensor");
  lib.def("add_rms_norm_(Tensor(a!) h, Tensor delta, Tensor w, float eps) -> Tensor");
  lib.def("decode_layers(Tensor(a!) h, Tensor[] weights, int[] kinds, Tensor[] k_pools, Tensor[] v_pools, "
          "Tensor positions, Tensor cos, Tensor sin, Tensor slots, Tensor table, Tensor lengths, int block_size, "
          "int heads, int kv_heads, int d, float eps, Tensor final_norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(paged_step, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
  lib.impl("rms_norm", &rms_norm);
  lib.impl("rotary_", &rotary_);
  lib.impl("greedy", &greedy);
  lib.impl("rotary_store_", &rotary_store_);
  lib.impl("silu_mul", &silu_mul);
  lib.impl("add_rms_norm_", &add_rms_norm_);
  lib.impl("decode_layers", &decode_layers);
}
