// Test-only pybind11 module: attention_with_kvcache's kernels, compiled for the host with
// LSK_EMULATE from the very source the extension builds (attention_with_kvcache_kernel.cuh),
// run by the SIMT emulator (simt.hpp) on host memory. Its launch plan (checks, Params, row
// tiles per block, grid, instantiation table) is the GPU launcher's: make_params,
// row_warps_for, row_blocks_for and dispatch from the same header. Built on demand by
// tests/test_attention_with_kvcache.py (see emulator_module there), never installed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <array>
#include <tuple>
#include <vector>

#include "common.cuh"
#include "attention_with_kvcache_kernel.cuh"

namespace py = pybind11;

namespace lsk {
namespace {

using namespace attn;

struct EmulatedLaunch {
  const Params& p;
  int64_t batch_heads, row_blocks;
  std::vector<emu::Buffer>& buffers;
  emu::Options options;

  template <typename T, int D, int RowWarps>
  void run() {
    const emu::Dim3 grid{unsigned(batch_heads), unsigned(p.num_splits), unsigned(row_blocks)};
    emu::launch(grid, Layout<RowWarps>::kThreads, Smem<D, RowWarps>::kBytes,
                [&] { attn_kvcache_fwd_kernel<T, D, RowWarps>(p); }, buffers, options);
    if (p.num_splits > 1) {
      const emu::Dim3 merge_grid{unsigned(batch_heads * p.rows), 1, 1};
      emu::launch(merge_grid, kMergeThreads, kMergeSmemBytes,
                  [&] { attn_kvcache_merge_kernel<T, D>(p); }, buffers, options);
    }
  }
};

// Same arguments as _C.attention_with_kvcache (host pointers instead of device pointers),
// plus `buffers`: (name, data_ptr, nbytes, writable) of every tensor the kernels may touch.
// Returns what ran: row tiles per block, threads, row blocks, blocks emulated, ldmatrix
// phases (8 rows each) and how many of those had a shared-memory bank conflict.
py::dict emulate(
    uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_new, uintptr_t v_new,
    uintptr_t cache_seqlens, uintptr_t rotary_cos, uintptr_t rotary_sin, uintptr_t out,
    uintptr_t o_part, uintptr_t lse_part, int64_t batch, int64_t seqlen_q, int64_t heads_q,
    int64_t heads_kv, int64_t head_dim, int64_t max_seqlen, int64_t rotary_rows,
    std::array<int64_t, 3> q_strides, std::array<int64_t, 3> k_cache_strides,
    std::array<int64_t, 3> v_cache_strides, std::array<int64_t, 3> k_new_strides,
    std::array<int64_t, 3> v_new_strides, std::array<int64_t, 3> out_strides,
    int64_t cos_stride, int64_t sin_stride, int dtype, int rotary_dtype, double softmax_scale,
    int64_t num_splits, int64_t row_tiles_per_block,
    const std::vector<std::tuple<std::string, uintptr_t, int64_t, bool>>& buffers,
    int schedule, bool racecheck) {
  const int64_t* const strides[6] = {q_strides.data(),       k_cache_strides.data(),
                                     v_cache_strides.data(), k_new_strides.data(),
                                     v_new_strides.data(),   out_strides.data()};
  const Params p = make_params(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rotary_cos,
                               rotary_sin, out, o_part, lse_part, batch, seqlen_q, heads_q,
                               heads_kv, head_dim, max_seqlen, rotary_rows, strides, cos_stride,
                               sin_stride, dtype, rotary_dtype, softmax_scale, num_splits);
  const int row_warps = row_warps_for(p.rows, row_tiles_per_block);
  const int64_t row_blocks = row_blocks_for(p.rows, row_warps);
  emu::Stats stats;
  auto report = [&] {
    py::dict d;
    d["row_tiles_per_block"] = row_warps;
    d["threads"] = fwd_threads(row_warps);
    d["row_blocks"] = row_blocks;
    d["blocks"] = stats.blocks;
    d["ldmatrix_phases"] = stats.ldmatrix_phases;
    d["ldmatrix_conflicts"] = stats.ldmatrix_conflicts;
    return d;
  };
  if (batch == 0 || p.rows == 0) return report();
  std::vector<emu::Buffer> regions;
  for (const auto& [name, ptr, bytes, writable] : buffers) {
    emu::Buffer b;
    b.name = name;
    b.begin = ptr;
    b.end = ptr + uintptr_t(bytes);
    b.writable = writable;
    regions.push_back(std::move(b));
  }
  emu::Options options;
  options.schedule = schedule;
  options.racecheck = racecheck;
  options.stats = &stats;
  EmulatedLaunch launch{p, batch * heads_kv, row_blocks, regions, options};
  {
    py::gil_scoped_release release;
    dispatch(dtype, head_dim, row_warps, launch);
  }
  return report();
}


// A positive control of the emulator's ldmatrix and mma (and of the fragment addressing the
// attention kernel uses): one warp computes D (16 x 16, fp32) = A (16 x 32) B^T with B given as
// 16 rows of 32 (keys x dims), as S = Q K^T is computed, then E (16 x 32) = P V with P = A[:, :16]
// rounded and V = B, as O += P V is.
template <typename T>
void mma_probe_kernel(const T* a, const T* b, float* d, float* e) {
  constexpr int D = 32, kPitch = D + 8;
  LSK_DYNAMIC_SMEM(smem_raw);
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + 16 * kPitch;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int c = lane; c < 16 * D / 8; c += 32) {
    const int row = c / (D / 8), d0 = 8 * (c % (D / 8));
    st_shared(qs + row * kPitch + d0, ld_global<uint4>(a + row * D + d0));
    st_shared(ks + row * kPitch + d0, ld_global<uint4>(b + row * D + d0));
  }
  sync_warp();
  uint32_t qf[D / 16][4];
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], qs + q_frag_offset(lane, kk, kPitch));
  float s[2][4] = {};
  for (int nt = 0; nt < 2; ++nt) {
    uint32_t kb[4];
    ldmatrix_x4(kb, ks + k_frag_offset(lane, nt, 0, kPitch));
    mma16816<T>(s[nt], qf[0], kb[0], kb[1]);
    mma16816<T>(s[nt], qf[1], kb[2], kb[3]);
  }
  for (int nt = 0; nt < 2; ++nt) {
    for (int h = 0; h < 2; ++h) {
      st_global(d + (g + 8 * h) * 16 + 8 * nt + 2 * t, make_float2(s[nt][2 * h], s[nt][2 * h + 1]));
    }
  }
  float acc[D / 8][4] = {};
  for (int dt = 0; dt < D / 8; dt += 2) {
    uint32_t vb[4];
    ldmatrix_x4_trans(vb, ks + v_frag_offset(lane, dt, kPitch));
    mma16816<T>(acc[dt], qf[0], vb[0], vb[1]);
    mma16816<T>(acc[dt + 1], qf[0], vb[2], vb[3]);
  }
  for (int dt = 0; dt < D / 8; ++dt) {
    for (int h = 0; h < 2; ++h) {
      st_global(e + (g + 8 * h) * D + 8 * dt + 2 * t,
                make_float2(acc[dt][2 * h], acc[dt][2 * h + 1]));
    }
  }
}

