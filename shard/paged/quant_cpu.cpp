// Weight-only int8 / int4 matrix products for the CPU: y[m, n] = x[m, k] . W[n, k]^T, x and y float32.
//
// Built at run time by shard/paged/kernels.py (torch.utils.cpp_extension, -O3 -march=native) and called as
// torch.ops.paged_quant.int8_linear, int4_linear and dense_linear.
//
// int8: W = q[n, k] (int8) * scale[n] (float32), one scale per output channel.
// int4: w = q * d + m (q in 0..15) in blocks of 32 along k with an fp16 scale d and offset m each, as
//       GGUF's Q4_1. Stored as nibbles [n, kp / 2] (kp: k padded to a multiple of 64; each 64-weight chunk
//       is 32 bytes in chunk_order) and scales [n, kp / 32 + mp] fp16: the d's, then the m's padded to a
//       multiple of 16 (shard/paged/quant.py writes both).
//
// Where the CPU has AVX512-VNNI, int8 quantizes x to int8 in blocks of 32 (one float scale each) and the
// products run on vpdpbusd, 64 byte products per instruction: up to 3x float32's speed, most at m = 8 to
// 32, where the product is compute bound. x's rounding adds about 0.5% relative error to the output (the
// weights' own is about 1%). set_int8_vnni(false) selects the float-activation kernel below instead.
//
// int4 always quantizes x so (as llama.cpp does for Q4_1): integer dot products of 64 weights at a time,
// vpdpbusd with VNNI, vpmaddubsw + vpmaddwd on AVX-512 without it or on AVX2. Decoding one token reads the
// nibbles at about twice the rate of the float-activation kernel this replaced (docs/benchmarks.md).
//
// int8 without VNNI, and the dense float32 kernel: x stays float32 and the weights are converted in
// registers, either multiplied with every row of x at once (m <= 4, in channel tiles, below), or converted
// for 4 output channels into a small float buffer that stays in L1 and is reused by every 4-row tile of x
// (m > 4).
//
// Work is split over output channels with at::parallel_for (torch's own OpenMP pool: the extension is
// linked with -fopenmp and shares torch's libgomp). The vector code (simd.h) has AVX-512 and AVX2+FMA
// versions (whichever -march=native allows) and a plain one the compiler vectorizes as it can.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "products.h"
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace paged_simd;

constexpr int64_t BLOCK = 32;        // k elements per inner step (and per int4 block)
constexpr int64_t NT = 4;            // output channels per register tile (m > 4)
constexpr int64_t TILE = 16;         // output channels per channel tile (one hsum16)

// One row's 32 weights starting at column k0, dequantized (int8: without the channel scale).
struct Int8Rows {
  const int8_t* q;
  const float* scale;
  int64_t k;
  inline void get(int64_t row, int64_t k0, V& lo, V& hi) const {
    const int8_t* p = q + row * k + k0;
    lo = from_i8(p);
    hi = from_i8(p + 16);
  }
  inline float post(int64_t row) const { return scale[row]; }
  const float* posts() const { return scale; }
};

// Unquantized float32 weights, for single-row products (one stream decoding): read in channel tiles, where
// MKL's sgemv on an [n, k] matrix reached about half of the memory bandwidth here (docs/benchmarks.md).
struct F32Rows {
  const float* w;
  int64_t k;
  inline void get(int64_t row, int64_t k0, V& lo, V& hi) const {
    const float* p = w + row * k + k0;
    lo = load(p);
    hi = load(p + 16);
  }
  inline float post(int64_t) const { return 1.f; }
  const float* posts() const { return nullptr; }
};

