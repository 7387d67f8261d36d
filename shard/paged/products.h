// quant_cpu.cpp's matrix products, for the library's other kernels (step_cpu.cpp's decode_layers calls
// them directly, without the dispatcher). Same contracts as torch.ops.paged_quant.*.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace paged_products {

// float32 x [m <= 4, k] . w^T for a contiguous float32 w [n, k].
at::Tensor dense(const at::Tensor& x, const at::Tensor& w);
// float32 x [m, k] . (q * scale)^T for int8 q [n, k] and its float32 per-row scale [n].
at::Tensor int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale);
// float32 x [m, k] times the int4 weight of shard/paged/quant.py's quantize_int4 (nibbles, scales).
at::Tensor int4(const at::Tensor& x, const at::Tensor& nibbles, const at::Tensor& scales, int64_t k);

}  // namespace paged_products
