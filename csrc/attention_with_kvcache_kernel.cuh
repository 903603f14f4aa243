// attention_with_kvcache: the kernels and the host-side launch plan, shared by
// csrc/attention_with_kvcache.cu (the GPU launcher) and csrc/emulate/attention_emulator.cpp (the
// host SIMT emulator the tests run without a GPU). The contract is in the .cu file's header.
//
// Tiling. GQA group G = Hq / Hkv. The G query heads x Sq queries of one (b, KV head) are the
// rows r = i * G + g of a matrix (query i, head kv_head * G + g), cut into tiles of 16 rows:
// the M of one mma.sync.m16n8k16. A block owns one (b, KV head, split) and RowWarps
// consecutive row tiles (a "row block"; RowWarps = 1, 2, 4 or 8, chosen from the row count).
// Its warps form a RowWarps x KeyWarps grid: warp w serves row tile w % RowWarps and belongs
// to key group w / RowWarps. The key groups split the keys: group k takes the stages
// k, k + KeyWarps, ... of the split's chunk, a stage being 16 * 4 / KeyWarps keys, so that one
// round of all groups always covers 64 keys. Each group streams its stages through its own
// double-buffered cp.async ring in shared memory (16-byte copies, zero-filled past the end),
// loaded by all its warps together; every warp of the group then multiplies its own row tile
// by the same K and V tiles, so each key is read from memory once per block, whatever the
// number of rows. Each warp keeps its own online softmax (fp32, base 2). The ring is guarded
// by __syncwarp when a group is one warp (RowWarps = 1: the kernel as validated on the H100
// on 2026-11-25, 4 warps on 4 key groups) and by a named barrier per group otherwise.
//   RowWarps 1: 4 warps, KeyWarps 4, 16-key stages   (up to 16 rows)
//   RowWarps 2: 4 warps, KeyWarps 2, 32-key stages   (17..32 rows)
//   RowWarps 4: 4 warps, KeyWarps 1, 64-key stages   (33..64 rows)
//   RowWarps 8: 8 warps, KeyWarps 1, 64-key stages   (65..128 rows; more rows: more blocks)
// S = Q K^T: A = Q (ldmatrix), B = K rows (ldmatrix); O += P V: A = P from the S accumulators
// (rounded to the cache dtype, as flash-attn does), B = V via ldmatrix.trans. At the end the
// key groups' (m, l, O) of each row merge through shared memory.
//
// Head dims 32, 64 and 128 (D / 16 k-steps of 16 for Q K^T, taken two at a time, so D must be
// a multiple of 32; D / 8 n-tiles of 8 for P V, two at a time). 256 is left out: its 64 + 128
// registers of Q fragments and accumulators per thread compile to 248-249 registers (no spills,
// but at the 255 limit: one 4-warp block per SM), and it needs 157 KB of shared memory at 16
// rows and 215 KB at 128 rows, more than an A100 block may have (163 KB). Llama uses 64 and
// 128; the Python op routes 256 to the next backend.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "attention_with_kvcache.cuh"  // kMaxQueries, kMaxSplits, kMaxRowWarps, kHeadDims
#include "common.cuh"
#include "device.cuh"

