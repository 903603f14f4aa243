// attention_with_kvcache: RoPE + K/V cache append + causal attention, for 1..16 new queries
// per row (decode and speculative verify), fp16 / bf16, head_dim 64 / 128, tensor cores.
//
// Semantics: layerskip_kernels.ops.attention_with_kvcache (flash-attn's
// flash_attn_with_kvcache(..., causal=True) with the half rotation). For row b with
// L = cache_seqlens[b] (read on the device) and new query i < Sq, at position p = L + i:
//   q[b, i] and k_new[b, i] are rotated at p (when cos/sin are given);
//   k_cache[b, p], v_cache[b, p] = k_new[b, i], v_new[b, i]          (in place);
//   out[b, i, h] = softmax(q . k_cache[b, :p+1, h / G]^T * scale) @ v_cache[b, :p+1, h / G].
//
// Contract (validated in layerskip_kernels/ops/attention_with_kvcache.py; C++ repeats only
// what memory safety needs: dtype code, head_dim, Sq <= 16, 16-byte alignment):
//   q, out         : (B, Sq, Hq, D), strides (b, s, h) in elements, last dim contiguous
//   k_cache, v_cache: (B, Smax, Hkv, D), same; written at rows [L, L + Sq)
//   k_new, v_new   : (B, Sq, Hkv, D), same
//   all five of one dtype: fp16 or bf16 (fp32 is routed to Triton by the Python op);
//   every row start 16-byte aligned (pointers and strides multiples of 8 elements).
//   cache_seqlens  : (B,) int32. Not modified. Clamped to [0, Smax] on the device, and cache
//                    rows >= Smax are never written, so bad lengths cannot write out of bounds.
//   rotary_cos/sin : (rotary_rows >= Smax, D/2), row stride given, fp32 | fp16 | bf16
//                    (rotary_dtype); 0 pointers = no RoPE. Positions clamp to rotary_rows - 1.
//   o_part         : (B, Hkv, num_splits, G * Sq, D) fp32, contiguous; lse_part: (B, Hkv,
//                    num_splits, G * Sq) fp32 (base-2 log-sum-exp); only when num_splits > 1.
// Offsets are int64. Launches go on the given stream; CUDA errors become RuntimeError.
//
// Tiling. GQA group G = Hq / Hkv. The G query heads x Sq queries of one (b, KV head) are the
// rows r = i * G + g of a matrix (query i, head kv_head * G + g), cut into tiles of 16 rows:
// the M of one mma.sync.m16n8k16. A block (4 warps) owns one (b, KV head, split, row tile).
// Its warps share the 16 rows and split the keys: warp w takes the 16-key tiles w, w + 4, ...
// of the split's chunk, each with its own online softmax (fp32, base 2) and a private
// double-buffered cp.async ring in shared memory (16-byte copies, zero-filled past the end),
// so the key loop needs only __syncwarp. S = Q K^T: A = Q (ldmatrix), B = K rows (ldmatrix);
// O += P V: A = P from the S accumulators (rounded to the cache dtype, as flash-attn does),
// B = V via ldmatrix.trans. At the end the 4 warps' (m, l, O) merge through shared memory.
//
// Split-KV. The cached keys [0, L) are cut into num_splits chunks of whole 64-key blocks; a
// split with nothing to do writes lse = -inf. With one split the block writes out; with more,
// each block writes its normalised partial output and lse, and attn_kvcache_merge_kernel
// combines them. The grid depends on shapes only: no host sync, CUDA-graph safe.
//
// Cache write and read in one launch (the Triton kernel's scheme). No block of this launch
// reads the cache at rows >= L: cached-key loads stop at L (zero-fill beyond). The blocks of
// the last split load k_new / v_new, rotate k_new, round it to the cache dtype, and attend to
// the new keys from shared memory (causal: key j <= query i); the one with row tile 0 also
// writes those exact bits to the cache. Reads and writes touch disjoint addresses, so any
// block schedule is correct with no barrier, and exactly one block writes each new cache row.
//
// Hopper: the same mma.sync code runs on sm_90a. wgmma needs 64-row warpgroup tiles and TMA
// a tensor map per cache; with 16-row decode tiles neither stays simple, so neither is used.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <type_traits>

#include "attention_with_kvcache.cuh"
#include "common.cuh"

