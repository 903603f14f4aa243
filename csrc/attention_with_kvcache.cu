// attention_with_kvcache: RoPE + K/V cache append + causal attention, for 1..16 new queries
// per row (decode and speculative verify), fp16 / bf16, head_dim 32 / 64 / 128, tensor cores.
// The kernels are in attention_with_kvcache_kernel.cuh (shared with the tests' host emulator,
// csrc/emulate/); this file launches them on the GPU.
//
// Semantics: layerskip_kernels.ops.attention_with_kvcache (flash-attn's
// flash_attn_with_kvcache(..., causal=True) with the half rotation). For row b with
// L = cache_seqlens[b] (read on the device) and new query i < Sq, at position p = L + i:
//   q[b, i] and k_new[b, i] are rotated at p (when cos/sin are given);
//   k_cache[b, p], v_cache[b, p] = k_new[b, i], v_new[b, i]          (in place);
//   out[b, i, h] = softmax(q . k_cache[b, :p+1, h / G]^T * scale) @ v_cache[b, :p+1, h / G].
//
// Contract (validated in layerskip_kernels/ops/attention_with_kvcache.py; C++ repeats only
// what memory safety needs: dtype code, head_dim, Sq <= 16, 16-byte alignment, split count):
//   q, out         : (B, Sq, Hq, D), strides (b, s, h) in elements, last dim contiguous
//   k_cache, v_cache: (B, Smax, Hkv, D), same; written at rows [L, L + Sq)
//   k_new, v_new   : (B, Sq, Hkv, D), same
//   all five of one dtype: fp16 or bf16 (fp32 is routed to Triton by the Python op);
//   every row start 16-byte aligned (pointers and strides multiples of 8 elements).
//   cache_seqlens  : (B,) int32. Not modified. Clamped to [0, Smax] on the device, and cache
//                    rows >= Smax are never written, so bad lengths cannot write out of bounds.
//   rotary_cos/sin : (rotary_rows >= Smax, D/2), row stride given, fp32 | fp16 | bf16
//                    (rotary_dtype); 0 pointers = no RoPE. Positions clamp to rotary_rows - 1.
//   o_part         : (B, Hkv, num_splits, G * Sq, D) fp32, contiguous; lse_part: (B, Hkv,
//                    num_splits, G * Sq) fp32 (base-2 log-sum-exp); only when num_splits > 1.
//   num_splits     : 1..128; row_tiles_per_block: 0 (as many 16-row tiles per block as the
//                    rows need, up to 8) or a limit (1: one tile per block, the kernel as
//                    validated on the H100 on 2026-11-25; every tile then re-reads the keys).
// Offsets are int64. Launches go on the given stream; CUDA errors become RuntimeError.
//
// Tiling: see attention_with_kvcache_kernel.cuh. A block owns one (b, KV head, split, row
// block) and reads each of its keys once for all the block's rows (up to 128).
//
// Split-KV. The cached keys [0, L) are cut into num_splits chunks of whole 64-key blocks; a
// split with nothing to do writes lse = -inf. With one split the block writes out; with more,
// each block writes its normalised partial output and lse, and attn_kvcache_merge_kernel
// (one block per query row) combines them. The grid depends on shapes only: no host sync,
// CUDA-graph safe. attention_with_kvcache_num_splits picks the count from the shape, the SM
// count and the blocks the kernel keeps resident per SM (num_splits_heuristic).
//
// Cache write and read in one launch (the Triton kernel's scheme). No block of this launch
// reads the cache at rows >= L: cached-key loads stop at L (zero-fill beyond). The blocks of
// the last split load k_new / v_new, rotate k_new, round it to the cache dtype, and attend to
// the new keys from shared memory (causal: key j <= query i); the one with row block 0 also
// writes those exact bits to the cache. Reads and writes touch disjoint addresses, so any
// block schedule is correct with no barrier, and exactly one block writes each new cache row.
//
// Hopper: the same mma.sync code runs on sm_90a. wgmma needs 64-row warpgroup tiles and TMA
// a tensor map per cache; with 16-row decode tiles neither stays simple, so neither is used.
#include <atomic>
#include <string>