namespace lsk {
namespace attn {

constexpr int kRows = 16;   // query rows per tile: one MMA M
constexpr int kKeys = 16;   // keys per warp tile: two MMA N = 8, one MMA K = 16 for P V
constexpr int kStages = 2;  // cp.async ring depth per key group
constexpr int kBlockKeys = 64;  // keys of one round of all key groups; splits are cut in these
constexpr int kMinKeysPerSplit = 256;
constexpr int kMinKeysPerSplitRow = 16;  // and per query row: see num_splits_heuristic
constexpr int kMinWaves = 2;
constexpr int kMergeThreads = 256;

struct Params {
  const void* q;
  void* k_cache;
  void* v_cache;
  const void* k_new;
  const void* v_new;
  const int32_t* cache_seqlens;
  const void* rotary_cos;  // nullptr: no RoPE
  const void* rotary_sin;
  void* out;
  float* o_part;
  float* lse_part;
  int64_t q_stride[3], kc_stride[3], vc_stride[3], kn_stride[3], vn_stride[3], out_stride[3];
  int64_t cos_stride, sin_stride, rotary_rows;
  int64_t max_seqlen;
  int seqlen_q, heads_kv, group, rows;  // rows = group * seqlen_q
  int num_splits, rotary_dtype;
  float scale_log2;  // softmax_scale * log2(e)
};

template <int RowWarps>
struct Layout {
  static_assert(RowWarps == 1 || RowWarps == 2 || RowWarps == 4 || RowWarps == 8, "RowWarps");
  static constexpr int kKeyWarps = RowWarps == 1 ? 4 : RowWarps == 2 ? 2 : 1;
  static constexpr int kWarps = RowWarps * kKeyWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSubTiles = 4 / kKeyWarps;      // 16-key tiles per stage
  static constexpr int kStageKeys = kSubTiles * kKeys;  // 16, 32, 64, 64
  static_assert(kKeyWarps * kStageKeys == kBlockKeys, "one round of the groups is 64 keys");
};

// Shared memory, in elements of the 2-byte cache dtype. Rows are padded by 16 bytes so that
// the 8 rows one ldmatrix reads fall in distinct banks (the pitch is 16 bytes mod 128).
template <int D, int RowWarps>
struct Smem {
  using L = Layout<RowWarps>;
  static constexpr int kPitch = D + 8;
  static constexpr int kQRows = kRows * RowWarps;
  static constexpr int kStageTile = L::kStageKeys * kPitch;  // one K or V stage
  static constexpr int kQ = 0;                                // [kQRows][kPitch]
  static constexpr int kNewK = kQ + kQRows * kPitch;          // [kKeys][kPitch]
  static constexpr int kNewV = kNewK + kKeys * kPitch;        // [kKeys][kPitch]
  static constexpr int kRing = kNewV + kKeys * kPitch;        // [group][stage][K|V][keys][kPitch]
  static constexpr int kGroupRing = kStages * 2 * kStageTile;
  static constexpr int kElems = kRing + L::kKeyWarps * kGroupRing;
  static constexpr size_t kBytes = size_t(kElems) * 2;
  // After the key loop the ring holds the warps' partial results, fp32:
  // O [kWarps][kRows][D], then m [kWarps][kRows], then l [kWarps][kRows].
  static constexpr size_t kScratchBytes = size_t(L::kWarps) * kRows * (D + 2) * 4;
  static_assert(kScratchBytes <= size_t(L::kKeyWarps) * kGroupRing * 2, "scratch fits");
  static_assert((kRing * 2) % 16 == 0 && (kPitch * 2) % 16 == 0, "16-byte aligned rows");
  static_assert((kPitch * 2 / 16) % 2 == 1, "the 8 rows of an ldmatrix in distinct banks");
};

// ---- dtype helpers ----
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Two floats rounded to nearest into one 32-bit register of two T (low half = a).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(a, b);
    r = *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    r = *reinterpret_cast<uint32_t*>(&h);
  }
  return r;
}

// 8 consecutive T (16 bytes, aligned, global memory) -> 8 floats.
template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&x)[8]) {
  const uint4 u = ld_global<uint4>(src);
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int k = 0; k < 8; ++k) x[k] = to_float(e[k]);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&x)[8]) {
  return make_uint4(pack2<T>(x[0], x[1]), pack2<T>(x[2], x[3]), pack2<T>(x[4], x[5]),
                    pack2<T>(x[6], x[7]));
}

__device__ __forceinline__ float load_table(const void* table, int dtype, int64_t idx) {
  switch (dtype) {
    case kFloat32: return ld_global<float>(static_cast<const float*>(table) + idx);
    case kFloat16: return __half2float(ld_global<__half>(static_cast<const __half*>(table) + idx));
    default:
      return __bfloat162float(
          ld_global<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(table) + idx));
  }
}