// Channel tiles, for m <= 4 (decode steps of a few streams, where the products are memory bound): a tile is
// 16 output channels, and each channel's weights are read front to back, one channel after the other, so
// that the hardware prefetcher follows one stream per thread; the tile's 16 sums per row of x come out of
// one hsum16. Reading 4 channels side by side, a chunk of each in turn, took about 2.4x as long on the int8
// LM head at one row (docs/benchmarks.md). From m = 5 on, the products are compute bound and the register
// tiles below (vnni_tile, int4_tile, large_m) reuse each loaded chunk of weights and of x several times.
//
// Chan::run<M>(i0, j, out): the M partial-sum vectors of rows i0.. of x against channel j.
template <int M, class Chan>
inline void channel_tile(const Chan& chan, int64_t i0, int64_t j0, int64_t nt, const float* post, float* y,
                         int64_t n) {
  V out[M];
  if (nt == TILE) {
    V acc[M][TILE];
    for (int t = 0; t < TILE; ++t) {
      chan.template run<M>(i0, j0 + t, out);
      for (int i = 0; i < M; ++i) acc[i][t] = out[i];
    }
    for (int i = 0; i < M; ++i) {
      const V sums = hsum16(acc[i]);
      store(y + (i0 + i) * n + j0, post != nullptr ? mul(sums, load(post + j0)) : sums);
    }
    return;
  }
  for (int64_t t = 0; t < nt; ++t) {
    chan.template run<M>(i0, j0 + t, out);
    const float p = post != nullptr ? post[j0 + t] : 1.f;
    for (int i = 0; i < M; ++i) y[(i0 + i) * n + j0 + t] = hsum(out[i]) * p;
  }
}

// y[:, n0:n1] for all m rows of x, tile by tile; ``post``: a factor per output channel (or none).
template <class Chan>
void channel_tiles(const Chan& chan, int64_t m, int64_t n0, int64_t n1, const float* post, float* y, int64_t n) {
  for (int64_t j0 = n0; j0 < n1; j0 += TILE) {
    const int64_t nt = std::min<int64_t>(TILE, n1 - j0);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) channel_tile<4>(chan, i, j0, nt, post, y, n);
    switch (m - i) {
      case 3: channel_tile<3>(chan, i, j0, nt, post, y, n); break;
      case 2: channel_tile<2>(chan, i, j0, nt, post, y, n); break;
      case 1: channel_tile<1>(chan, i, j0, nt, post, y, n); break;
      default: break;
    }
  }
}

// Splits the output channels over torch's threads in whole tiles (at least 4 a thread) and runs them.
template <class Chan>
void parallel_tiles(const Chan& chan, int64_t m, int64_t n, const float* post, float* y) {
  at::parallel_for(0, (n + TILE - 1) / TILE, 4, [&](int64_t t0, int64_t t1) {
    channel_tiles(chan, m, t0 * TILE, std::min(n, t1 * TILE), post, y, n);
  });
}

// Float x against Rows weights (dense float32, or int8 dequantized in registers), two accumulators a row.
template <class Rows>
struct RowsChan {
  const float* x;
  const Rows& w;
  int64_t k;
  template <int M>
  inline void run(int64_t i0, int64_t j, V* out) const {
    V a[M], b[M];
    for (int i = 0; i < M; ++i) a[i] = b[i] = zero();
    for (int64_t k0 = 0; k0 < k; k0 += BLOCK) {
      V lo, hi;
      w.get(j, k0, lo, hi);
      for (int i = 0; i < M; ++i) {
        const float* xi = x + (i0 + i) * k + k0;
        a[i] = fma(load(xi), lo, a[i]);
        b[i] = fma(load(xi + 16), hi, b[i]);
      }
    }
    for (int i = 0; i < M; ++i) out[i] = add(a[i], b[i]);
  }
};

// 4 rows of x against 4 dequantized weight rows held in buf ([NT][k] floats).
template <int M>
void tile(const float* x, int64_t k, const float* buf, int64_t nt, const float* post, float* y, int64_t n) {
  V acc[M][NT];
  for (int i = 0; i < M; ++i)
    for (int64_t t = 0; t < NT; ++t) acc[i][t] = zero();
  for (int64_t k0 = 0; k0 < k; k0 += 16) {
    V xv[M];
    for (int i = 0; i < M; ++i) xv[i] = load(x + i * k + k0);
    for (int64_t t = 0; t < NT; ++t) {
      const V wv = load(buf + t * k + k0);
      for (int i = 0; i < M; ++i) acc[i][t] = fma(xv[i], wv, acc[i][t]);
    }
  }
  for (int64_t t = 0; t < nt; ++t)
    for (int i = 0; i < M; ++i) y[i * n + t] = hsum(acc[i][t]) * post[t];
}