namespace lsk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;   // query rows per block: one MMA M
constexpr int kKeys = 16;   // keys per warp tile: two MMA N = 8, one MMA K = 16 for P V
constexpr int kStages = 2;  // cp.async ring depth per warp
constexpr int kBlockKeys = kWarps * kKeys;
constexpr int kMaxQueries = 16;
constexpr int kMaxSplits = 64;
constexpr int kMinKeysPerSplit = 256;
constexpr int kMaxDevices = 64;

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

// Shared memory, in elements of the 2-byte cache dtype. Rows are padded by 16 bytes so that
// the 8 rows one ldmatrix reads fall in distinct banks.
template <int D>
struct Smem {
  static constexpr int kPitch = D + 8;
  static constexpr int kTile = kKeys * kPitch;                   // one K or V tile
  static constexpr int kQ = 0;                                   // [kRows][kPitch]
  static constexpr int kNewK = kQ + kRows * kPitch;              // [kKeys][kPitch]
  static constexpr int kNewV = kNewK + kTile;                    // [kKeys][kPitch]
  static constexpr int kRing = kNewV + kTile;                    // [warp][stage][K|V][tile]
  static constexpr int kElems = kRing + kWarps * kStages * 2 * kTile;
  static constexpr size_t kBytes = size_t(kElems) * 2;
  // After the key loop the ring holds the warps' partial results, fp32:
  // O [kWarps][kRows][D], then m [kWarps][kRows], then l [kWarps][kRows].
  static constexpr size_t kScratchBytes = size_t(kWarps) * kRows * (D + 2) * 4;
  static_assert(kScratchBytes <= size_t(kWarps) * kStages * 2 * kTile * 2, "scratch fits");
  static_assert((kRing * 2) % 16 == 0 && (kPitch * 2) % 16 == 0, "16-byte aligned rows");
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

// 8 consecutive T (16 bytes, aligned) <-> 8 floats.
template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&x)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(src);
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
    case kFloat32: return static_cast<const float*>(table)[idx];
    case kFloat16: return __half2float(static_cast<const __half*>(table)[idx]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(table)[idx]);
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

// ---- PTX wrappers (sm_80+) ----
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

// One warp folds a 16-key tile (K, V rows in shared memory, pitch kPitch) into its running
// max m, sum l (this lane's columns only) and output acc, for its rows g and g + 8.
// visible(row, key) masks scores, row and key local to the tile.
template <typename T, int D, typename Visible>
__device__ __forceinline__ void attend_tile(const uint32_t (&qf)[D / 16][4], const T* ks,
                                            const T* vs, float scale_log2, Visible visible,
                                            float (&m)[2], float (&l)[2], float (&acc)[D / 8][4]) {
  constexpr int kPitch = Smem<D>::kPitch;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  // S = Q K^T: s[nt] holds keys 8 nt + 2t + {0, 1} of rows g (s[nt][0..1]) and g + 8 ([2..3]).
  float s[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < D / 16; kk += 2) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      uint32_t kb[4];  // matrices: dims 16 kk + {0, 8, 16, 24} of keys 8 nt .. 8 nt + 7
      ldmatrix_x4(kb, ks + (8 * nt + lane % 8) * kPitch + 16 * kk + 8 * (lane / 8));
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
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
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
    ldmatrix_x4_trans(vb, vs + (lane % 8 + 8 * ((lane / 8) % 2)) * kPitch + 8 * dt +
                              8 * (lane / 16));
    mma16816<T>(acc[dt], pa, vb[0], vb[1]);
    mma16816<T>(acc[dt + 1], pa, vb[2], vb[3]);
  }
}