// Half rotation of the pairs (x1[k], x2[k]) = (x[d0 + k], x[d0 + k + D/2]) at position pos:
// (x1 cos - x2 sin, x2 cos + x1 sin), in fp32 with no FMA contraction, as the reference.
__device__ __forceinline__ void rotate8(float (&x1)[8], float (&x2)[8], const Params& p,
                                        int64_t pos, int d0) {
  pos = pos < p.rotary_rows ? pos : p.rotary_rows - 1;  // memory safety only
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float c = load_table(p.rotary_cos, p.rotary_dtype, pos * p.cos_stride + d0 + k);
    const float s = load_table(p.rotary_sin, p.rotary_dtype, pos * p.sin_stride + d0 + k);
    const float a = x1[k], b = x2[k];
    x1[k] = __fadd_rn(__fmul_rn(a, c), -__fmul_rn(b, s));
    x2[k] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

// ---- the fragment addressing, one function per ldmatrix use (also read by the tests) ----
// Element offsets, relative to the tile's first row, of the 16-byte row this lane gives to
// ldmatrix .x4; `pitch` in elements.
// Q fragments (A of S = Q K^T) for k-step kk: matrices rows {0-7, 8-15} x dims {16 kk, 16 kk + 8}.
__host__ __device__ __forceinline__ int q_frag_offset(int lane, int kk, int pitch) {
  return (lane % 8 + 8 * ((lane / 8) % 2)) * pitch + 16 * kk + 8 * (lane / 16);
}
// K rows (B of S = Q K^T), keys 8 nt..8 nt + 7, dims 16 kk + {0, 8, 16, 24} (k-steps kk, kk + 1).
__host__ __device__ __forceinline__ int k_frag_offset(int lane, int nt, int kk, int pitch) {
  return (8 * nt + lane % 8) * pitch + 16 * kk + 8 * (lane / 8);
}
// V rows (B of O += P V, transposed on load): keys {0-7, 8-15} x dims {8 dt, 8 dt + 8}.
__host__ __device__ __forceinline__ int v_frag_offset(int lane, int dt, int pitch) {
  return (lane % 8 + 8 * ((lane / 8) % 2)) * pitch + 8 * dt + 8 * (lane / 16);
}

// One warp folds a 16-key tile (K, V rows in shared memory, pitch kPitch) into its running
// max m, sum l (this lane's columns only) and output acc, for its rows g and g + 8.
// visible(row, key) masks scores, row and key local to the tile.
template <typename T, int D, typename Visible>
__device__ __forceinline__ void attend_tile(const uint32_t (&qf)[D / 16][4], const T* ks,
                                            const T* vs, float scale_log2, Visible visible,
                                            float (&m)[2], float (&l)[2], float (&acc)[D / 8][4]) {
  constexpr int kPitch = D + 8;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  // S = Q K^T: s[nt] holds keys 8 nt + 2t + {0, 1} of rows g (s[nt][0..1]) and g + 8 ([2..3]).
  float s[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < D / 16; kk += 2) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      uint32_t kb[4];  // matrices: dims 16 kk + {0, 8, 16, 24} of keys 8 nt .. 8 nt + 7
      ldmatrix_x4(kb, ks + k_frag_offset(lane, nt, kk, kPitch));
      mma16816<T>(s[nt], qf[kk], kb[0], kb[1]);
      mma16816<T>(s[nt], qf[kk + 1], kb[2], kb[3]);
    }
  }

  // Online softmax in base 2. A row whose max is still -inf (nothing visible yet) uses 0 as
  // its reference, so that no -inf - -inf appears; its p and alpha are then 0.
  float alpha[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[nt][2 * h + e];
        x = visible(g + 8 * h, 8 * nt + 2 * t + e) ? x * scale_log2 : -INFINITY;
        mx = fmaxf(mx, x);
      }
    }
    mx = fmaxf(mx, shfl_xor(mx, 1));
    mx = fmaxf(mx, shfl_xor(mx, 2));
    const float m_new = fmaxf(m[h], mx);
    const float ref = m_new == -INFINITY ? 0.f : m_new;
    alpha[h] = exp2f(m[h] - ref);
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[nt][2 * h + e];
        x = exp2f(x - ref);
        sum += x;
      }
    }
    l[h] = l[h] * alpha[h] + sum;
    m[h] = m_new;
  }

  // P as the A operand (16 rows x 16 keys): the S accumulator layout of the two 8-key halves.
  const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                          pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    acc[dt][0] *= alpha[0];
    acc[dt][1] *= alpha[0];
    acc[dt][2] *= alpha[1];
    acc[dt][3] *= alpha[1];
  }
  // O += P V: matrices are keys {0-7, 8-15} x dims {8 dt, 8 dt + 8}, transposed on load.
#pragma unroll
  for (int dt = 0; dt < D / 8; dt += 2) {
    uint32_t vb[4];
    ldmatrix_x4_trans(vb, vs + v_frag_offset(lane, dt, kPitch));
    mma16816<T>(acc[dt], pa, vb[0], vb[1]);
    mma16816<T>(acc[dt + 1], pa, vb[2], vb[3]);
  }
}

// Grid (B * Hkv, num_splits, ceil(G * Sq / (16 RowWarps))), Layout<RowWarps>::kThreads
// threads, Smem<D, RowWarps>::kBytes dynamic shared memory. Contract: the .cu file's header.
template <typename T, int D, int RowWarps>
__global__ void __launch_bounds__(Layout<RowWarps>::kThreads)
    attn_kvcache_fwd_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  device_trap();  // mma.sync m16n8k16 (bf16) and cp.async need sm_80; the launcher checks too
