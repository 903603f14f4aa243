// kv_cache_append: write new K and V rows into a static KV cache at per-row offsets.
//
// Contract (checked in layerskip_kernels/ops/kv_cache_append.py; C++ repeats only what
// memory safety needs):
//   k_cache, v_cache : (B, Smax, H, D) contiguous, dtype fp32 | fp16 | bf16
//   k_new, v_new     : (B, S, H, D)    contiguous, same dtype
//   cache_seqlens    : (B,) int32, on the same device; NOT modified (the caller advances it)
//   k_cache[b, cache_seqlens[b] + i] = k_new[b, i] for i < S (same for v).
// A (b, i) row is H * D contiguous elements in both tensors, so the copy is dtype-blind:
// it moves 16-byte units when the row size and all four pointers are 16-byte aligned,
// else one element at a time. Rows whose target position falls outside [0, Smax) are
// skipped rather than written out of bounds. Offsets are int64.
#include <algorithm>

#include "common.cuh"

namespace lsk {
namespace {

template <typename Unit>
__global__ void kv_cache_append_kernel(Unit* __restrict__ k_cache, Unit* __restrict__ v_cache,
                                       const Unit* __restrict__ k_new,
                                       const Unit* __restrict__ v_new,
                                       const int32_t* __restrict__ cache_seqlens,
                                       int64_t max_seqlen, int64_t seqlen_new, int64_t row_units) {
  const int64_t row = blockIdx.x;  // one (b, i) row per block
  const int64_t b = row / seqlen_new;
  const int64_t pos = int64_t(cache_seqlens[b]) + row % seqlen_new;
  if (pos < 0 || pos >= max_seqlen) return;
  const int64_t src = row * row_units;
  const int64_t dst = (b * max_seqlen + pos) * row_units;
  for (int64_t u = threadIdx.x; u < row_units; u += blockDim.x) {
    k_cache[dst + u] = k_new[src + u];
    v_cache[dst + u] = v_new[src + u];
  }
}

template <typename Unit>
void launch(uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_new, uintptr_t v_new,
            uintptr_t cache_seqlens, int64_t rows, int64_t max_seqlen, int64_t seqlen_new,
            int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_units = row_bytes / int64_t(sizeof(Unit));
  const int threads = int(std::min<int64_t>(256, (row_units + 31) / 32 * 32));
  kv_cache_append_kernel<Unit><<<unsigned(rows), threads, 0, stream>>>(
      reinterpret_cast<Unit*>(k_cache), reinterpret_cast<Unit*>(v_cache),
      reinterpret_cast<const Unit*>(k_new), reinterpret_cast<const Unit*>(v_new),
      reinterpret_cast<const int32_t*>(cache_seqlens), max_seqlen, seqlen_new, row_units);
}

}  // namespace

void kv_cache_append(uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_new, uintptr_t v_new,
                     uintptr_t cache_seqlens, int64_t batch, int64_t max_seqlen,
                     int64_t seqlen_new, int64_t heads, int64_t head_dim, int dtype,
                     uintptr_t stream) {
  const int64_t elem = dtype_size(dtype);
  check_arg(batch >= 0 && max_seqlen >= 0 && seqlen_new >= 0 && heads >= 0 && head_dim >= 0,
            "shape", "non-negative sizes");
  const int64_t rows = batch * seqlen_new;
  check_arg(rows <= INT32_MAX, "k_new", "B * S <= 2^31 - 1");
  if (rows == 0 || heads * head_dim == 0) return;

  const int64_t row_bytes = heads * head_dim * elem;
  const bool vec16 = row_bytes % 16 == 0 && (k_cache | v_cache | k_new | v_new) % 16 == 0;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (vec16) {
    launch<uint4>(k_cache, v_cache, k_new, v_new, cache_seqlens, rows, max_seqlen, seqlen_new,
                  row_bytes, s);
  } else if (elem == 4) {
    launch<uint32_t>(k_cache, v_cache, k_new, v_new, cache_seqlens, rows, max_seqlen,
                     seqlen_new, row_bytes, s);
  } else {
    launch<uint16_t>(k_cache, v_cache, k_new, v_new, cache_seqlens, rows, max_seqlen,
                     seqlen_new, row_bytes, s);
  }
  check_cuda(cudaGetLastError(), "kv_cache_append launch");
}

}  // namespace lsk
