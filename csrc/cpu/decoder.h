// Greedy decoding steps on the CPU, each in one call: a model's weights bound to one decode
// state's buffers (layerskip_kernels/decoding/state.py), the CPU's counterpart of replaying a
// captured CUDA graph. Every step is the Python one (decoding/autoregressive.py decode_step,
// decoding/self_speculative.py greedy_round) made of the same kernels (llama_layers,
// draft_head_argmax), so the tokens are the same, bit for bit; what it saves is the Python
// around them: on small models a round's glue costs as much as its arithmetic.
#pragma once

#include <cstdint>
#include <vector>

#include "llama_layer.h"

namespace lsk_cpu {

struct DecoderModel {
  LayerArgs shapes;  // dims, heads, eps, softmax scale, RoPE tables, cache strides and length
  std::vector<uintptr_t> weights;  // 6 per layer, as llama_layers takes them
  std::vector<uintptr_t> k_caches, v_caches;  // each layer's (batch, max_seqlen, heads_kv, D)
  const float* embed;    // (vocab, dim)
  const float* norm;     // (dim,): the final norm of the shared head
  float norm_eps;
  const float* lm_head;  // (vocab, dim)
  int64_t vocab;
};

// A DecodeState's buffers, each contiguous, `batch` rows (a step runs on the first n).
struct DecoderState {
  int64_t* tokens;           // (batch,): each row's pending token, not yet in the cache
  int32_t* cache_seqlens;    // (batch,)
  const uint8_t* active;     // (batch,) bool: rows that advance
  float* exit_cache;         // (batch, max_drafts + 1, dim)
  int64_t* drafts;           // (batch, max(max_drafts, 1))
  int64_t* emitted;          // (batch, emitted_row): drafts, next token, accepted count, then
                             // shadow tokens (Rows.emitted's layout)
  int64_t batch, max_drafts;
  int64_t emitted_row;       // elements between rows of emitted, >= max_drafts + 2
};

class Decoder {
 public:
  Decoder(DecoderModel model, DecoderState state);

  // The prompts (tokens: n rows of S ids, right-padded, `token_row` apart) into the cache
  // through `layers`, kMaxQueries positions of every row at a time (each chunk attends to the
  // ones before it in the cache); hidden (n, dim) gets row b's hidden state at position
  // lengths[b] - 1, before the head. The state's tokens and cache lengths are not touched.
  void prefill(const int64_t* tokens, int64_t n, int64_t S, int64_t token_row,
               const int32_t* lengths, const std::vector<int64_t>& layers, float* hidden);

  // decode_step: each row's pending token through `layers`; its greedy token becomes the
  // pending one; active rows advance by one. shadow: exits whose tokens (the head after the
  // layers below each) go to emitted as a round's with k = 0 (the token, 0, then theirs).
  void step(int64_t n, const std::vector<int64_t>& layers,
            const std::vector<int64_t>& shadow = {});

  // greedy_round with ExitDraft: k drafts through layers [0, exit_layer) (their exit hidden
  // states kept), layers [exit_layer, n_layers) verify the k + 1 positions in one pass, the
  // longest agreeing prefix and the full model's next token are accepted; `emitted` holds them.
  // confidence > 0: at most k drafts, stopping after the first draft where no row's largest
  // softmax probability reaches it (sampled_round's greedy rule). Returns the drafts made.
  // shadow (confidence 0 only): exits whose tokens at each of the k + 1 positions, the head
  // of the hidden states after the layers below each (drafting computes them below
  // exit_layer, verification above), go to emitted after the round's columns: exit
  // shadow[j]'s at position i in column k + 2 + j * (k + 1) + i.
  int64_t exit_round(int64_t n, int64_t k, int64_t exit_layer, float confidence = 0.0f,
                     const std::vector<int64_t>& shadow = {});

  // greedy_round with SkipDraft: k drafts through `draft_layers`, every layer verifies.
  int64_t skip_round(int64_t n, int64_t k, const std::vector<int64_t>& draft_layers,
                     float confidence = 0.0f);

 private:
  // The hidden states (n * S rows of dim) after `layers` of x, row b's positions at
  // base[b] + offset + i; x itself when there are no layers.
  const float* forward(const float* x, int64_t n, int64_t S, const int32_t* base, int64_t offset,
                       const int64_t* layers, int64_t count);
  // forward() of `layers`, in segments split at each shadow exit inside them: slot j of
  // shadow_h_ (n rows of k + 1 positions) gets the hidden states after the layers below
  // shadow[j], row b's S positions from position `at`.
  const float* forward_split(const float* x, int64_t n, int64_t S, int64_t offset,
                             const int64_t* layers, int64_t count,
                             const std::vector<int64_t>& shadow, int64_t k, int64_t at);
  void reserve(int64_t positions);  // work buffers for n * S positions
  void embed(const int64_t* tokens, int64_t n, int64_t token_stride, float* x) const;
  void head(const float* h, int64_t rows, int64_t* tokens, bool with_max_prob = false);
  bool unsure(int64_t n, float confidence) const;  // no row's max_prob_ reaches confidence
  void accept(int64_t n, int64_t k, const int64_t* target);  // greedy_accept + finish_round
  void check_round(int64_t n, int64_t k) const;
  void check_shadow(const std::vector<int64_t>& shadow, const int64_t* layers, int64_t count,
                    int64_t k, int64_t exit_layer) const;
  void write_shadow(int64_t n, int64_t k, const std::vector<int64_t>& shadow);

  DecoderModel m_;
  DecoderState s_;
  int64_t n_layers_;
  std::vector<float> x_, delta_, h_, max_logit_, max_prob_, shadow_h_;
  std::vector<int32_t> seqlens_;
  std::vector<int64_t> target_, all_layers_;
  std::vector<uintptr_t> w_, k_, v_;
};

}  // namespace lsk_cpu