template <class Rows>
void large_m(const float* x, int64_t m, const Rows& w, int64_t k, int64_t n0, int64_t n1, float* y,
             int64_t n) {
  std::vector<float> buf(NT * k);
  for (int64_t j0 = n0; j0 < n1; j0 += NT) {
    const int64_t nt = std::min<int64_t>(NT, n1 - j0);
    float post[NT] = {};
    for (int64_t t = 0; t < NT; ++t) {
      float* row = buf.data() + t * k;
      if (t >= nt) {
        std::memset(row, 0, k * sizeof(float));
        continue;
      }
      for (int64_t k0 = 0; k0 < k; k0 += BLOCK) {
        V lo, hi;
        w.get(j0 + t, k0, lo, hi);
        store(row + k0, lo);
        store(row + k0 + 16, hi);
      }
      post[t] = w.post(j0 + t);
    }
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) tile<4>(x + i * k, k, buf.data(), nt, post, y + i * n + j0, n);
    switch (m - i) {
      case 3: tile<3>(x + i * k, k, buf.data(), nt, post, y + i * n + j0, n); break;
      case 2: tile<2>(x + i * k, k, buf.data(), nt, post, y + i * n + j0, n); break;
      case 1: tile<1>(x + i * k, k, buf.data(), nt, post, y + i * n + j0, n); break;
      default: break;
    }
  }
}

template <class Rows>
at::Tensor run(const at::Tensor& x, const Rows& w, int64_t n, int64_t k) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == k && x.is_contiguous(),
              "x must be a contiguous float32 [m, ", k, "] tensor");
  TORCH_CHECK(k % BLOCK == 0, "k must be a multiple of ", BLOCK);
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (m == 0) return y;
  if (m <= 4) {  // each weight is converted once, in registers, for every row of x
    parallel_tiles(RowsChan<Rows>{xp, w, k}, m, n, w.posts(), yp);
    return y;
  }
  // Tiles of NT output channels; a grain of at least 64 channels keeps tiny matrices on one thread.
  const int64_t tiles = (n + NT - 1) / NT;
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    large_m(xp, m, w, k, t0 * NT, std::min(n, t1 * NT), yp, n);
  });
  return y;
}

bool int8_float_activations = false;  // set_int8_vnni(false): int8 keeps x in float32 too

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 x int8 with AVX512-VNNI (vpdpbusd: 64 byte products a cycle). x is quantized per row in blocks of
// 32 (a float scale each, as GGUF's Q8_0) and offset by 128 to make it unsigned; the 128 x sum(w) that the
// offset adds is taken back out of each lane before the lane's block scale is applied.
constexpr bool HAS_VNNI = true;
constexpr int64_t CHUNK = 64;  // bytes per vpdpbusd: two 32-blocks of x

struct QuantizedX {
  std::vector<uint8_t> q;   // [m][k]: round(x / s) + 128
  std::vector<float> lanes; // [m][k / 64][16]: s of the chunk's first block in lanes 0-7, second in 8-15
};

inline void quantize_x(const float* x, int64_t m, int64_t k, QuantizedX& out) {
  out.q.resize(m * k);
  out.lanes.resize(m * (k / CHUNK) * 16);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < k / BLOCK; ++b) {
      const float* xb = x + i * k + b * BLOCK;
      const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const float s = amax / 127.f;
      const __m512 inv = _mm512_set1_ps(s > 0.f ? 1.f / s : 0.f);
      const __m512i off = _mm512_set1_epi32(128);
      const __m512i qlo = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), off);
      const __m512i qhi = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv)), off);
      uint8_t* dst = out.q.data() + i * k + b * BLOCK;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtusepi32_epi8(qlo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtusepi32_epi8(qhi));
      float* lanes = out.lanes.data() + (i * (k / CHUNK) + b / 2) * 16 + (b % 2) * 8;
      for (int l = 0; l < 8; ++l) lanes[l] = s;
    }
  }
}