// Grid (B * Hkv, num_splits, ceil(G * Sq / 16)), kThreads threads, Smem<D>::kBytes dynamic
// shared memory. Contract: the file header.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_kvcache_fwd_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 (bf16) and cp.async need sm_80; the launcher checks too
#else
  using S = Smem<D>;
  constexpr int kPitch = S::kPitch;
  constexpr int kHalfChunks = D / 16;  // 8-element chunks in half a row
  constexpr int kRowChunks = D / 8;    // 8-element (16-byte) chunks in a row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x / p.heads_kv, kv_head = blockIdx.x % p.heads_kv;
  const int split = blockIdx.y, row_tile = blockIdx.z;
  const bool last_split = split == p.num_splits - 1;
  const int64_t cache_len = min(max(int64_t(p.cache_seqlens[b]), int64_t(0)), p.max_seqlen);
  const bool has_rope = p.rotary_cos != nullptr;
  const T* q = static_cast<const T*>(p.q);
  T* k_cache = static_cast<T*>(p.k_cache) + b * p.kc_stride[0] + kv_head * p.kc_stride[2];
  T* v_cache = static_cast<T*>(p.v_cache) + b * p.vc_stride[0] + kv_head * p.vc_stride[2];

  // 1. Q tile: rows r = row_tile * 16 + lr, rotated at L + r / G, rounded to T; zero padding.
  for (int item = threadIdx.x; item < kRows * kHalfChunks; item += kThreads) {
    const int lr = item / kHalfChunks, d0 = 8 * (item % kHalfChunks);
    const int r = row_tile * kRows + lr;
    float x1[8] = {}, x2[8] = {};
    if (r < p.rows) {
      const int64_t i = r / p.group, head = kv_head * p.group + r % p.group;
      const T* src = q + b * p.q_stride[0] + i * p.q_stride[1] + head * p.q_stride[2];
      load8(src + d0, x1);
      load8(src + D / 2 + d0, x2);
      if (has_rope) rotate8(x1, x2, p, cache_len + i, d0);
    }
    *reinterpret_cast<uint4*>(smem + S::kQ + lr * kPitch + d0) = pack8<T>(x1);
    *reinterpret_cast<uint4*>(smem + S::kQ + lr * kPitch + D / 2 + d0) = pack8<T>(x2);
  }

  // 2. New keys (last split only): k_new rotated at L + j and v_new, rounded to T, into shared
  // memory (zero rows past Sq); the row-tile-0 block also writes the same bits to the cache.
  if (last_split) {
    const bool writer = row_tile == 0;
    for (int item = threadIdx.x; item < kKeys * kHalfChunks; item += kThreads) {
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
      *reinterpret_cast<uint4*>(smem + S::kNewK + j * kPitch + d0) = lo;
      *reinterpret_cast<uint4*>(smem + S::kNewK + j * kPitch + D / 2 + d0) = hi;
      if (writer && j < p.seqlen_q && cache_len + j < p.max_seqlen) {
        T* dst = k_cache + (cache_len + j) * p.kc_stride[1];
        *reinterpret_cast<uint4*>(dst + d0) = lo;
        *reinterpret_cast<uint4*>(dst + D / 2 + d0) = hi;
      }
    }
    for (int item = threadIdx.x; item < kKeys * kRowChunks; item += kThreads) {
      const int j = item / kRowChunks, d0 = 8 * (item % kRowChunks);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (j < p.seqlen_q) {
        v = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.v_new) + b * p.vn_stride[0] +
                                            j * p.vn_stride[1] + kv_head * p.vn_stride[2] + d0);
      }
      *reinterpret_cast<uint4*>(smem + S::kNewV + j * kPitch + d0) = v;
      if (writer && j < p.seqlen_q && cache_len + j < p.max_seqlen) {
        *reinterpret_cast<uint4*>(v_cache + (cache_len + j) * p.vc_stride[1] + d0) = v;
      }
    }
  }
  __syncthreads();

  // 3. This warp's Q fragments: matrices rows {0-7, 8-15} x dims {16 kk, 16 kk + 8}.
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qf[kk], smem + S::kQ + (lane % 8 + 8 * ((lane / 8) % 2)) * kPitch + 16 * kk +
                            8 * (lane / 16));
  }
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float acc[D / 8][4] = {};

  // 4. Cached keys [start, end) of [0, L): this split's chunk, in 16-key tiles, round robin
  // over the warps. Every key < L is visible to every query (bottom-right causal).
  const int64_t chunk =
      (((cache_len + kBlockKeys - 1) / kBlockKeys + p.num_splits - 1) / p.num_splits) *
      kBlockKeys;
  const int64_t start = split * chunk;
  const int64_t end = min(start + chunk, cache_len);
  const int64_t tiles = end > start ? (end - start + kKeys - 1) / kKeys : 0;
  const int64_t my_tiles = tiles > warp ? (tiles - warp + kWarps - 1) / kWarps : 0;
  T* ring = smem + S::kRing + warp * (kStages * 2 * S::kTile);
  auto tile_start = [&](int64_t it) { return start + (warp + kWarps * it) * kKeys; };
  auto load_tile = [&](int64_t first, int stage) {
    T* ks = ring + stage * 2 * S::kTile;
    T* vs = ks + S::kTile;
#pragma unroll
    for (int c = lane; c < kKeys * kRowChunks; c += 32) {
      const int key = c / kRowChunks, d0 = 8 * (c % kRowChunks);
      const int64_t pos = first + key;
      const bool valid = pos < end;  // never read rows >= L: another block writes them
      const int64_t src = valid ? pos : 0;
      cp_async16(ks + key * kPitch + d0, k_cache + src * p.kc_stride[1] + d0, valid);
      cp_async16(vs + key * kPitch + d0, v_cache + src * p.vc_stride[1] + d0, valid);
    }
  };
  if (my_tiles > 0) load_tile(tile_start(0), 0);
  cp_async_commit();
  for (int64_t it = 0; it < my_tiles; ++it) {
    const int stage = int(it % kStages);
    if (it + 1 < my_tiles) load_tile(tile_start(it + 1), (stage + 1) % kStages);
    cp_async_commit();  // possibly empty: keeps one group per iteration
    cp_async_wait<1>(); // this tile's group has landed (for this lane) ...
    __syncwarp();       // ... and for every lane
    const T* ks = ring + stage * 2 * S::kTile;
    const int64_t first = tile_start(it);
    attend_tile<T, D>(qf, ks, ks + S::kTile, p.scale_log2,
                      [&](int, int key) { return first + key < end; }, m, l, acc);
    __syncwarp();  // every lane is done reading this stage before it is refilled
  }

  // 5. New keys [L, L + Sq), last split: key j is visible to query i = r / G when j <= i.
  if (last_split && warp == kWarps - 1) {
    const int row0 = row_tile * kRows;
    attend_tile<T, D>(
        qf, smem + S::kNewK, smem + S::kNewV, p.scale_log2,
        [&](int lr, int j) { return j < p.seqlen_q && j <= (row0 + lr) / p.group; }, m, l, acc);
  }

  // 6. Merge the warps: (m, l, O) to shared memory (reusing the ring), then combine.
  l[0] += __shfl_xor_sync(0xffffffffu, l[0], 1);
  l[0] += __shfl_xor_sync(0xffffffffu, l[0], 2);
  l[1] += __shfl_xor_sync(0xffffffffu, l[1], 1);
  l[1] += __shfl_xor_sync(0xffffffffu, l[1], 2);
  cp_async_wait<0>();
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem + S::kRing);  // [kWarps][kRows][D]
  float* sm = so + kWarps * kRows * D;                    // [kWarps][kRows]
  float* sl = sm + kWarps * kRows;                        // [kWarps][kRows]
  {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<float2*>(so + (warp * kRows + g + 8 * h) * D + 8 * dt + 2 * t) =
            make_float2(acc[dt][2 * h], acc[dt][2 * h + 1]);
      }
    }
    if (t == 0) {
      sm[warp * kRows + g] = m[0];
      sm[warp * kRows + g + 8] = m[1];
      sl[warp * kRows + g] = l[0];
      sl[warp * kRows + g + 8] = l[1];
    }
  }
  __syncthreads();

  for (int item = threadIdx.x; item < kRows * kRowChunks; item += kThreads) {
    const int lr = item / kRowChunks, d0 = 8 * (item % kRowChunks);
    const int r = row_tile * kRows + lr;
    if (r >= p.rows) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm[w * kRows + lr]);
    float o[8] = {}, total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = sm[w * kRows + lr];
      if (mw == -INFINITY) continue;  // this warp saw no key
      const float weight = exp2f(mw - mx);
      total += sl[w * kRows + lr] * weight;
      const float* ow = so + (w * kRows + lr) * D + d0;
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] += ow[k] * weight;
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] *= inv;
    if (p.num_splits > 1) {  // an empty split stores lse = -inf and zeros: the merge skips it
      const int64_t part =
          ((b * p.heads_kv + kv_head) * p.num_splits + split) * int64_t(p.rows) + r;
      float4* dst = reinterpret_cast<float4*>(p.o_part + part * D + d0);
      dst[0] = make_float4(o[0], o[1], o[2], o[3]);
      dst[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (d0 == 0) p.lse_part[part] = total > 0.f ? mx + log2f(total) : -INFINITY;
    } else {
      const int64_t i = r / p.group, head = kv_head * p.group + r % p.group;
      T* dst = static_cast<T*>(p.out) + b * p.out_stride[0] + i * p.out_stride[1] +
               head * p.out_stride[2] + d0;
      *reinterpret_cast<uint4*>(dst) = pack8<T>(o);
    }
  }