void mma_probe(uintptr_t a, uintptr_t b, uintptr_t d, uintptr_t e, int dtype) {
  std::vector<emu::Buffer> buffers(4);
  const uintptr_t ptrs[] = {a, b, d, e};
  const size_t sizes[] = {16 * 32 * 2, 16 * 32 * 2, 16 * 16 * 4, 16 * 32 * 4};
  for (int k = 0; k < 4; ++k) {
    buffers[k].name = "probe" + std::to_string(k);
    buffers[k].begin = ptrs[k];
    buffers[k].end = ptrs[k] + sizes[k];
    buffers[k].writable = k >= 2;
  }
  auto body = [&] {
    if (dtype == kFloat16) {
      mma_probe_kernel(reinterpret_cast<const __half*>(a), reinterpret_cast<const __half*>(b),
                       reinterpret_cast<float*>(d), reinterpret_cast<float*>(e));
    } else {
      mma_probe_kernel(reinterpret_cast<const __nv_bfloat16*>(a),
                       reinterpret_cast<const __nv_bfloat16*>(b), reinterpret_cast<float*>(d),
                       reinterpret_cast<float*>(e));
    }
  };
  emu::launch(emu::Dim3{}, 32, 2 * 16 * 40 * 2, body, buffers, emu::Options{});
}


