// Launcher declarations of csrc/attention_with_kvcache.cu (host code only, so that
// python/bindings.cpp can include it). The contract is in that file's header.
#pragma once

#include <array>
#include <cstdint>

namespace lsk {

namespace attn {
// The limits the bindings publish (layerskip_kernels._C.ATTENTION_*), used by the kernels.
constexpr int kMaxQueries = 16;   // new queries per row
constexpr int kMaxSplits = 128;   // split-KV chunks
constexpr int kMaxRowWarps = 8;   // 16-row tiles per block: 128 rows read each key once
constexpr int kHeadDims[] = {32, 64, 128};
}  // namespace attn

// Strides in elements of dims 0..2 of a (B, S, H, D) tensor whose last dim is contiguous.
using Strides3 = std::array<int64_t, 3>;

// How many blocks share one (row, KV head, row block)'s keys (num_splits_heuristic in
// attention_with_kvcache_kernel.cuh): 1 when the blocks of one split already fill every
// resident slot of the device, else about two waves of resident blocks, keeping >= 256 keys
// (and >= 16 per query row) of max_seqlen per split, at most 128. rows = Hq / Hkv * Sq.
// sm_count and ctas_per_sm (blocks of the kernel resident per SM) come from the current device
// when 0 (queried once per device, then cached); given both, no device is touched.
int64_t attention_with_kvcache_num_splits(int64_t batch, int64_t heads_kv, int64_t rows,
                                          int64_t max_seqlen, int64_t head_dim,
                                          int64_t row_tiles_per_block, int64_t sm_count,
                                          int64_t ctas_per_sm);

// How a call with `rows` query rows per (b, KV head) is launched: 16-row tiles per block,
// threads per block, dynamic shared memory of the forward kernel, row blocks (grid z).
struct AttentionLaunchShape {
  int64_t row_tiles_per_block, threads, smem_bytes, row_blocks;
};
AttentionLaunchShape attention_with_kvcache_launch_shape(int64_t rows, int64_t head_dim,
                                                         int64_t row_tiles_per_block);

void attention_with_kvcache(
    uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_new, uintptr_t v_new,
    uintptr_t cache_seqlens, uintptr_t rotary_cos, uintptr_t rotary_sin, uintptr_t out,
    uintptr_t o_part, uintptr_t lse_part, int64_t batch, int64_t seqlen_q, int64_t heads_q,
    int64_t heads_kv, int64_t head_dim, int64_t max_seqlen, int64_t rotary_rows,
    Strides3 q_strides, Strides3 k_cache_strides, Strides3 v_cache_strides,
    Strides3 k_new_strides, Strides3 v_new_strides, Strides3 out_strides, int64_t cos_stride,
    int64_t sin_stride, int dtype, int rotary_dtype, double softmax_scale, int64_t num_splits,
    int64_t row_tiles_per_block, uintptr_t stream);

}  // namespace lsk