#else
  using L = Layout<RowWarps>;
  using S = Smem<D, RowWarps>;
  constexpr int kPitch = S::kPitch;
  constexpr int kHalfChunks = D / 16;  // 8-element chunks in half a row
  constexpr int kRowChunks = D / 8;    // 8-element (16-byte) chunks in a row
  LSK_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_warp = warp % RowWarps, key_warp = warp / RowWarps;
  const int64_t b = blockIdx.x / p.heads_kv, kv_head = blockIdx.x % p.heads_kv;
  const int split = blockIdx.y, row_block = blockIdx.z;
  const int row0 = row_block * S::kQRows;  // this block's first row
  const bool last_split = split == p.num_splits - 1;
  const int64_t cache_len =
      min64(max64(int64_t(ld_global<int32_t>(p.cache_seqlens + b)), int64_t(0)), p.max_seqlen);
  const bool has_rope = p.rotary_cos != nullptr;
  const T* q = static_cast<const T*>(p.q);
  T* k_cache = static_cast<T*>(p.k_cache) + b * p.kc_stride[0] + kv_head * p.kc_stride[2];
  T* v_cache = static_cast<T*>(p.v_cache) + b * p.vc_stride[0] + kv_head * p.vc_stride[2];

  // 1. Q tiles: rows r = row0 + lr, rotated at L + r / G, rounded to T; zero padding.
  for (int item = threadIdx.x; item < S::kQRows * kHalfChunks; item += L::kThreads) {
    const int lr = item / kHalfChunks, d0 = 8 * (item % kHalfChunks);
    const int r = row0 + lr;
    float x1[8] = {}, x2[8] = {};
    if (r < p.rows) {
      const int64_t i = r / p.group, head = kv_head * p.group + r % p.group;
      const T* src = q + b * p.q_stride[0] + i * p.q_stride[1] + head * p.q_stride[2];
      load8(src + d0, x1);
      load8(src + D / 2 + d0, x2);
      if (has_rope) rotate8(x1, x2, p, cache_len + i, d0);
    }
    st_shared(smem + S::kQ + lr * kPitch + d0, pack8<T>(x1));
    st_shared(smem + S::kQ + lr * kPitch + D / 2 + d0, pack8<T>(x2));
  }

  // 2. New keys (last split only): k_new rotated at L + j and v_new, rounded to T, into shared
  // memory (zero rows past Sq); the block of row block 0 also writes the same bits to the cache.
  if (last_split) {
    const bool writer = row_block == 0;
    for (int item = threadIdx.x; item < kKeys * kHalfChunks; item += L::kThreads) {
      const int j = item / kHalfChunks, d0 = 8 * (item % kHalfChunks);
      float x1[8] = {}, x2[8] = {};
      if (j < p.seqlen_q) {
        const T* src = static_cast<const T*>(p.k_new) + b * p.kn_stride[0] +
                       j * p.kn_stride[1] + kv_head * p.kn_stride[2];
        load8(src + d0, x1);
        load8(src + D / 2 + d0, x2);
        if (has_rope) rotate8(x1, x2, p, cache_len + j, d0);
      }
      const uint4 lo = pack8<T>(x1), hi = pack8<T>(x2);
      st_shared(smem + S::kNewK + j * kPitch + d0, lo);
      st_shared(smem + S::kNewK + j * kPitch + D / 2 + d0, hi);
      if (writer && j < p.seqlen_q && cache_len + j < p.max_seqlen) {
        T* dst = k_cache + (cache_len + j) * p.kc_stride[1];
        st_global(dst + d0, lo);
        st_global(dst + D / 2 + d0, hi);
      }
    }
    for (int item = threadIdx.x; item < kKeys * kRowChunks; item += L::kThreads) {
      const int j = item / kRowChunks, d0 = 8 * (item % kRowChunks);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (j < p.seqlen_q) {
        v = ld_global<uint4>(static_cast<const T*>(p.v_new) + b * p.vn_stride[0] +
                             j * p.vn_stride[1] + kv_head * p.vn_stride[2] + d0);
      }
      st_shared(smem + S::kNewV + j * kPitch + d0, v);
      if (writer && j < p.seqlen_q && cache_len + j < p.max_seqlen) {
        st_global(v_cache + (cache_len + j) * p.vc_stride[1] + d0, v);
      }
    }
  }
  sync_block();

  // 3. This warp's Q fragments (its row tile): rows {0-7, 8-15} x dims {16 kk, 16 kk + 8}.
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qf[kk],
                smem + S::kQ + row_warp * kRows * kPitch + q_frag_offset(lane, kk, kPitch));
  }
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float acc[D / 8][4] = {};

  // 4. Cached keys [start, end) of [0, L): this split's chunk, in stages of kStageKeys keys,
  // round robin over the key groups. Every key < L is visible to every query (bottom-right
  // causal). A group's warps load each stage together and each attends its row tile to it.
  const int64_t chunk =
      (((cache_len + kBlockKeys - 1) / kBlockKeys + p.num_splits - 1) / p.num_splits) *
      kBlockKeys;
  const int64_t start = split * chunk;
  const int64_t end = min64(start + chunk, cache_len);
  const int64_t stages = end > start ? (end - start + L::kStageKeys - 1) / L::kStageKeys : 0;
  const int64_t my_stages =
      stages > key_warp ? (stages - key_warp + L::kKeyWarps - 1) / L::kKeyWarps : 0;
  T* ring = smem + S::kRing + key_warp * S::kGroupRing;
  const int group_thread = row_warp * 32 + lane;  // 0 .. 32 RowWarps - 1
  auto stage_start = [&](int64_t it) {
    return start + (key_warp + L::kKeyWarps * it) * L::kStageKeys;
  };
  auto load_stage = [&](int64_t first, int stage) {
    T* ks = ring + stage * 2 * S::kStageTile;
    T* vs = ks + S::kStageTile;
#pragma unroll
    for (int c = group_thread; c < L::kStageKeys * kRowChunks; c += 32 * RowWarps) {
      const int key = c / kRowChunks, d0 = 8 * (c % kRowChunks);
      const int64_t pos = first + key;
      const bool valid = pos < end;  // never read rows >= L: another block writes them
      const int64_t src = valid ? pos : 0;
      cp_async16(ks + key * kPitch + d0, k_cache + src * p.kc_stride[1] + d0, valid);
      cp_async16(vs + key * kPitch + d0, v_cache + src * p.vc_stride[1] + d0, valid);
    }
  };
  // The group's warps meet here: one warp needs only its own lanes.
  auto group_sync = [&]() {
    if constexpr (RowWarps == 1) {
      sync_warp();
    } else {
      sync_named(1 + key_warp, 32 * RowWarps);
    }
  };
  if (my_stages > 0) load_stage(stage_start(0), 0);
  cp_async_commit();
  for (int64_t it = 0; it < my_stages; ++it) {
    const int stage = int(it % kStages);
    if (it + 1 < my_stages) load_stage(stage_start(it + 1), (stage + 1) % kStages);
    cp_async_commit();  // possibly empty: keeps one group per iteration
    cp_async_wait<1>(); // this stage's copies have landed (for this thread) ...
    group_sync();       // ... and for every thread of the group
    const T* ks = ring + stage * 2 * S::kStageTile;
    const int64_t first = stage_start(it);
#pragma unroll
    for (int u = 0; u < L::kSubTiles; ++u) {
      const int64_t tile_first = first + u * kKeys;
      if (u == 0 || tile_first < end) {  // the first tile of a stage always has keys
        attend_tile<T, D>(qf, ks + u * kKeys * kPitch, ks + S::kStageTile + u * kKeys * kPitch,
                          p.scale_log2, [&](int, int key) { return tile_first + key < end; }, m,
                          l, acc);
      }
    }
    group_sync();  // every thread of the group is done reading this stage before its refill
  }

  // 5. New keys [L, L + Sq), last split, the last key group: key j is visible to query
  // i = r / G when j <= i.
  if (last_split && key_warp == L::kKeyWarps - 1) {
    const int tile_row0 = row0 + row_warp * kRows;
    attend_tile<T, D>(
        qf, smem + S::kNewK, smem + S::kNewV, p.scale_log2,
        [&](int lr, int j) { return j < p.seqlen_q && j <= (tile_row0 + lr) / p.group; }, m, l,
        acc);
  }

  // 6. Merge the key groups: (m, l, O) to shared memory (reusing the ring), then combine.
  l[0] += shfl_xor(l[0], 1);
  l[0] += shfl_xor(l[0], 2);
  l[1] += shfl_xor(l[1], 1);
  l[1] += shfl_xor(l[1], 2);
  cp_async_wait<0>();
  sync_block();
  float* so = reinterpret_cast<float*>(smem + S::kRing);  // [kWarps][kRows][D]
  float* sm = so + L::kWarps * kRows * D;                 // [kWarps][kRows]
  float* sl = sm + L::kWarps * kRows;                     // [kWarps][kRows]
  {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        st_shared(so + (warp * kRows + g + 8 * h) * D + 8 * dt + 2 * t,
                  make_float2(acc[dt][2 * h], acc[dt][2 * h + 1]));
      }
    }
    if (t == 0) {
      st_shared(sm + warp * kRows + g, m[0]);
      st_shared(sm + warp * kRows + g + 8, m[1]);
      st_shared(sl + warp * kRows + g, l[0]);
      st_shared(sl + warp * kRows + g + 8, l[1]);
    }
  }
  sync_block();

  for (int item = threadIdx.x; item < S::kQRows * kRowChunks; item += L::kThreads) {
    const int block_row = item / kRowChunks, d0 = 8 * (item % kRowChunks);
    const int rw = block_row / kRows, lr = block_row % kRows;  // row tile, row in it
    const int r = row0 + block_row;
    if (r >= p.rows) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int kw = 0; kw < L::kKeyWarps; ++kw) {
      mx = fmaxf(mx, ld_shared<float>(sm + (kw * RowWarps + rw) * kRows + lr));
    }
    float o[8] = {}, total = 0.f;
