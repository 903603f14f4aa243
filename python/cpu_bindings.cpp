// The pybind11 layer that exposes csrc/cpu/ as layerskip_kernels._cpu. No torch: tensors
// arrive as data_ptr() integers (0 for None), strides in elements. The GIL is released while a
// kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "decoder.h"
#include "llama_layer.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// A LayerArgs is filled in three parts: its cache strides and RoPE tables, its shapes (both
// fixed for a model and its cache), and the rows of one call.
void set_cache_and_rope(lsk_cpu::LayerArgs& a, py::tuple k_strides, py::tuple v_strides,
                        uintptr_t rotary_cos, uintptr_t rotary_sin, int64_t cos_stride,
                        int64_t sin_stride, int64_t rotary_rows) {
  for (int i = 0; i < 3; ++i) {
    a.k_strides[i] = k_strides[i].cast<int64_t>();
    a.v_strides[i] = v_strides[i].cast<int64_t>();
  }
  a.rotary_cos = ptr<const float>(rotary_cos);
  a.rotary_sin = ptr<const float>(rotary_sin);
  a.cos_stride = cos_stride;
  a.sin_stride = sin_stride;
  a.rotary_rows = rotary_rows;
}

void set_shapes(lsk_cpu::LayerArgs& a, int64_t dim, int64_t heads_q, int64_t heads_kv,
                int64_t head_dim, int64_t hidden, int64_t max_seqlen, float eps,
                float softmax_scale) {
  a.dim = dim;
  a.heads_q = heads_q;
  a.heads_kv = heads_kv;
  a.head_dim = head_dim;
  a.hidden = hidden;
  a.max_seqlen = max_seqlen;
  a.eps = eps;
  a.softmax_scale = softmax_scale;
}

void set_rows(lsk_cpu::LayerArgs& a, uintptr_t x, uintptr_t residual, int64_t x_row,
              int64_t residual_row, uintptr_t cache_seqlens, uintptr_t delta, uintptr_t h,
              int64_t batch, int64_t seqlen) {
  a.x = ptr<const float>(x);
  a.residual = ptr<const float>(residual);
  a.x_row = x_row;
  a.residual_row = residual_row;
  a.cache_seqlens = ptr<const int32_t>(cache_seqlens);
  a.delta = ptr<float>(delta);
  a.h = ptr<float>(h);
  a.batch = batch;
  a.seqlen = seqlen;
}

// Positional on purpose: the op's launcher calls this once per layer, where keyword matching
// would cost more than the S = 1 layer's arithmetic on small models.
void llama_layer(uintptr_t x, uintptr_t residual, int64_t x_row, int64_t residual_row,
                 uintptr_t w_in, uintptr_t w_qkv, uintptr_t w_o, uintptr_t w_post,
                 uintptr_t w_gate_up, uintptr_t w_down, uintptr_t k_cache, uintptr_t v_cache,
                 py::tuple k_strides, py::tuple v_strides, uintptr_t cache_seqlens,
                 uintptr_t rotary_cos, uintptr_t rotary_sin, int64_t cos_stride,
                 int64_t sin_stride, int64_t rotary_rows, uintptr_t delta, uintptr_t h,
                 int64_t batch, int64_t seqlen, int64_t dim, int64_t heads_q, int64_t heads_kv,
                 int64_t head_dim, int64_t hidden, int64_t max_seqlen, float eps,
                 float softmax_scale) {
  lsk_cpu::LayerArgs a{};
  set_rows(a, x, residual, x_row, residual_row, cache_seqlens, delta, h, batch, seqlen);
  set_cache_and_rope(a, k_strides, v_strides, rotary_cos, rotary_sin, cos_stride, sin_stride,
                     rotary_rows);
  set_shapes(a, dim, heads_q, heads_kv, head_dim, hidden, max_seqlen, eps, softmax_scale);
  a.w_in = ptr<const float>(w_in);
  a.w_qkv = ptr<const float>(w_qkv);
  a.w_o = ptr<const float>(w_o);
  a.w_post = ptr<const float>(w_post);
  a.w_gate_up = ptr<const float>(w_gate_up);
  a.w_down = ptr<const float>(w_down);
  a.k_cache = ptr<float>(k_cache);
  a.v_cache = ptr<float>(v_cache);
  py::gil_scoped_release release;
  lsk_cpu::llama_layer(a);
}