#include "attention_with_kvcache.cuh"
#include "attention_with_kvcache_kernel.cuh"
#include "common.cuh"

namespace lsk {
namespace {

using namespace attn;

constexpr int kMaxDevices = 64;

// A device attribute of the current device, queried once per device and cached.
int cached_device_attribute(cudaDeviceAttr attr, std::atomic<int> (&cache)[kMaxDevices]) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "attention_with_kvcache: cudaGetDevice");
  if (device >= 0 && device < kMaxDevices) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, attr, device),
             "attention_with_kvcache: cudaDeviceGetAttribute");
  if (device >= 0 && device < kMaxDevices) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

std::atomic<int> g_sm_count[kMaxDevices];
std::atomic<int> g_cc_major[kMaxDevices];
std::atomic<int> g_occupancy[kMaxDevices][3][4];  // [device][D 32/64/128][RowWarps 1/2/4/8]

template <typename T, int D, int RowWarps>
void allow_shared_memory() {
  check_cuda(cudaFuncSetAttribute(attn_kvcache_fwd_kernel<T, D, RowWarps>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  int(Smem<D, RowWarps>::kBytes)),
             "attention_with_kvcache: cudaFuncSetAttribute");
}

struct GpuLaunch {
  const Params& p;
  int64_t batch_heads, row_blocks;
  cudaStream_t stream;

  template <typename T, int D, int RowWarps>
  void run() {
    allow_shared_memory<T, D, RowWarps>();
    const dim3 grid(unsigned(batch_heads), unsigned(p.num_splits), unsigned(row_blocks));
    attn_kvcache_fwd_kernel<T, D, RowWarps>
        <<<grid, Layout<RowWarps>::kThreads, Smem<D, RowWarps>::kBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "attention_with_kvcache launch");
    if (p.num_splits > 1) {
      attn_kvcache_merge_kernel<T, D>
          <<<unsigned(batch_heads * p.rows), kMergeThreads, kMergeSmemBytes, stream>>>(p);
      check_cuda(cudaGetLastError(), "attention_with_kvcache merge launch");
    }
  }
};

// Blocks of the forward kernel resident per SM (registers, shared memory, threads), for the
// instantiation that serves head_dim and RowWarps; fp16 and bf16 use the same resources.
struct Occupancy {
  int blocks = 0;
  template <typename T, int D, int RowWarps>
  void run() {
    allow_shared_memory<T, D, RowWarps>();
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                   &blocks, attn_kvcache_fwd_kernel<T, D, RowWarps>, Layout<RowWarps>::kThreads,
                   Smem<D, RowWarps>::kBytes),
               "attention_with_kvcache: cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  }
};

int blocks_per_sm(int64_t head_dim, int row_warps) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "attention_with_kvcache: cudaGetDevice");
  const int d = head_dim == 32 ? 0 : head_dim == 64 ? 1 : 2;
  const int w = row_warps == 1 ? 0 : row_warps == 2 ? 1 : row_warps == 4 ? 2 : 3;
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int known = g_occupancy[device][d][w].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  Occupancy occupancy;
  dispatch(kFloat16, head_dim, row_warps, occupancy);
  const int blocks = std::max(1, occupancy.blocks);
  if (cached) g_occupancy[device][d][w].store(blocks, std::memory_order_relaxed);
  return blocks;
}

void check_head_dim(int64_t head_dim) {
  check_arg(head_dim == 32 || head_dim == 64 || head_dim == 128, "head_dim",
            "32, 64 or 128, got " + std::to_string(head_dim));
}

}  // namespace

