// A fused Llama decoder layer for the CPU, float32, raw pointers (no torch).
//
// Contract (the op in layerskip_kernels/ops/llama_layer.py checks it; this code repeats only
// the memory-safety checks):
//   T = batch * seqlen tokens, token t = b * seqlen + i (row b, new position i < seqlen <= 16)
//   x, residual (may be null)      (T, dim) rows at x_row / residual_row floats apart
//   w_in, w_post                   (dim,)
//   w_qkv                          (heads_q*D + 2*heads_kv*D, dim) contiguous (nn.Linear: out x in)
//   w_o                            (dim, heads_q*D) contiguous
//   w_gate_up                      (2*hidden, dim) contiguous: gate rows, then up rows
//   w_down                         (dim, hidden) contiguous
//   k_cache, v_cache               (batch, max_seqlen, heads_kv, D), strides in floats for
//                                  b, s, h; the last dim contiguous. Written at rows
//                                  cache_seqlens[b] + i (k after RoPE); slots at or past
//                                  cache_seqlens[b] + seqlen are never read.
//   cache_seqlens                  (batch,) int32, not modified
//   rotary_cos, rotary_sin         (rotary_rows, D/2) rows *_stride floats apart, or null (no RoPE)
//   delta, h (outputs)             (T, dim) contiguous
// Math (float32, fp32 accumulation):
//   h = x + residual; y = rms_norm(h) * w_in; q, k, v = y @ w_qkv^T
//   a = softmax(rope(q) . rope(k)^T * scale, bottom-right causal) @ v   (GQA: q head j uses
//       KV head j / (heads_q / heads_kv))
//   h = h + a @ w_o^T; y = rms_norm(h) * w_post; g, u = y @ w_gate_up^T
//   delta = (silu(g) * u) @ w_down^T
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lsk_cpu {

constexpr int64_t kMaxQueries = 16;  // the most new positions per row (seqlen) a call takes

struct LayerArgs {
  const float* x;
  const float* residual;  // null: h = x
  int64_t x_row, residual_row;
  const float* w_in;
  const float* w_qkv;
  const float* w_o;
  const float* w_post;
  const float* w_gate_up;
  const float* w_down;
  float* k_cache;
  float* v_cache;
  int64_t k_strides[3], v_strides[3];  // batch, position, head (floats)
  const int32_t* cache_seqlens;
  const float* rotary_cos;  // null: no RoPE
  const float* rotary_sin;
  int64_t cos_stride, sin_stride, rotary_rows;
  float* delta;
  float* h;
  int64_t batch, seqlen, dim, heads_q, heads_kv, head_dim, hidden, max_seqlen;
  float eps, softmax_scale;
};

// Runs the layer; throws std::invalid_argument when a shape or a cache length would make it
// read or write out of bounds.
void llama_layer(const LayerArgs& a);

// n layers in one call (a decode step's stack): layer i runs with first's shapes and inputs
// replaced by weights[6 i .. 6 i + 6) (w_in, w_qkv, w_o, w_post, w_gate_up, w_down),
// k_caches[i], v_caches[i] (same strides as first's), its x / residual being layer i-1's
// (delta, h); the last layer writes first.delta and first.h. Saves the caller's per-layer
// round trip; the results are those of n llama_layer calls, bit for bit.
void llama_layers(const LayerArgs& first, int64_t n, const uintptr_t* weights,
                  const uintptr_t* k_caches, const uintptr_t* v_caches);

// The shared head's greedy token: for each of `rows` hidden states h (dim floats, h_row apart),
// argmax over the vocabulary of lm_head(rms_norm(h) * norm_weight); ties go to the lowest index.
// tokens: int64 (rows,), max_logit: float (rows,); max_prob (rows,), unless null: the softmax's
// largest probability, 1 / sum_v exp(logit_v - max_logit).
void draft_head_argmax(const float* h, int64_t rows, int64_t h_row, int64_t dim,
                       const float* norm_weight, float eps, const float* lm_head, int64_t vocab,
                       int64_t* tokens, float* max_logit, float* max_prob = nullptr);

// Threads the kernels use (the caller's thread and n - 1 pool threads); 1 runs inline.
void set_num_threads(int n);
int num_threads();

// The instruction set the kernels run with: the widest the CPU has ("avx512", "avx2",
// "generic"), unless set_isa() picked another of available_isas() (to test every path).
const char* isa();
std::vector<std::string> available_isas();
void set_isa(const std::string& name);

}  // namespace lsk_cpu
