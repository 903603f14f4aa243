#include "decoder.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace lsk_cpu {

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("Decoder (C++): " + what);
}

}  // namespace

Decoder::Decoder(DecoderModel model, DecoderState state)
    : m_(std::move(model)), s_(state), n_layers_(static_cast<int64_t>(m_.k_caches.size())) {
  require(n_layers_ >= 1 && m_.v_caches.size() == m_.k_caches.size()
              && m_.weights.size() == 6 * m_.k_caches.size(),
          "expected 6 weights, a k_cache and a v_cache per layer");
  require(m_.vocab >= 1 && m_.shapes.dim >= 1, "vocab and dim must be positive");
  require(s_.batch >= 1 && s_.max_drafts >= 0, "batch >= 1 and max_drafts >= 0");
  require(s_.emitted_row >= s_.max_drafts + 2, "emitted_row must be >= max_drafts + 2");
  reserve(s_.batch * (s_.max_drafts + 1));
  seqlens_.resize(s_.batch);
  for (int64_t i = 0; i < n_layers_; ++i) all_layers_.push_back(i);
}

void Decoder::reserve(int64_t positions) {
  if (static_cast<int64_t>(target_.size()) >= positions) return;
  x_.resize(positions * m_.shapes.dim);
  delta_.resize(x_.size());
  h_.resize(x_.size());
  max_logit_.resize(positions);
  max_prob_.resize(positions);
  target_.resize(positions);
}

void Decoder::embed(const int64_t* tokens, int64_t n, int64_t token_stride, float* x) const {
  const int64_t dim = m_.shapes.dim;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t t = tokens[b * token_stride];
    require(t >= 0 && t < m_.vocab, "token " + std::to_string(t) + " out of the vocabulary");
    std::memcpy(x + b * dim, m_.embed + t * dim, dim * sizeof(float));
  }
}

const float* Decoder::forward(const float* x, int64_t n, int64_t S, const int32_t* base,
                              int64_t offset, const int64_t* layers, int64_t count) {
  if (count == 0) return x;
  w_.clear();
  k_.clear();
  v_.clear();
  for (int64_t j = 0; j < count; ++j) {
    const int64_t i = layers[j];
    require(i >= 0 && i < n_layers_, "layer " + std::to_string(i) + " out of range");
    w_.insert(w_.end(), m_.weights.begin() + 6 * i, m_.weights.begin() + 6 * i + 6);
    k_.push_back(m_.k_caches[i]);
    v_.push_back(m_.v_caches[i]);
  }
  for (int64_t b = 0; b < n; ++b) seqlens_[b] = base[b] + static_cast<int32_t>(offset);
  LayerArgs a = m_.shapes;
  a.x = x;
  a.residual = nullptr;
  a.x_row = a.residual_row = a.dim;
  a.cache_seqlens = seqlens_.data();
  a.delta = delta_.data();
  a.h = h_.data();
  a.batch = n;
  a.seqlen = S;
  llama_layers(a, count, w_.data(), k_.data(), v_.data());
  const int64_t size = n * S * a.dim;
  for (int64_t j = 0; j < size; ++j) h_[j] += delta_[j];  // the layers' output: delta + h
  return h_.data();
}

const float* Decoder::forward_split(const float* x, int64_t n, int64_t S, int64_t offset,
                                   const int64_t* layers, int64_t count,
                                   const std::vector<int64_t>& shadow, int64_t k, int64_t at) {
  const int64_t dim = m_.shapes.dim;
  int64_t start = 0;
  for (size_t j = 0; j < shadow.size(); ++j) {
    const int64_t cut = std::count_if(layers, layers + count,
                                      [&](int64_t layer) { return layer < shadow[j]; });
    if (cut <= start || cut >= count) continue;  // not inside these layers
    const float* h = forward(x, n, S, s_.cache_seqlens, offset, layers + start, cut - start);
    float* slot = shadow_h_.data() + j * n * (k + 1) * dim;
    for (int64_t b = 0; b < n; ++b)
      std::memcpy(slot + (b * (k + 1) + at) * dim, h + b * S * dim, S * dim * sizeof(float));
    std::copy(h, h + n * S * dim, x_.data());  // the next segment's input (forward writes h_)
    x = x_.data();
    start = cut;
  }
  return forward(x, n, S, s_.cache_seqlens, offset, layers + start, count - start);
}

void Decoder::head(const float* h, int64_t rows, int64_t* tokens, bool with_max_prob) {
  draft_head_argmax(h, rows, m_.shapes.dim, m_.shapes.dim, m_.norm, m_.norm_eps, m_.lm_head,
                    m_.vocab, tokens, max_logit_.data(), with_max_prob ? max_prob_.data() : nullptr);
}

bool Decoder::unsure(int64_t n, float confidence) const {
  for (int64_t b = 0; b < n; ++b)
    if (!(max_prob_[b] < confidence)) return false;
  return true;
}