// llama_layer's arguments for a stack of layers: the weights and caches as lists of pointers
// (6 per layer: w_in, w_qkv, w_o, w_post, w_gate_up, w_down), one layer after the other.
void llama_layers(uintptr_t x, uintptr_t residual, int64_t x_row, int64_t residual_row,
                  const std::vector<uintptr_t>& weights, const std::vector<uintptr_t>& k_caches,
                  const std::vector<uintptr_t>& v_caches, py::tuple k_strides,
                  py::tuple v_strides, uintptr_t cache_seqlens, uintptr_t rotary_cos,
                  uintptr_t rotary_sin, int64_t cos_stride, int64_t sin_stride,
                  int64_t rotary_rows, uintptr_t delta, uintptr_t h, int64_t batch,
                  int64_t seqlen, int64_t dim, int64_t heads_q, int64_t heads_kv,
                  int64_t head_dim, int64_t hidden, int64_t max_seqlen, float eps,
                  float softmax_scale) {
  const size_t n = k_caches.size();
  if (n == 0 || v_caches.size() != n || weights.size() != 6 * n)
    throw std::invalid_argument("llama_layers: expected 6 weights, a k_cache and a v_cache per layer");
  lsk_cpu::LayerArgs a{};
  set_rows(a, x, residual, x_row, residual_row, cache_seqlens, delta, h, batch, seqlen);
  set_cache_and_rope(a, k_strides, v_strides, rotary_cos, rotary_sin, cos_stride, sin_stride,
                     rotary_rows);
  set_shapes(a, dim, heads_q, heads_kv, head_dim, hidden, max_seqlen, eps, softmax_scale);
  py::gil_scoped_release release;
  lsk_cpu::llama_layers(a, static_cast<int64_t>(n), weights.data(), k_caches.data(),
                        v_caches.data());
}

void draft_head_argmax(uintptr_t h, int64_t rows, int64_t h_row, int64_t dim,
                       uintptr_t norm_weight, float eps, uintptr_t lm_head, int64_t vocab,
                       uintptr_t tokens, uintptr_t max_logit) {
  py::gil_scoped_release release;
  lsk_cpu::draft_head_argmax(ptr<const float>(h), rows, h_row, dim, ptr<const float>(norm_weight),
                             eps, ptr<const float>(lm_head), vocab, ptr<int64_t>(tokens),
                             ptr<float>(max_logit));
}

