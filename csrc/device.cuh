// The device primitives the kernels use, in one place, so that one kernel source compiles two
// ways:
//   nvcc (the extension): PTX and CUDA intrinsics, exactly as written here;
//   a host C++ compiler with LSK_EMULATE (tests only): csrc/emulate/simt.hpp runs every thread
//   of a block as a fiber and checks what the GPU would not report: out-of-bounds and
//   misaligned accesses, shared-memory races (happens-before over the barriers), warp
//   collectives that not every lane reaches, reads of cp.async data before it was waited for,
//   and global words written twice or read by another block than their writer.
// Memory is read and written through ld_/st_global and ld_/st_shared so that the emulator sees
// every access; on the GPU they are plain loads and stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(LSK_EMULATE)
#include <cmath>
#include "emulate/simt.hpp"
#define LSK_DYNAMIC_SMEM(name) unsigned char* name = ::lsk::emu::dynamic_smem()
#define threadIdx (::lsk::emu::thread_idx())
#define blockIdx (::lsk::emu::block_idx())
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#else
#define LSK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace lsk {

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

#if !defined(LSK_EMULATE)

template <typename V>
__device__ __forceinline__ V ld_global(const void* p) { return *static_cast<const V*>(p); }
template <typename V>
__device__ __forceinline__ void st_global(void* p, const V& v) { *static_cast<V*>(p) = v; }
template <typename V>
__device__ __forceinline__ V ld_shared(const void* p) { return *static_cast<const V*>(p); }
template <typename V>
__device__ __forceinline__ void st_shared(void* p, const V& v) { *static_cast<V*>(p) = v; }

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
__device__ __forceinline__ void sync_warp() { __syncwarp(); }
__device__ __forceinline__ void sync_block() { __syncthreads(); }
// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads, whole warps.
__device__ __forceinline__ void sync_named(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void device_trap() { __trap(); }

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared, bypassing L1; zero-fills (reads nothing) when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m. Lane l receives
// element (row l / 4, cols 2 (l % 4) + {0, 1}) of each matrix (.trans: of its transpose).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr))
               : "memory");
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators. With g = lane / 4, t = lane % 4:
// a[0]: (g, 2t..2t+1), a[1]: (g+8, 2t..), a[2]: (g, 2t+8..), a[3]: (g+8, 2t+8..);
// b0: (k 2t..2t+1, n g), b1: (k 2t+8.., n g); d[0..1]: (g, 2t..2t+1), d[2..3]: (g+8, 2t..).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

#else  // LSK_EMULATE: the same interface, run by the emulator (csrc/emulate/simt.hpp)

template <typename V>
inline V ld_global(const void* p) { return emu::load<V>(p, emu::Space::kGlobal); }
template <typename V>
inline void st_global(void* p, const V& v) { emu::store<V>(p, v, emu::Space::kGlobal); }
template <typename V>
inline V ld_shared(const void* p) { return emu::load<V>(p, emu::Space::kShared); }
template <typename V>
inline void st_shared(void* p, const V& v) { emu::store<V>(p, v, emu::Space::kShared); }
inline float shfl_xor(float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }
inline void sync_warp() { emu::sync_warp(); }
inline void sync_block() { emu::sync_block(); }
inline void sync_named(int id, int threads) { emu::sync_named(id, threads); }
inline void device_trap() { emu::trap(); }
inline void cp_async16(void* dst, const void* src, bool valid) { emu::cp_async16(dst, src, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() { emu::cp_async_wait(N); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* ptr) { emu::ldmatrix_x4(r, ptr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* ptr) {
  emu::ldmatrix_x4(r, ptr, true);
}
template <typename T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma16816(d, a, b0, b1, std::is_same_v<T, __half>);
}
inline float __fadd_rn(float a, float b) { return a + b; }  // built with -ffp-contract=off
inline float __fmul_rn(float a, float b) { return a * b; }

#endif

}  // namespace lsk
