// The thin pybind11 layer that exposes csrc/ as layerskip_kernels._C. No torch:
// tensors arrive as data_ptr() integers, streams as cudaStream_t integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "attention_with_kvcache.cuh"
#include "common.cuh"

namespace py = pybind11;

#ifndef LAYERSKIP_CUDA_ARCHS
#define LAYERSKIP_CUDA_ARCHS ""
#endif

namespace {

// 0 when there is no driver or no device; never throws.
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the error so it does not leak into the next call
    return 0;
  }
  return n;
}

// The architectures this module was built for, in CMake's CUDA_ARCHITECTURES syntax
// (the build passes them space-separated).
std::vector<std::string> compiled_archs() {
  std::vector<std::string> archs;
  std::stringstream list(LAYERSKIP_CUDA_ARCHS);
  for (std::string arch; list >> arch;) archs.push_back(arch);
  return archs;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "layerskip_kernels CUDA kernels (raw pointers, no torch)";
  m.def("device_count", &device_count, "Number of CUDA devices; 0 without a driver or device.");
  m.def("compiled_archs", &compiled_archs, "CUDA architectures compiled into this module.");
  m.attr("ATTENTION_MAX_QUERIES") = lsk::attn::kMaxQueries;
  m.attr("ATTENTION_MAX_SPLITS") = lsk::attn::kMaxSplits;
  m.attr("ATTENTION_MAX_ROW_TILES") = lsk::attn::kMaxRowWarps;
  m.attr("ATTENTION_HEAD_DIMS") = py::tuple(py::cast(std::vector<int>(
      std::begin(lsk::attn::kHeadDims), std::end(lsk::attn::kHeadDims))));
  m.def("attention_with_kvcache_num_splits", &lsk::attention_with_kvcache_num_splits,
        "Split-KV count of attention_with_kvcache for a shape. sm_count and ctas_per_sm (blocks "
        "resident per SM): 0 = the current device's; given both, no device is needed.",
        py::arg("batch"), py::arg("heads_kv"), py::arg("rows"), py::arg("max_seqlen"),
        py::arg("head_dim"), py::arg("row_tiles_per_block") = 0, py::arg("sm_count") = 0,
        py::arg("ctas_per_sm") = 0);
  m.def(
      "attention_with_kvcache_launch_shape",
      [](int64_t rows, int64_t head_dim, int64_t row_tiles_per_block) {
        const auto s =
            lsk::attention_with_kvcache_launch_shape(rows, head_dim, row_tiles_per_block);
        py::dict d;
        d["row_tiles_per_block"] = s.row_tiles_per_block;
        d["threads"] = s.threads;
        d["smem_bytes"] = s.smem_bytes;
        d["row_blocks"] = s.row_blocks;
        return d;
      },
      "How attention_with_kvcache launches `rows` = Hq / Hkv * Sq query rows per (b, KV head).",
      py::arg("rows"), py::arg("head_dim"), py::arg("row_tiles_per_block") = 0);
  m.def("attention_with_kvcache", &lsk::attention_with_kvcache,
        "RoPE + K/V append at cache_seqlens[b] + attention (fp16/bf16, D 32/64/128, Sq <= 16).",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_new"), py::arg("v_new"),
        py::arg("cache_seqlens"), py::arg("rotary_cos"), py::arg("rotary_sin"), py::arg("out"),
        py::arg("o_part"), py::arg("lse_part"), py::arg("batch"), py::arg("seqlen_q"),
        py::arg("heads_q"), py::arg("heads_kv"), py::arg("head_dim"), py::arg("max_seqlen"),
        py::arg("rotary_rows"), py::arg("q_strides"), py::arg("k_cache_strides"),
        py::arg("v_cache_strides"), py::arg("k_new_strides"), py::arg("v_new_strides"),
        py::arg("out_strides"), py::arg("cos_stride"), py::arg("sin_stride"), py::arg("dtype"),
        py::arg("rotary_dtype"), py::arg("softmax_scale"), py::arg("num_splits"),
        py::arg("row_tiles_per_block"), py::arg("stream"));
}