int64_t attention_with_kvcache_num_splits(int64_t batch, int64_t heads_kv, int64_t rows,
                                          int64_t max_seqlen, int64_t head_dim,
                                          int64_t row_tiles_per_block, int64_t sm_count,
                                          int64_t ctas_per_sm) {
  check_arg(batch >= 0 && heads_kv >= 0 && rows >= 0 && max_seqlen >= 0, "shape",
            "non-negative sizes");
  check_head_dim(head_dim);
  check_arg(row_tiles_per_block >= 0 && sm_count >= 0 && ctas_per_sm >= 0, "sm_count",
            "row_tiles_per_block, sm_count and ctas_per_sm >= 0 (0: from the device)");
  const int row_warps = row_warps_for(rows, row_tiles_per_block);
  const int64_t ctas = batch * heads_kv * row_blocks_for(rows, row_warps);
  if (sm_count == 0) sm_count = cached_device_attribute(cudaDevAttrMultiProcessorCount, g_sm_count);
  if (ctas_per_sm == 0) ctas_per_sm = blocks_per_sm(head_dim, row_warps);
  return num_splits_heuristic(ctas, rows, max_seqlen, sm_count, ctas_per_sm);
}

AttentionLaunchShape attention_with_kvcache_launch_shape(int64_t rows, int64_t head_dim,
                                                         int64_t row_tiles_per_block) {
  check_arg(rows >= 0 && row_tiles_per_block >= 0, "rows", "rows, row_tiles_per_block >= 0");
  check_head_dim(head_dim);
  const int row_warps = row_warps_for(rows, row_tiles_per_block);
  return {row_warps, fwd_threads(row_warps), int64_t(fwd_smem_bytes(head_dim, row_warps)),
          row_blocks_for(rows, row_warps)};
}

void attention_with_kvcache(
    uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_new, uintptr_t v_new,
    uintptr_t cache_seqlens, uintptr_t rotary_cos, uintptr_t rotary_sin, uintptr_t out,
    uintptr_t o_part, uintptr_t lse_part, int64_t batch, int64_t seqlen_q, int64_t heads_q,
    int64_t heads_kv, int64_t head_dim, int64_t max_seqlen, int64_t rotary_rows,
    Strides3 q_strides, Strides3 k_cache_strides, Strides3 v_cache_strides,
    Strides3 k_new_strides, Strides3 v_new_strides, Strides3 out_strides, int64_t cos_stride,
    int64_t sin_stride, int dtype, int rotary_dtype, double softmax_scale, int64_t num_splits,
    int64_t row_tiles_per_block, uintptr_t stream) {
  // Memory-safety checks only; everything else is validated in Python.
  check_arg(row_tiles_per_block >= 0, "row_tiles_per_block",
            ">= 0, got " + std::to_string(row_tiles_per_block));
  const int64_t* const strides[6] = {q_strides.data(),       k_cache_strides.data(),
                                     v_cache_strides.data(), k_new_strides.data(),
                                     v_new_strides.data(),   out_strides.data()};
  const Params p = make_params(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rotary_cos,
                               rotary_sin, out, o_part, lse_part, batch, seqlen_q, heads_q,
                               heads_kv, head_dim, max_seqlen, rotary_rows, strides, cos_stride,
                               sin_stride, dtype, rotary_dtype, softmax_scale, num_splits);
  if (batch == 0 || p.rows == 0) return;

  // Checks the device (and the driver) before anything runs: RuntimeError without a GPU.
  const int major = cached_device_attribute(cudaDevAttrComputeCapabilityMajor, g_cc_major);
  if (major < 8) {
    throw std::runtime_error("attention_with_kvcache: needs compute capability >= 8.0, got " +
                             std::to_string(major) + ".x");
  }
  const int row_warps = row_warps_for(p.rows, row_tiles_per_block);
  GpuLaunch launch{p, batch * heads_kv, row_blocks_for(p.rows, row_warps),
                   reinterpret_cast<cudaStream_t>(stream)};
  dispatch(dtype, head_dim, row_warps, launch);
}

}  // namespace lsk