#endif
}

// Grid ceil(B * Hkv * G * Sq / kWarps), kThreads threads: one warp per query row (b, KV head,
// r), each lane D / 32 dims. out = sum_s 2^(lse_s - mx) o_s / sum_s 2^(lse_s - mx), over the
// splits with lse_s > -inf (the last split always has the new keys, so mx is finite).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attn_kvcache_merge_kernel(const Params p, int64_t total_rows) {
  constexpr int kPer = D / 32;  // 2 or 4 consecutive dims per lane
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;  // (b * Hkv + kv, r)
  const int lane = threadIdx.x % 32;
  if (row >= total_rows) return;
  const int64_t bh = row / p.rows;
  const int r = int(row % p.rows);
  const int64_t b = bh / p.heads_kv, kv_head = bh % p.heads_kv;
  const int64_t first = bh * p.num_splits * int64_t(p.rows) + r;  // split s: first + s * rows
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_part[first + s * int64_t(p.rows)]);
  float o[kPer] = {}, total = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const int64_t part = first + s * int64_t(p.rows);
    const float lse = p.lse_part[part];
    if (lse == -INFINITY) continue;
    const float weight = exp2f(lse - mx);
    total += weight;
    const float* src = p.o_part + part * D + lane * kPer;
#pragma unroll
    for (int k = 0; k < kPer; ++k) o[k] += weight * src[k];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const int64_t i = r / p.group, head = kv_head * p.group + r % p.group;
  T* dst = static_cast<T*>(p.out) + b * p.out_stride[0] + i * p.out_stride[1] +
           head * p.out_stride[2] + lane * kPer;