#pragma unroll
    for (int kw = 0; kw < L::kKeyWarps; ++kw) {
      const int w = kw * RowWarps + rw;
      const float mw = ld_shared<float>(sm + w * kRows + lr);
      if (mw == -INFINITY) continue;  // this warp saw no key
      const float weight = exp2f(mw - mx);
      total += ld_shared<float>(sl + w * kRows + lr) * weight;
      const float* ow = so + (w * kRows + lr) * D + d0;
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] += ld_shared<float>(ow + k) * weight;
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] *= inv;
    if (p.num_splits > 1) {  // an empty split stores lse = -inf and zeros: the merge skips it
      const int64_t part =
          ((b * p.heads_kv + kv_head) * p.num_splits + split) * int64_t(p.rows) + r;
      float* dst = p.o_part + part * D + d0;
      st_global(dst, make_float4(o[0], o[1], o[2], o[3]));
      st_global(dst + 4, make_float4(o[4], o[5], o[6], o[7]));
      if (d0 == 0) st_global(p.lse_part + part, total > 0.f ? mx + log2f(total) : -INFINITY);
    } else {
      const int64_t i = r / p.group, head = kv_head * p.group + r % p.group;
      T* dst = static_cast<T*>(p.out) + b * p.out_stride[0] + i * p.out_stride[1] +
               head * p.out_stride[2] + d0;
      st_global(dst, pack8<T>(o));
    }
  }
