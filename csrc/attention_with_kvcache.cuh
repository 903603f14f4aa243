// Launcher declarations of csrc/attention_with_kvcache.cu (host code only, so that
// python/bindings.cpp can include it). The contract is in that file's header.
#pragma once

#include <array>
#include <cstdint>

namespace lsk {

// Strides in elements of dims 0..2 of a (B, S, H, D) tensor whose last dim is contiguous.
using Strides3 = std::array<int64_t, 3>;

// How many programs share one (row, KV head, 16-query-row tile)'s keys: 1 when the launch
// already has a block per SM, else enough to fill the SMs, keeping >= 256 keys per split
// (of max_seqlen: the lengths live on the device), at most 64. Reads the current device's
// SM count (queried once per device, then cached).
int64_t attention_with_kvcache_num_splits(int64_t batch, int64_t heads_kv, int64_t rows,
                                          int64_t max_seqlen);

void attention_with_kvcache(
    uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_new, uintptr_t v_new,
    uintptr_t cache_seqlens, uintptr_t rotary_cos, uintptr_t rotary_sin, uintptr_t out,
    uintptr_t o_part, uintptr_t lse_part, int64_t batch, int64_t seqlen_q, int64_t heads_q,
    int64_t heads_kv, int64_t head_dim, int64_t max_seqlen, int64_t rotary_rows,
    Strides3 q_strides, Strides3 k_cache_strides, Strides3 v_cache_strides,
    Strides3 k_new_strides, Strides3 v_new_strides, Strides3 out_strides, int64_t cos_stride,
    int64_t sin_stride, int dtype, int rotary_dtype, double softmax_scale, int64_t num_splits,
    uintptr_t stream);

}  // namespace lsk