#pragma unroll
  for (int k = 0; k < kPer; k += 2) {
    *reinterpret_cast<uint32_t*>(dst + k) = pack2<T>(o[k] * inv, o[k + 1] * inv);
  }
}

// ---- host side ----

// A device attribute of the current device, queried once per device and cached.
int cached_device_attribute(cudaDeviceAttr attr, std::atomic<int> (&cache)[kMaxDevices]) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "attention_with_kvcache: cudaGetDevice");
  if (device >= 0 && device < kMaxDevices) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, attr, device),
             "attention_with_kvcache: cudaDeviceGetAttribute");
  if (device >= 0 && device < kMaxDevices) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

std::atomic<int> g_sm_count[kMaxDevices];
std::atomic<int> g_cc_major[kMaxDevices];

bool aligned16(uintptr_t ptr, const Strides3& strides) {
  return ptr % 16 == 0 && strides[0] % 8 == 0 && strides[1] % 8 == 0 && strides[2] % 8 == 0;
}

template <typename T, int D>
void launch(const Params& p, int64_t batch_heads, int64_t row_tiles, cudaStream_t stream) {
  auto fwd = attn_kvcache_fwd_kernel<T, D>;
  check_cuda(cudaFuncSetAttribute(fwd, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  int(Smem<D>::kBytes)),
             "attention_with_kvcache: cudaFuncSetAttribute");
  const dim3 grid(unsigned(batch_heads), unsigned(p.num_splits), unsigned(row_tiles));
  fwd<<<grid, kThreads, Smem<D>::kBytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "attention_with_kvcache launch");
  if (p.num_splits > 1) {
    const int64_t total_rows = batch_heads * p.rows;
    const unsigned blocks = unsigned((total_rows + kWarps - 1) / kWarps);
    attn_kvcache_merge_kernel<T, D><<<blocks, kThreads, 0, stream>>>(p, total_rows);
    check_cuda(cudaGetLastError(), "attention_with_kvcache merge launch");
  }
}

}  // namespace