// -128 x each lane's sum of the 4 weights of a chunk: what x's offset adds to the lane.
inline __m512i offset_correction(__m512i w) {
  return _mm512_sub_epi32(_mm512_setzero_si512(),
                          _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(static_cast<char>(0x80)), w));
}

struct VnniChan {
  const QuantizedX& xq;
  const int8_t* w;
  int64_t k;
  template <int M>
  inline void run(int64_t i0, int64_t j, V* out) const {
    const int64_t chunks = k / CHUNK;
    const int8_t* row = w + j * k;
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i wv = _mm512_loadu_si512(row + c * CHUNK), neg = offset_correction(wv);
      for (int i = 0; i < M; ++i) {
        const __m512i xv = _mm512_loadu_si512(xq.q.data() + (i0 + i) * k + c * CHUNK);
        const __m512 sv = _mm512_loadu_ps(xq.lanes.data() + ((i0 + i) * chunks + c) * 16);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg, xv, wv)), sv, acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) out[i] = {acc[i]};
  }
};

// m > 4: M rows of x against T channels in registers, chunk by chunk: each weight chunk serves M rows and
// each chunk of x T channels (the products are compute bound there, and the tile's weights stay in L1).
template <int M, int T>
inline void vnni_tile(const QuantizedX& xq, int64_t i0, const int8_t* w, const float* scale, int64_t k,
                      int64_t j0, float* y, int64_t n) {
  const int64_t chunks = k / CHUNK;
  __m512 acc[M][T];
  for (int i = 0; i < M; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i wv[T], neg[T];
    for (int t = 0; t < T; ++t) {
      wv[t] = _mm512_loadu_si512(w + (j0 + t) * k + c * CHUNK);
      neg[t] = offset_correction(wv[t]);
    }
    for (int i = 0; i < M; ++i) {
      const __m512i xv = _mm512_loadu_si512(xq.q.data() + (i0 + i) * k + c * CHUNK);
      const __m512 sv = _mm512_loadu_ps(xq.lanes.data() + ((i0 + i) * chunks + c) * 16);
      for (int t = 0; t < T; ++t) {
        const __m512i d = _mm512_dpbusd_epi32(neg[t], xv, wv[t]);
        acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc[i][t]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < M; ++i) y[(i0 + i) * n + j0 + t] = _mm512_reduce_add_ps(acc[i][t]) * scale[j0 + t];
}

template <int T>
inline void vnni_rows(const QuantizedX& xq, int64_t m, const int8_t* w, const float* scale, int64_t k,
                      int64_t j0, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) vnni_tile<4, T>(xq, i, w, scale, k, j0, y, n);
  switch (m - i) {
    case 3: vnni_tile<3, T>(xq, i, w, scale, k, j0, y, n); break;
    case 2: vnni_tile<2, T>(xq, i, w, scale, k, j0, y, n); break;
    case 1: vnni_tile<1, T>(xq, i, w, scale, k, j0, y, n); break;
    default: break;
  }
}

at::Tensor int8_linear_vnni(const at::Tensor& x, const int8_t* w, const float* scale, int64_t n, int64_t k) {
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  QuantizedX xq;
  quantize_x(x.data_ptr<float>(), m, k, xq);
  float* yp = y.data_ptr<float>();
  if (m <= 4) {
    parallel_tiles(VnniChan{xq, w, k}, m, n, scale, yp);
    return y;
  }
  at::parallel_for(0, (n + NT - 1) / NT, 16, [&](int64_t t0, int64_t t1) {
    const int64_t n1 = std::min(n, t1 * NT);
    int64_t j0 = t0 * NT;
    for (; j0 + NT <= n1; j0 += NT) vnni_rows<NT>(xq, m, w, scale, k, j0, yp, n);
    for (; j0 < n1; ++j0) vnni_rows<1>(xq, m, w, scale, k, j0, yp, n);
  });
  return y;
}

#else
constexpr bool HAS_VNNI = false;
#endif

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "q: int8 [n, k]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == q.size(0), "scale: float32 [n]");
  const int64_t n = q.size(0), k = q.size(1);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (k % CHUNK == 0 && !int8_float_activations) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == k && x.is_contiguous(),
                "x must be a contiguous float32 [m, ", k, "] tensor");
    return int8_linear_vnni(x, q.data_ptr<int8_t>(), scale.data_ptr<float>(), n, k);
  }