#endif
}

// Dynamic shared memory of the merge kernel: weights [kMaxSplits], partial sums
// [kMergeThreads][4], reduction slots [kMergeThreads / 32].
constexpr size_t kMergeSmemBytes =
    (size_t(kMaxSplits) + size_t(kMergeThreads) * 4 + kMergeThreads / 32) * 4;

// Grid (B * Hkv * G * Sq), kMergeThreads threads: one block per query row (b, KV head, r).
// out = sum_s 2^(lse_s - mx) o_s / sum_s 2^(lse_s - mx), over the splits with lse_s > -inf (the
// last split always has the new keys, so mx is finite). Thread (c, ph) sums the float4 chunk c
// of the row over the splits ph, ph + phases, ...; the phases then add up in shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(kMergeThreads) attn_kvcache_merge_kernel(const Params p) {
  constexpr int kChunks = D / 4;                     // float4 chunks of a row
  constexpr int kPhases = kMergeThreads / kChunks;  // threads per chunk
  static_assert(kMergeThreads % kChunks == 0 && kChunks % 2 == 0, "merge layout");
  LSK_DYNAMIC_SMEM(smem_raw);
  float* weight = reinterpret_cast<float*>(smem_raw);  // [kMaxSplits]
  float* part = weight + kMaxSplits;                   // [kMergeThreads][4]
  float* red = part + kMergeThreads * 4;               // [kMergeThreads / 32]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t row = blockIdx.x;  // (b * Hkv + kv_head) * rows + r
  const int64_t bh = row / p.rows;
  const int r = int(row % p.rows);
  const int64_t b = bh / p.heads_kv, kv_head = bh % p.heads_kv;
  const int64_t first = bh * p.num_splits * int64_t(p.rows) + r;  // split s: first + s * rows
  const int splits = p.num_splits;

  float mx = -INFINITY;
  for (int s = tid; s < splits; s += kMergeThreads) {
    mx = fmaxf(mx, ld_global<float>(p.lse_part + first + s * int64_t(p.rows)));
  }
#pragma unroll
  for (int k = 16; k >= 1; k /= 2) mx = fmaxf(mx, shfl_xor(mx, k));
  if (lane == 0) st_shared(red + warp, mx);
  sync_block();
  mx = -INFINITY;
#pragma unroll
  for (int w = 0; w < kMergeThreads / 32; ++w) mx = fmaxf(mx, ld_shared<float>(red + w));
  float total = 0.f;
  for (int s = tid; s < splits; s += kMergeThreads) {
    const float lse = ld_global<float>(p.lse_part + first + s * int64_t(p.rows));
    const float w = lse == -INFINITY ? 0.f : exp2f(lse - mx);
    st_shared(weight + s, w);
    total += w;
  }
#pragma unroll
  for (int k = 16; k >= 1; k /= 2) total += shfl_xor(total, k);
  sync_block();  // every thread has read red[] (the max) before it is reused
  if (lane == 0) st_shared(red + warp, total);
  sync_block();  // ... and the weights and partial totals are in
  total = 0.f;
#pragma unroll
  for (int w = 0; w < kMergeThreads / 32; ++w) total += ld_shared<float>(red + w);

  const int c = tid % kChunks, phase = tid / kChunks;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
  for (int s = phase; s < splits; s += kPhases) {
    const float w = ld_shared<float>(weight + s);
    if (w == 0.f) continue;  // an empty split (or one far below the max)
    const float4 v = ld_global<float4>(p.o_part + (first + s * int64_t(p.rows)) * D + 4 * c);
    o.x += w * v.x;
    o.y += w * v.y;
    o.z += w * v.z;
    o.w += w * v.w;
  }
  st_shared(part + 4 * tid, o);
  sync_block();
  if (phase == 0) {
    for (int ph = 1; ph < kPhases; ++ph) {
      const float4 v = ld_shared<float4>(part + 4 * (ph * kChunks + c));
      o.x += v.x;
      o.y += v.y;
      o.z += v.z;
      o.w += v.w;
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    const int64_t i = r / p.group, head = kv_head * p.group + r % p.group;
    T* dst = static_cast<T*>(p.out) + b * p.out_stride[0] + i * p.out_stride[1] +
             head * p.out_stride[2] + 4 * c;
    st_global(dst, make_uint2(pack2<T>(o.x * inv, o.y * inv), pack2<T>(o.z * inv, o.w * inv)));
  }
}