void Decoder::check_round(int64_t n, int64_t k) const {
  // Checked before anything is written, so a refused call leaves the state as it was.
  require(n >= 1 && n <= s_.batch, "n must be in [1, batch]");
  require(k >= 0 && k <= s_.max_drafts && k + 1 <= kMaxQueries,
          "k must be in [0, max_drafts] and <= 15");
  for (int64_t b = 0; b < n; ++b) {
    const int64_t L = s_.cache_seqlens[b];
    require(L >= 0 && L + k + 1 <= m_.shapes.max_seqlen,
            "cache_seqlens[" + std::to_string(b) + "] + k + 1 must be in [k + 1, max_seqlen] "
            "(cache full)");
    require(s_.tokens[b] >= 0 && s_.tokens[b] < m_.vocab,
            "tokens[" + std::to_string(b) + "] out of the vocabulary");
  }
}

void Decoder::check_shadow(const std::vector<int64_t>& shadow, const int64_t* layers,
                           int64_t count, int64_t k, int64_t exit_layer) const {
  // Python's check_shadow (decoding/autoregressive.py), as memory safety needs it.
  const int64_t size = static_cast<int64_t>(shadow.size());
  require(k + 2 + size * (k + 1) <= s_.emitted_row,
          "shadow: " + std::to_string(size) + " exits do not fit an emitted row of " +
              std::to_string(s_.emitted_row) + " after " + std::to_string(k) + " drafts");
  for (int64_t j = 0; j < size; ++j) {
    const int64_t s = shadow[j];
    require(count > 0 && layers[0] < s && s <= layers[count - 1] && s != exit_layer &&
                (j == 0 || shadow[j - 1] < s),
            "shadow exits must be sorted, distinct, in [" +
                std::to_string(count > 0 ? layers[0] + 1 : 0) + ", " +
                std::to_string(count > 0 ? layers[count - 1] : 0) +
                "] and not the exit layer; got " + std::to_string(s));
  }
  for (int64_t i = 1; i < count && size > 0; ++i)
    require(layers[i - 1] < layers[i], "shadow exits need ascending layers");
}

void Decoder::write_shadow(int64_t n, int64_t k, const std::vector<int64_t>& shadow) {
  const int64_t dim = m_.shapes.dim, q = k + 1;
  for (size_t j = 0; j < shadow.size(); ++j) {
    head(shadow_h_.data() + j * n * q * dim, n * q, target_.data());
    for (int64_t b = 0; b < n; ++b)
      std::copy(target_.data() + b * q, target_.data() + (b + 1) * q,
                s_.emitted + b * s_.emitted_row + k + 2 + j * q);
  }
}

void Decoder::accept(int64_t n, int64_t k, const int64_t* target) {
  const int64_t draft_row = std::max<int64_t>(s_.max_drafts, 1), emitted_row = s_.emitted_row;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t* drafts = s_.drafts + b * draft_row;
    const int64_t* row_target = target + b * (k + 1);
    int64_t m = 0;
    while (m < k && drafts[m] == row_target[m]) ++m;
    int64_t* emitted = s_.emitted + b * emitted_row;
    std::copy(drafts, drafts + k, emitted);
    emitted[k] = row_target[m];
    emitted[k + 1] = m;
    if (s_.active[b]) s_.cache_seqlens[b] += static_cast<int32_t>(m + 1);
    s_.tokens[b] = row_target[m];
  }
}

void Decoder::prefill(const int64_t* tokens, int64_t n, int64_t S, int64_t token_row,
                      const int32_t* lengths, const std::vector<int64_t>& layers,
                      float* hidden) {
  // Checked before anything is written, so a refused call leaves the cache as it was.
  require(n >= 1 && n <= s_.batch, "n must be in [1, batch]");
  require(S >= 1 && S <= m_.shapes.max_seqlen && token_row >= S,
          "the prompts must be 1 to max_seqlen tokens long");
  for (int64_t b = 0; b < n; ++b) {
    require(lengths[b] >= 1 && lengths[b] <= S,
            "lengths[" + std::to_string(b) + "] must be in [1, " + std::to_string(S) + "]");
    for (int64_t i = 0; i < S; ++i) {
      const int64_t t = tokens[b * token_row + i];
      require(t >= 0 && t < m_.vocab, "token " + std::to_string(t) + " out of the vocabulary");
    }
  }
  for (const int64_t i : layers)
    require(i >= 0 && i < n_layers_, "layer " + std::to_string(i) + " out of range");
  const int64_t dim = m_.shapes.dim;
  reserve(n * kMaxQueries);
  std::vector<int32_t> start(n);
  for (int64_t first = 0; first < S; first += kMaxQueries) {
    const int64_t chunk = std::min(kMaxQueries, S - first);
    for (int64_t b = 0; b < n; ++b) {
      start[b] = static_cast<int32_t>(first);
      embed(tokens + b * token_row + first, chunk, 1, x_.data() + b * chunk * dim);
    }
    const float* h = forward(x_.data(), n, chunk, start.data(), 0, layers.data(), layers.size());
    for (int64_t b = 0; b < n; ++b) {
      const int64_t last = lengths[b] - 1 - first;
      if (last >= 0 && last < chunk)
        std::memcpy(hidden + b * dim, h + (b * chunk + last) * dim, dim * sizeof(float));
    }
  }
}

