// Shared by every csrc/<op>.cu and python/bindings.cpp: dtype codes, the CUDA error
// check and the argument check (each op declares its launcher in csrc/<op>.cuh). No torch: tensors arrive as raw device
// pointers (uintptr_t), shapes, a dtype code and a cudaStream_t passed as an integer.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace lsk {

// Keep in sync with DTYPE_CODES in layerskip_kernels/_ext.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int64_t dtype_size(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16:
    case kBFloat16: return 2;
    default:
      throw std::invalid_argument("dtype: expected 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                  std::to_string(dtype));
  }
}

// Turns a CUDA error (including "no driver" / "no device") into an exception;
// pybind11 surfaces std::runtime_error as RuntimeError.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": CUDA error " + std::to_string(int(err)) +
                             " (" + cudaGetErrorName(err) + "): " + cudaGetErrorString(err));
  }
}

inline void check_arg(bool ok, const char* arg, const std::string& expected) {
  if (!ok) throw std::invalid_argument(std::string(arg) + ": expected " + expected);
}

}  // namespace lsk