// ---- host side: shared by the GPU launcher and the emulator ----

// Row tiles per block for `rows` query rows: the smallest of 1, 2, 4, 8 that holds them all
// (8 when there are more), at most max_row_tiles (the switch: 1 = one tile per block, the
// kernel as validated on 2026-11-25; 0 = no limit).
inline int row_warps_for(int64_t rows, int64_t max_row_tiles) {
  const int64_t tiles = (rows + kRows - 1) / kRows;
  int rw = 1;
  while (rw < kMaxRowWarps && rw < tiles) rw *= 2;
  if (max_row_tiles > 0) {
    while (rw > max_row_tiles) rw /= 2;
  }
  return rw;
}

inline int64_t row_blocks_for(int64_t rows, int row_warps) {
  return (rows + int64_t(kRows) * row_warps - 1) / (int64_t(kRows) * row_warps);
}

inline size_t fwd_smem_bytes(int64_t head_dim, int row_warps) {
  auto pick = [&](auto d) -> size_t {
    constexpr int D = decltype(d)::value;
    switch (row_warps) {
      case 1: return Smem<D, 1>::kBytes;
      case 2: return Smem<D, 2>::kBytes;
      case 4: return Smem<D, 4>::kBytes;
      default: return Smem<D, 8>::kBytes;
    }
  };
  switch (head_dim) {
    case 32: return pick(std::integral_constant<int, 32>());
    case 64: return pick(std::integral_constant<int, 64>());
    default: return pick(std::integral_constant<int, 128>());
  }
}

inline int fwd_threads(int row_warps) {
  switch (row_warps) {
    case 1: return Layout<1>::kThreads;
    case 2: return Layout<2>::kThreads;
    case 4: return Layout<4>::kThreads;
    default: return Layout<8>::kThreads;
  }
}

// The split-KV heuristic (FlashDecoding). `ctas`: blocks of one split (B * Hkv * row blocks);
// `slots`: blocks resident at once on the device (SMs x blocks per SM, from the kernel's
// registers and shared memory). When the blocks of one split already fill every slot: 1.
// Otherwise the fewest splits that make kMinWaves waves of resident blocks, so that every SM
// has several blocks' loads in flight and a finishing block is replaced at once; then, among
// up to 25% more splits, the count whose waves are fullest (ctas * s / (waves * slots), the
// busy share of the slots if every block took as long). At most kMaxSplits, and at least
// max(kMinKeysPerSplit, kMinKeysPerSplitRow * rows) keys of max_seqlen per split: a split
// writes rows * D fp32 partials that the merge reads back, against keys * D * 2 fp16 of K and V
// it reads, so that traffic stays under 1/8 of the cache's (the real lengths live on the
// device: the grid depends on shapes only).
inline int64_t num_splits_heuristic(int64_t ctas, int64_t rows, int64_t max_seqlen,
                                    int64_t sm_count, int64_t ctas_per_sm) {
  const int64_t slots = std::max<int64_t>(1, sm_count * ctas_per_sm);
  if (ctas <= 0 || ctas >= slots) return 1;
  const int64_t min_keys = std::max<int64_t>(kMinKeysPerSplit, kMinKeysPerSplitRow * rows);
  const int64_t by_length =
      std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, max_seqlen / min_keys));
  const int64_t fewest = (kMinWaves * slots + ctas - 1) / ctas;
  auto waves = [&](int64_t s) { return (ctas * s + slots - 1) / slots; };
  int64_t best = fewest;
  for (int64_t s = fewest + 1; s <= fewest + fewest / 4; ++s) {
    if (s * waves(best) > best * waves(s)) best = s;  // a strictly fuller last wave
  }
  return std::min(best, by_length);
}