// Positive controls of the emulator's checks: small kernels with one deliberate bug each
// (and "none", the passing control). Two blocks of 64 threads; `data`: 256 floats, writable.
void bug_probe(const std::string& bug, uintptr_t data) {
  auto* g = reinterpret_cast<float*>(data);
  auto body = [&] {
    LSK_DYNAMIC_SMEM(smem_raw);
    float* sm = reinterpret_cast<float*>(smem_raw);
    const int t = threadIdx.x, block = blockIdx.x;
    st_shared(sm + t, float(t));
    sync_block();
    if (bug == "race" && t < 32) st_shared(sm + t + 32, 1.f);  // warp 1 reads it, no barrier
    float v = ld_shared<float>(sm + t);
    if (bug == "write_after_read" && t >= 32) st_shared(sm + t - 32, v);  // warp 0 read it
    sync_block();
    if (bug == "no_wait" && t == 0) {
      cp_async16(sm + 64, g, true);
      cp_async_commit();
      v += ld_shared<float>(sm + 64);  // before cp_async_wait
      cp_async_wait<0>();
    }
    if (bug != "divergence" || t % 32 != 0) v += shfl_xor(v, 1);
    if (bug == "out_of_bounds" && t == 0) v += ld_global<float>(g + 256);
    if (bug == "double_write") {
      if (t == 0) st_global(g, v);  // by both blocks
    } else if (bug == "cross_block_read") {
      if (block == 0 && t == 0) st_global(g + 1, v);
      if (block == 1 && t == 0) v += ld_global<float>(g + 1);
    }
    st_global(g + 2 + block * 64 + t, v);
  };
  std::vector<emu::Buffer> buffers(1);
  buffers[0].name = "data";
  buffers[0].begin = data;
  buffers[0].end = data + 256 * 4;
  buffers[0].writable = true;
  py::gil_scoped_release release;
  emu::launch(emu::Dim3{2, 1, 1}, 64, 96 * 4, body, buffers, emu::Options{});
}

}  // namespace
}  // namespace lsk

PYBIND11_MODULE(attention_emulator, m) {
  m.doc() = "attention_with_kvcache kernels on the host SIMT emulator (tests only)";
  py::register_exception<lsk::emu::Error>(m, "EmulatorError", PyExc_RuntimeError);
  m.def("attention_with_kvcache", &lsk::emulate, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("k_new"), py::arg("v_new"), py::arg("cache_seqlens"),
        py::arg("rotary_cos"), py::arg("rotary_sin"), py::arg("out"), py::arg("o_part"),
        py::arg("lse_part"), py::arg("batch"), py::arg("seqlen_q"), py::arg("heads_q"),
        py::arg("heads_kv"), py::arg("head_dim"), py::arg("max_seqlen"), py::arg("rotary_rows"),
        py::arg("q_strides"), py::arg("k_cache_strides"), py::arg("v_cache_strides"),
        py::arg("k_new_strides"), py::arg("v_new_strides"), py::arg("out_strides"),
        py::arg("cos_stride"), py::arg("sin_stride"), py::arg("dtype"), py::arg("rotary_dtype"),
        py::arg("softmax_scale"), py::arg("num_splits"), py::arg("row_tiles_per_block"),
        py::arg("buffers"), py::arg("schedule"), py::arg("racecheck"));
  m.def("bug_probe", &lsk::bug_probe, py::arg("bug"), py::arg("data"));
  m.def("mma_probe", &lsk::mma_probe, py::arg("a"), py::arg("b"), py::arg("d"), py::arg("e"),
        py::arg("dtype"));
}