int64_t attention_with_kvcache_num_splits(int64_t batch, int64_t heads_kv, int64_t rows,
                                          int64_t max_seqlen) {
  check_arg(batch >= 0 && heads_kv >= 0 && rows >= 0 && max_seqlen >= 0, "shape",
            "non-negative sizes");
  const int64_t sms = cached_device_attribute(cudaDevAttrMultiProcessorCount, g_sm_count);
  const int64_t blocks = batch * heads_kv * ((rows + kRows - 1) / kRows);
  if (blocks == 0 || blocks >= sms) return 1;
  const int64_t by_occupancy = (sms + blocks - 1) / blocks;
  const int64_t by_length = std::max<int64_t>(1, max_seqlen / kMinKeysPerSplit);
  return std::min<int64_t>({by_occupancy, by_length, kMaxSplits});
}

void attention_with_kvcache(
    uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_new, uintptr_t v_new,
    uintptr_t cache_seqlens, uintptr_t rotary_cos, uintptr_t rotary_sin, uintptr_t out,
    uintptr_t o_part, uintptr_t lse_part, int64_t batch, int64_t seqlen_q, int64_t heads_q,
    int64_t heads_kv, int64_t head_dim, int64_t max_seqlen, int64_t rotary_rows,
    Strides3 q_strides, Strides3 k_cache_strides, Strides3 v_cache_strides,
    Strides3 k_new_strides, Strides3 v_new_strides, Strides3 out_strides, int64_t cos_stride,
    int64_t sin_stride, int dtype, int rotary_dtype, double softmax_scale, int64_t num_splits,
    uintptr_t stream) {
  // Memory-safety checks only; everything else is validated in Python.
  check_arg(dtype == kFloat16 || dtype == kBFloat16, "dtype",
            "1 (fp16) or 2 (bf16), got " + std::to_string(dtype));
  check_arg(head_dim == 64 || head_dim == 128, "head_dim",
            "64 or 128, got " + std::to_string(head_dim));
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
  const Strides3* strided[] = {&q_strides, &k_cache_strides, &v_cache_strides,
                               &k_new_strides, &v_new_strides, &out_strides};
  const uintptr_t ptrs[] = {q, k_cache, v_cache, k_new, v_new, out};
  const char* names[] = {"q", "k_cache", "v_cache", "k_new", "v_new", "out"};
  for (int k = 0; k < 6; ++k) {
    check_arg(aligned16(ptrs[k], *strided[k]), names[k],
              "16-byte aligned rows (data_ptr and strides multiples of 8 elements)");
  }
  const int64_t group = heads_q / heads_kv;
  const int64_t rows = group * seqlen_q;
  const int64_t batch_heads = batch * heads_kv;
  if (batch == 0 || rows == 0) return;
  const int64_t row_tiles = (rows + kRows - 1) / kRows;
  check_arg(batch_heads <= INT32_MAX && row_tiles <= 65535 &&
                batch_heads * rows / kWarps < INT32_MAX,
            "shape", "B * Hkv < 2^31, Hq / Hkv * Sq / 16 <= 65535, B * Hq * Sq / 4 < 2^31");
  check_arg(num_splits == 1 || (o_part != 0 && lse_part != 0), "o_part",
            "partial buffers when num_splits > 1");

  // Checks the device (and the driver) before anything runs: RuntimeError without a GPU.
  const int major = cached_device_attribute(cudaDevAttrComputeCapabilityMajor, g_cc_major);
  if (major < 8) {
    throw std::runtime_error("attention_with_kvcache: needs compute capability >= 8.0, got " +
                             std::to_string(major) + ".x");
  }

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
  for (int k = 0; k < 3; ++k) {
    p.q_stride[k] = q_strides[k];
    p.kc_stride[k] = k_cache_strides[k];
    p.vc_stride[k] = v_cache_strides[k];
    p.kn_stride[k] = k_new_strides[k];
    p.vn_stride[k] = v_new_strides[k];
    p.out_stride[k] = out_strides[k];
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

  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == kFloat16) {
    head_dim == 64 ? launch<__half, 64>(p, batch_heads, row_tiles, s)
                   : launch<__half, 128>(p, batch_heads, row_tiles, s);
  } else {
    head_dim == 64 ? launch<__nv_bfloat16, 64>(p, batch_heads, row_tiles, s)
                   : launch<__nv_bfloat16, 128>(p, batch_heads, row_tiles, s);
  }
}

}  // namespace lsk