#endif
  return run(x, Int8Rows{q.data_ptr<int8_t>(), scale.data_ptr<float>(), k}, n, k);
}

// Which int8 kernel runs: VNNI with int8 activations (where the CPU has it), or float activations.
bool set_int8_vnni(bool on) {
  int8_float_activations = !(on && HAS_VNNI);
  return !int8_float_activations;
}

// int4: x is quantized to int8 in blocks of 32 (GGUF's Q8_1: a float scale s each, and the block's float
// sum for the offsets), then each 64-weight chunk is one integer dot product (dot_u8s8):
//   sum_j x_j w_j ~ sum over blocks b of d_b s_b (sum_j q_j xq_j) + m_b (sum_j x_j) + d_b c_b,
//   c_b = 8 (sum_j x_j - s_b sum_j xq_j),
// the last term taking out x's rounding error against the middle level 8 of q: what is left is the error
// against q - 8, which is centred, so that x's rounding costs about 0.5% of the output, not 1 to 2%.
// The chunk's bytes are ordered so that its 16 lanes alternate between its two blocks (CHUNK_ORDER): a
// pair of weight scales loaded once then covers the whole chunk.
constexpr int64_t CHUNK4 = 64;
// Byte p of a chunk (after unpack_u4) holds weight CHUNK_ORDER[p] of the chunk: lanes (4 bytes) alternate
// between the first block (weights 0..31) and the second (32..63). shard/paged/quant.py packs alike.
constexpr int chunk_order(int p) { return (p / 4 % 2) * 32 + p / 8 * 4 + p % 4; }

struct QuantizedX4 {
  int64_t kp, mp;            // padded widths: k to a multiple of 64; blocks to a multiple of 16
  std::vector<int8_t> q;     // [m][kp], chunk order
  std::vector<float> lanes;  // [m][kp / 64][16]: the block scale of each lane
  std::vector<float> sums;   // [m][mp]: each block's float sum (zero past the last block)
  std::vector<float> corr;   // [m][mp]: each block's c_b (zero past the last block)
};

inline void quantize_x4(const float* x, int64_t m, int64_t k, QuantizedX4& out) {
  const int64_t chunks = out.kp / CHUNK4;
  out.q.assign(m * out.kp, 0);
  out.lanes.assign(m * chunks * 16, 0.f);
  out.sums.assign(m * out.mp, 0.f);
  out.corr.assign(m * out.mp, 0.f);
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * k;
    for (int64_t c = 0; c < chunks; ++c) {
      float inv[2] = {0.f, 0.f}, scale[2] = {0.f, 0.f};
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t b = 2 * c + h;
        if (b * BLOCK >= k) break;  // a padding block: zero
        float amax = 0.f, sum = 0.f;
        for (int64_t j = 0; j < BLOCK; ++j) {
          const float v = xi[b * BLOCK + j];
          amax = std::max(amax, std::abs(v));
          sum += v;
        }
        scale[h] = amax / 127.f;
        inv[h] = amax > 0.f ? 127.f / amax : 0.f;
        out.sums[i * out.mp + b] = sum;
      }
      int8_t* dst = out.q.data() + i * out.kp + c * CHUNK4;
      int32_t qsum[2] = {0, 0};
      for (int p = 0; p < CHUNK4; ++p) {
        const int64_t col = c * CHUNK4 + chunk_order(p);
        if (col >= k) continue;
        const int h = chunk_order(p) / 32;
        dst[p] = static_cast<int8_t>(std::nearbyint(xi[col] * inv[h]));
        qsum[h] += dst[p];
      }
      for (int64_t h = 0; h < 2 && (2 * c + h) * BLOCK < k; ++h) {
        const int64_t b = i * out.mp + 2 * c + h;
        out.corr[b] = 8.f * (out.sums[b] - scale[h] * static_cast<float>(qsum[h]));
      }
      float* lanes = out.lanes.data() + (i * chunks + c) * 16;
      for (int l = 0; l < 16; ++l) lanes[l] = scale[l % 2];
    }
  }
}