// A Decoder over a model's weights and one decode state's buffers (see csrc/cpu/decoder.h);
// built once per state, so keywords cost nothing here.
lsk_cpu::Decoder make_decoder(std::vector<uintptr_t> weights, std::vector<uintptr_t> k_caches,
                              std::vector<uintptr_t> v_caches, py::tuple k_strides,
                              py::tuple v_strides, int64_t max_seqlen, uintptr_t rotary_cos,
                              uintptr_t rotary_sin, int64_t cos_stride, int64_t sin_stride,
                              int64_t rotary_rows, int64_t dim, int64_t heads_q,
                              int64_t heads_kv, int64_t head_dim, int64_t hidden, float eps,
                              float softmax_scale, uintptr_t embed, uintptr_t norm,
                              float norm_eps, uintptr_t lm_head, int64_t vocab, uintptr_t tokens,
                              uintptr_t cache_seqlens, uintptr_t active, uintptr_t exit_cache,
                              uintptr_t drafts, uintptr_t emitted, int64_t batch,
                              int64_t max_drafts, int64_t emitted_row) {
  lsk_cpu::DecoderModel model{};
  set_cache_and_rope(model.shapes, k_strides, v_strides, rotary_cos, rotary_sin, cos_stride,
                     sin_stride, rotary_rows);
  set_shapes(model.shapes, dim, heads_q, heads_kv, head_dim, hidden, max_seqlen, eps,
             softmax_scale);
  model.weights = std::move(weights);
  model.k_caches = std::move(k_caches);
  model.v_caches = std::move(v_caches);
  model.embed = ptr<const float>(embed);
  model.norm = ptr<const float>(norm);
  model.norm_eps = norm_eps;
  model.lm_head = ptr<const float>(lm_head);
  model.vocab = vocab;
  lsk_cpu::DecoderState state{ptr<int64_t>(tokens), ptr<int32_t>(cache_seqlens),
                              ptr<const uint8_t>(active), ptr<float>(exit_cache),
                              ptr<int64_t>(drafts), ptr<int64_t>(emitted), batch, max_drafts,
                              emitted_row};
  return lsk_cpu::Decoder(std::move(model), state);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "layerskip_kernels CPU kernels (float32, raw pointers, no torch)";
  m.def("llama_layer", &llama_layer,
        "One fused Llama decoder layer over 1..16 new positions per row (see csrc/cpu/llama_layer.h).");
  m.def("llama_layers", &llama_layers,
        "A stack of fused layers in one call (a decode step's layers; see csrc/cpu/llama_layer.h).");
  m.def("draft_head_argmax", &draft_head_argmax,
        "Greedy token of the shared head: argmax of lm_head(rms_norm(h)), ties to the lowest index.");
  py::class_<lsk_cpu::Decoder>(m, "Decoder",
      "Greedy decode steps and self-speculative rounds over one decode state, one call each "
      "(see csrc/cpu/decoder.h).")
      .def(py::init(&make_decoder), py::arg("weights"), py::arg("k_caches"), py::arg("v_caches"),
           py::arg("k_strides"), py::arg("v_strides"), py::arg("max_seqlen"),
           py::arg("rotary_cos"), py::arg("rotary_sin"), py::arg("cos_stride"),
           py::arg("sin_stride"), py::arg("rotary_rows"), py::arg("dim"), py::arg("heads_q"),
           py::arg("heads_kv"), py::arg("head_dim"), py::arg("hidden"), py::arg("eps"),
           py::arg("softmax_scale"), py::arg("embed"), py::arg("norm"), py::arg("norm_eps"),
           py::arg("lm_head"), py::arg("vocab"), py::arg("tokens"), py::arg("cache_seqlens"),
           py::arg("active"), py::arg("exit_cache"), py::arg("drafts"), py::arg("emitted"),
           py::arg("batch"), py::arg("max_drafts"), py::arg("emitted_row"))
      .def("prefill",
           [](lsk_cpu::Decoder& d, uintptr_t tokens, int64_t n, int64_t S, int64_t token_row,
              uintptr_t lengths, const std::vector<int64_t>& layers, uintptr_t hidden) {
             py::gil_scoped_release release;
             d.prefill(ptr<const int64_t>(tokens), n, S, token_row, ptr<const int32_t>(lengths),
                       layers, ptr<float>(hidden));
           },
           py::arg("tokens"), py::arg("n"), py::arg("S"), py::arg("token_row"),
           py::arg("lengths"), py::arg("layers"), py::arg("hidden"))
      .def("step", &lsk_cpu::Decoder::step, py::arg("n"), py::arg("layers"),
           py::arg("shadow") = std::vector<int64_t>{},
           py::call_guard<py::gil_scoped_release>())
      .def("exit_round", &lsk_cpu::Decoder::exit_round, py::arg("n"), py::arg("k"),
           py::arg("exit_layer"), py::arg("confidence") = 0.0f,
           py::arg("shadow") = std::vector<int64_t>{},
           py::call_guard<py::gil_scoped_release>())
      .def("skip_round", &lsk_cpu::Decoder::skip_round, py::arg("n"), py::arg("k"),
           py::arg("draft_layers"), py::arg("confidence") = 0.0f,
           py::call_guard<py::gil_scoped_release>());
  m.def("set_num_threads", &lsk_cpu::set_num_threads, py::arg("n"),
        "Threads of the CPU kernels (the caller and n - 1 persistent pool threads).");
  m.def("num_threads", &lsk_cpu::num_threads);
  m.def("isa", &lsk_cpu::isa, "The instruction set the kernels run with: avx512, avx2 or generic.");
  m.def("available_isas", &lsk_cpu::available_isas, "The instruction sets this CPU can run.");
  m.def("set_isa", &lsk_cpu::set_isa, py::arg("name"),
        "Run the kernels with another available instruction set (tests every path).");
}
