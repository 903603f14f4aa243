// The thin pybind11 layer that exposes csrc/ as layerskip_kernels._C. No torch:
// tensors arrive as data_ptr() integers, streams as cudaStream_t integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

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
  m.def("kv_cache_append", &lsk::kv_cache_append, "Append K/V rows at cache_seqlens[b].",
        py::arg("k_cache"), py::arg("v_cache"), py::arg("k_new"), py::arg("v_new"),
        py::arg("cache_seqlens"), py::arg("batch"), py::arg("max_seqlen"),
        py::arg("seqlen_new"), py::arg("heads"), py::arg("head_dim"), py::arg("dtype"),
        py::arg("stream"));
}