void Decoder::step(int64_t n, const std::vector<int64_t>& layers,
                   const std::vector<int64_t>& shadow) {
  check_round(n, 0);
  const int64_t count = static_cast<int64_t>(layers.size());
  check_shadow(shadow, layers.data(), count, 0, -1);
  shadow_h_.resize(shadow.size() * n * m_.shapes.dim);
  embed(s_.tokens, n, 1, x_.data());
  head(forward_split(x_.data(), n, 1, 0, layers.data(), count, shadow, 0, 0), n,
       target_.data());
  for (int64_t b = 0; b < n; ++b) {
    s_.tokens[b] = target_[b];
    s_.cache_seqlens[b] += s_.active[b] ? 1 : 0;
    if (shadow.empty()) continue;
    s_.emitted[b * s_.emitted_row] = target_[b];
    s_.emitted[b * s_.emitted_row + 1] = 0;
  }
  write_shadow(n, 0, shadow);
}

int64_t Decoder::exit_round(int64_t n, int64_t k, int64_t exit_layer, float confidence,
                            const std::vector<int64_t>& shadow) {
  check_round(n, k);
  require(exit_layer >= 1 && exit_layer <= n_layers_, "exit_layer must be in [1, n_layers]");
  require(shadow.empty() || confidence <= 0, "shadow exits need confidence 0 (a fixed k)");
  check_shadow(shadow, all_layers_.data(), n_layers_, k, exit_layer);
  shadow_h_.resize(shadow.size() * n * (k + 1) * m_.shapes.dim);
  const int64_t dim = m_.shapes.dim, exit_row = (s_.max_drafts + 1) * dim;
  const int64_t draft_row = std::max<int64_t>(s_.max_drafts, 1);
  const int64_t* current = s_.tokens;
  int64_t current_stride = 1;
  for (int64_t i = 0; i <= k; ++i) {  // the k drafts, then the last draft's exit state
    embed(current, n, current_stride, x_.data());
    const float* h = forward_split(x_.data(), n, 1, i, all_layers_.data(), exit_layer, shadow,
                                   k, i);
    for (int64_t b = 0; b < n; ++b)
      std::memcpy(s_.exit_cache + b * exit_row + i * dim, h + b * dim, dim * sizeof(float));
    if (i == k) break;
    head(h, n, target_.data(), confidence > 0);
    for (int64_t b = 0; b < n; ++b) s_.drafts[b * draft_row + i] = target_[b];
    current = s_.drafts + i;
    current_stride = draft_row;
    if (confidence > 0 && unsure(n, confidence)) k = i + 1;  // then the last exit state
  }
  for (int64_t b = 0; b < n; ++b)
    std::memcpy(x_.data() + b * (k + 1) * dim, s_.exit_cache + b * exit_row,
                (k + 1) * dim * sizeof(float));
  const float* h = forward_split(x_.data(), n, k + 1, 0, all_layers_.data() + exit_layer,
                                 n_layers_ - exit_layer, shadow, k, 0);
  head(h, n * (k + 1), target_.data());
  accept(n, k, target_.data());
  write_shadow(n, k, shadow);
  return k;
}

int64_t Decoder::skip_round(int64_t n, int64_t k, const std::vector<int64_t>& draft_layers,
                            float confidence) {
  check_round(n, k);
  const int64_t dim = m_.shapes.dim, draft_row = std::max<int64_t>(s_.max_drafts, 1);
  const int64_t* current = s_.tokens;
  int64_t current_stride = 1;
  for (int64_t i = 0; i < k; ++i) {
    embed(current, n, current_stride, x_.data());
    head(forward(x_.data(), n, 1, s_.cache_seqlens, i, draft_layers.data(),
                 draft_layers.size()),
         n, target_.data(), confidence > 0);
    for (int64_t b = 0; b < n; ++b) s_.drafts[b * draft_row + i] = target_[b];
    current = s_.drafts + i;
    current_stride = draft_row;
    if (confidence > 0 && unsure(n, confidence)) k = i + 1;
  }
  for (int64_t b = 0; b < n; ++b) {  // the pending token, then the drafts
    embed(s_.tokens + b, 1, 1, x_.data() + b * (k + 1) * dim);
    embed(s_.drafts + b * draft_row, k, 1, x_.data() + (b * (k + 1) + 1) * dim);
  }
  const float* h = forward(x_.data(), n, k + 1, s_.cache_seqlens, 0, all_layers_.data(),
                           n_layers_);
  head(h, n * (k + 1), target_.data());
  accept(n, k, target_.data());
  return k;
}

}  // namespace lsk_cpu