// acc plus row i of x's offset terms against one channel's scales row (kp / 32 d's, then mp m's), lane-wise:
// sum over blocks b of d_b c_b + m_b sum_b. The d's are read up to mp too: past the last block, into the m's,
// against a zero c_b.
inline V with_offsets(const QuantizedX4& xq, int64_t i, const uint16_t* row, V acc) {
  const int64_t nb = xq.kp / BLOCK;
  const float* sums = xq.sums.data() + i * xq.mp;
  const float* corr = xq.corr.data() + i * xq.mp;
  for (int64_t b = 0; b < xq.mp; b += 16)
    acc = fma(from_f16(row + b), load(corr + b), fma(from_f16(row + nb + b), load(sums + b), acc));
  return acc;
}

// Rows of x against one output channel. A row of weights is kp / 2 bytes of nibbles (nib) and, in scales,
// kp / 32 fp16 scales d then mp fp16 offsets m (zero past the last block).
struct Int4Chan {
  const QuantizedX4& xq;
  const uint8_t* nib;
  const uint16_t* scales;
  template <int M>
  inline void run(int64_t i0, int64_t j, V* out) const {
    const int64_t kp = xq.kp, chunks = kp / CHUNK4, nb = kp / BLOCK, srow = nb + xq.mp;
    const uint8_t* w = nib + j * (kp / 2);
    const uint16_t* row = scales + j * srow;
    V acc[M];
    for (int i = 0; i < M; ++i) acc[i] = zero();
    for (int64_t c = 0; c < chunks; ++c) {
      const Q wq = unpack_u4(w + c * (CHUNK4 / 2));
      const V d = from_f16_pair(row + 2 * c);
      for (int i = 0; i < M; ++i) {
        const Q xv = load_q(xq.q.data() + (i0 + i) * kp + c * CHUNK4);
        const V sx = load(xq.lanes.data() + ((i0 + i) * chunks + c) * 16);
        acc[i] = fma(dot_u8s8(wq, xv), mul(d, sx), acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) out[i] = with_offsets(xq, i0 + i, row, acc[i]);
  }
};

// m > 4: M rows of x against T channels in registers, as vnni_tile.
template <int M, int T>
inline void int4_tile(const QuantizedX4& xq, int64_t i0, const uint8_t* nib, const uint16_t* scales, int64_t j0,
                      float* y, int64_t n) {
  const int64_t kp = xq.kp, chunks = kp / CHUNK4, nb = kp / BLOCK, srow = nb + xq.mp;
  V acc[M][T];
  for (int i = 0; i < M; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = zero();
  for (int64_t c = 0; c < chunks; ++c) {
    Q w[T];
    V d[T];
    for (int t = 0; t < T; ++t) {
      w[t] = unpack_u4(nib + (j0 + t) * (kp / 2) + c * (CHUNK4 / 2));
      d[t] = from_f16_pair(scales + (j0 + t) * srow + 2 * c);
    }
    for (int i = 0; i < M; ++i) {
      const Q xv = load_q(xq.q.data() + (i0 + i) * kp + c * CHUNK4);
      const V sx = load(xq.lanes.data() + ((i0 + i) * chunks + c) * 16);
      for (int t = 0; t < T; ++t) acc[i][t] = fma(dot_u8s8(w[t], xv), mul(d[t], sx), acc[i][t]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < M; ++i)
      y[(i0 + i) * n + j0 + t] = hsum(with_offsets(xq, i0 + i, scales + (j0 + t) * srow, acc[i][t]));
}

template <int T>
inline void int4_rows(const QuantizedX4& xq, int64_t m, const uint8_t* nib, const uint16_t* scales, int64_t j0,
                      float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) int4_tile<4, T>(xq, i, nib, scales, j0, y, n);
  switch (m - i) {
    case 3: int4_tile<3, T>(xq, i, nib, scales, j0, y, n); break;
    case 2: int4_tile<2, T>(xq, i, nib, scales, j0, y, n); break;
    case 1: int4_tile<1, T>(xq, i, nib, scales, j0, y, n); break;
    default: break;
  }
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& nibbles, const at::Tensor& scales, int64_t k) {
  TORCH_CHECK(k > 0 && k % BLOCK == 0, "k must be a positive multiple of ", BLOCK);
  QuantizedX4 xq;
  xq.kp = (k + CHUNK4 - 1) / CHUNK4 * CHUNK4;
  xq.mp = (k / BLOCK + 15) / 16 * 16;
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && nibbles.dim() == 2 && nibbles.is_contiguous() &&
                  nibbles.size(1) == xq.kp / 2, "nibbles: uint8 [n, k / 2], k padded to a multiple of 64");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == nibbles.size(0) && scales.size(1) == xq.kp / BLOCK + xq.mp,
              "scales: float16 [n, blocks + padded blocks]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == k && x.is_contiguous(),
              "x must be a contiguous float32 [m, ", k, "] tensor");
  const int64_t m = x.size(0), n = nibbles.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  quantize_x4(x.data_ptr<float>(), m, k, xq);
  const uint8_t* nib = nibbles.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  if (m <= 4) {
    parallel_tiles(Int4Chan{xq, nib, sc}, m, n, nullptr, yp);
    return y;
  }
  at::parallel_for(0, (n + NT - 1) / NT, 16, [&](int64_t t0, int64_t t1) {
    const int64_t n1 = std::min(n, t1 * NT);
    int64_t j0 = t0 * NT;
    for (; j0 + NT <= n1; j0 += NT) int4_rows<NT>(xq, m, nib, sc, j0, yp, n);
    for (; j0 < n1; ++j0) int4_rows<1>(xq, m, nib, sc, j0, yp, n);
  });
  return y;
}

}  // namespace

// y = x . w^T for an unquantized float32 w [n, k] and float32 x [m, k], m <= 4 (decode steps).
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat, "w: contiguous float32 [n, k]");
  TORCH_CHECK(x.size(0) <= 4, "dense_linear is for at most 4 rows");
  return run(x, F32Rows{w.data_ptr<float>(), w.size(1)}, w.size(0), w.size(1));
}

namespace paged_products {

at::Tensor dense(const at::Tensor& x, const at::Tensor& w) { return dense_linear(x, w); }
at::Tensor int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) { return int8_linear(x, q, scale); }
at::Tensor int4(const at::Tensor& x, const at::Tensor& nibbles, const at::Tensor& scales, int64_t k) {
  return int4_linear(x, nibbles, scales, k);
}

}  // namespace paged_products

TORCH_LIBRARY(paged_quant, lib) {
  lib.def("dense_linear(Tensor x, Tensor w) -> Tensor");
  lib.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  lib.def("int4_linear(Tensor x, Tensor nibbles, Tensor scales, int k) -> Tensor");
  lib.def("set_int8_vnni(bool on) -> bool", &set_int8_vnni);
}

TORCH_LIBRARY_IMPL(paged_quant, CPU, lib) {
  lib.impl("dense_linear", &dense_linear);
  lib.impl("int8_linear", &int8_linear);
  lib.impl("int4_linear", &int4_linear);
}