// Memory-safety checks of one call, and its Params; everything else is validated in Python.
// Throws std::invalid_argument naming the argument.
inline Params make_params(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_new,
                          uintptr_t v_new, uintptr_t cache_seqlens, uintptr_t rotary_cos,
                          uintptr_t rotary_sin, uintptr_t out, uintptr_t o_part,
                          uintptr_t lse_part, int64_t batch, int64_t seqlen_q, int64_t heads_q,
                          int64_t heads_kv, int64_t head_dim, int64_t max_seqlen,
                          int64_t rotary_rows, const int64_t* const strides[6],
                          int64_t cos_stride, int64_t sin_stride, int dtype, int rotary_dtype,
                          double softmax_scale, int64_t num_splits) {
  check_arg(dtype == kFloat16 || dtype == kBFloat16, "dtype",
            "1 (fp16) or 2 (bf16), got " + std::to_string(dtype));
  check_arg(head_dim == 32 || head_dim == 64 || head_dim == 128, "head_dim",
            "32, 64 or 128, got " + std::to_string(head_dim));
  check_arg(seqlen_q >= 0 && seqlen_q <= kMaxQueries, "seqlen_q",
            "0..16 new queries per row, got " + std::to_string(seqlen_q));
  check_arg(batch >= 0 && heads_kv > 0 && heads_q >= 0 && heads_q % heads_kv == 0 &&
                max_seqlen >= 0,
            "shape", "B >= 0, Smax >= 0 and Hkv > 0 dividing Hq");
  check_arg(num_splits >= 1 && num_splits <= kMaxSplits, "num_splits",
            "1.." + std::to_string(kMaxSplits) + ", got " + std::to_string(num_splits));
  const bool has_rope = rotary_cos != 0 || rotary_sin != 0;
  if (has_rope) {
    check_arg(rotary_cos != 0 && rotary_sin != 0, "rotary_sin", "given with rotary_cos");
    dtype_size(rotary_dtype);  // throws on a bad code
    check_arg(rotary_rows >= 1, "rotary_cos", "at least one row");
  }
  const uintptr_t ptrs[] = {q, k_cache, v_cache, k_new, v_new, out};
  const char* names[] = {"q", "k_cache", "v_cache", "k_new", "v_new", "out"};
  for (int k = 0; k < 6; ++k) {
    const int64_t* s = strides[k];
    check_arg(ptrs[k] % 16 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0, names[k],
              "16-byte aligned rows (data_ptr and strides multiples of 8 elements)");
  }
  const int64_t group = heads_q / heads_kv;
  const int64_t rows = group * seqlen_q;
  const int64_t batch_heads = batch * heads_kv;
  check_arg(batch_heads <= INT32_MAX && (rows + kRows - 1) / kRows <= 65535 &&
                batch_heads * rows < INT32_MAX,
            "shape", "B * Hkv < 2^31, Hq / Hkv * Sq / 16 <= 65535, B * Hq * Sq < 2^31");
  check_arg(num_splits == 1 || (o_part != 0 && lse_part != 0), "o_part",
            "partial buffers when num_splits > 1");

  Params p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k_cache = reinterpret_cast<void*>(k_cache);
  p.v_cache = reinterpret_cast<void*>(v_cache);
  p.k_new = reinterpret_cast<const void*>(k_new);
  p.v_new = reinterpret_cast<const void*>(v_new);
  p.cache_seqlens = reinterpret_cast<const int32_t*>(cache_seqlens);
  p.rotary_cos = has_rope ? reinterpret_cast<const void*>(rotary_cos) : nullptr;
  p.rotary_sin = has_rope ? reinterpret_cast<const void*>(rotary_sin) : nullptr;
  p.out = reinterpret_cast<void*>(out);
  p.o_part = reinterpret_cast<float*>(o_part);
  p.lse_part = reinterpret_cast<float*>(lse_part);
  int64_t* dst[] = {p.q_stride, p.kc_stride, p.vc_stride, p.kn_stride, p.vn_stride, p.out_stride};
  for (int t = 0; t < 6; ++t) {
    for (int k = 0; k < 3; ++k) dst[t][k] = strides[t][k];
  }
  p.cos_stride = cos_stride;
  p.sin_stride = sin_stride;
  p.rotary_rows = rotary_rows;
  p.max_seqlen = max_seqlen;
  p.seqlen_q = int(seqlen_q);
  p.heads_kv = int(heads_kv);
  p.group = int(group);
  p.rows = int(rows);
  p.num_splits = int(num_splits);
  p.rotary_dtype = rotary_dtype;
  p.scale_log2 = float(softmax_scale * 1.4426950408889634);  // log2(e)
  return p;
}

// Calls launch.template run<T, D, RowWarps>() for the instantiation that serves the call: the
// one table of instantiations, for the GPU and the emulator alike.
template <typename Launch>
void dispatch(int dtype, int64_t head_dim, int row_warps, Launch& launch) {
  auto by_rows = [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int D = decltype(d)::value;
    switch (row_warps) {
      case 1: launch.template run<T, D, 1>(); break;
      case 2: launch.template run<T, D, 2>(); break;
      case 4: launch.template run<T, D, 4>(); break;
      default: launch.template run<T, D, 8>(); break;
    }
  };
  auto by_dim = [&](auto t) {
    switch (head_dim) {
      case 32: by_rows(t, std::integral_constant<int, 32>()); break;
      case 64: by_rows(t, std::integral_constant<int, 64>()); break;
      default: by_rows(t, std::integral_constant<int, 128>()); break;
    }
  };
  if (dtype == kFloat16) {
    by_dim(__half());
  } else {
    by_dim(__nv_bfloat16());
  }
}

}  // namespace attn
}  // namespace lsk
