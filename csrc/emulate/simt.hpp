// A SIMT emulator for testing csrc/ kernels on a machine without a GPU (tests only; never built
// into layerskip_kernels._C). The kernel source is compiled for the host with LSK_EMULATE; its
// device primitives (csrc/device.cuh) call into this file.
//
// Every thread of a block runs as a fiber (ucontext) on one OS thread; blocks run one after
// another. A fiber runs until it reaches a warp collective (ldmatrix, mma, shfl, __syncwarp) or
// a barrier, then the scheduler picks the next runnable fiber: in thread order, in reverse, or
// at random (Options::schedule). The emulator implements the PTX ISA's semantics for
// ldmatrix .x4 (.trans) and mma.m16n8k16 (fp16 / bf16 in, fp32 accumulate) on its own, from
// the ISA's fragment tables, and checks, raising lsk::emu::Error on the first violation:
//   - every global access lies inside a registered buffer (writes: a writable one), aligned to
//     its size; every shared access inside the block's dynamic shared memory, aligned;
//   - no shared word is read before this block wrote it (uninitialised shared memory);
//   - shared-memory races: a vector clock per thread, joined at __syncwarp / bar.sync /
//     __syncthreads; a read must happen after the last write of the word, a write after the
//     last write and every read since (warp collectives do not order memory, as on the GPU);
//   - cp.async: the copy lands when its group is waited for (earlier reads see the old data),
//     it is checked as a write at issue and at completion; no copy may be pending at exit;
//   - warp collectives: all 32 lanes reach the same kind of collective (else: divergence);
//     barriers: every thread that can reach one does (else: deadlock, with who waits where);
//   - global words: written at most once per launch, and never read by a block other than the
//     one that wrote them (blocks of one launch are unordered).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace lsk {
namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
enum class Space { kGlobal, kShared };

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Stats {
  int64_t blocks = 0;
  int64_t ldmatrix_phases = 0;     // 8-row phases of ldmatrix (4 per .x4)
  int64_t ldmatrix_conflicts = 0;  // phases whose 8 rows do not fall in 8 distinct bank quads
};

struct Options {
  int schedule = 0;  // 0: thread order, 1: reverse, >= 2: random with this seed
  bool racecheck = true;
  Stats* stats = nullptr;
};

// A global-memory buffer the kernel may touch, with per-4-byte-word shadows when writable.
struct Buffer {
  std::string name;
  uintptr_t begin = 0, end = 0;
  bool writable = false;
  std::vector<int32_t> writer;   // block id, -1: none
  std::vector<uint8_t> writes;   // times written in this launch
  std::vector<int32_t> reader;   // block id, -1: none, -2: more than one block
};

struct Copy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false, blocked = false;
  uint64_t wait_gen = 0;
  const char* waiting_at = "";
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
  uint64_t collectives = 0;
};

constexpr int kMaxReaders = 8;
struct Word {  // shadow of one 4-byte shared-memory word
  int16_t wtid = -1;
  uint32_t wclk = 0;
  uint8_t nreads = 0;  // reads since the last write, in rtid / rclk, or in wide_reads[wide]
  int32_t wide = -1;   // when more than kMaxReaders threads read: a clock per thread
  int16_t rtid[kMaxReaders];
  uint32_t rclk[kMaxReaders];
};

struct Collective {
  int kind = -1, arrived = 0, arg = 0;
  uint64_t gen = 0;
  uint64_t in[32][10];
  uint64_t out[32][4];
};

struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t gen = 0;
  std::vector<int> members;
};

struct State {
  Dim3 grid, block;
  int threads = 0, block_id = 0;
  Options options;
  std::vector<Buffer> buffers;
  std::vector<unsigned char> smem;
  std::vector<Word> shadow;
  std::vector<std::vector<uint32_t>> wide_reads;  // read clock per thread, 0: no read
  std::vector<Fiber> fibers;
  int current = -1;
  ucontext_t scheduler;
  std::vector<Collective> warps[2];  // by parity of the lane's collective count
  Barrier barriers[16];
  std::vector<uint32_t> vc;  // threads x threads
  std::exception_ptr error;
  std::mt19937 rng;
  const std::function<void()>* body = nullptr;
};

inline State*& state() {
  static State* s = nullptr;
  return s;
}
inline State& st() {
  State* s = state();
  if (s == nullptr) throw Error("emulator: no launch in progress");
  return *s;
}
inline int tid() { return st().current; }

[[noreturn]] inline void fail(const std::string& what) {
  State& s = st();
  throw Error("block (" + std::to_string(s.block_id % s.grid.x) + ", " +
              std::to_string(s.block_id / s.grid.x % s.grid.y) + ", " +
              std::to_string(s.block_id / s.grid.x / s.grid.y) + ") thread " +
              std::to_string(s.current) + ": " + what);
}

inline Dim3 thread_idx() { return Dim3{unsigned(tid()), 0, 0}; }
inline Dim3 block_idx() {
  State& s = st();
  return Dim3{unsigned(s.block_id % s.grid.x), unsigned(s.block_id / s.grid.x % s.grid.y),
              unsigned(s.block_id / s.grid.x / s.grid.y)};
}
inline unsigned char* dynamic_smem() { return st().smem.data(); }

// ---- scheduling ----
inline void yield_blocked(const char* where) {
  State& s = st();
  Fiber& f = s.fibers[s.current];
  f.blocked = true;
  f.waiting_at = where;
  swapcontext(&f.ctx, &s.scheduler);
}

inline void release(int t) { st().fibers[t].blocked = false; }

// ---- vector clocks ----
inline uint32_t* clock_of(int t) { State& s = st(); return s.vc.data() + size_t(t) * s.threads; }
inline void join_clocks(const std::vector<int>& members) {
  State& s = st();
  std::vector<uint32_t> joined(s.threads, 0);
  for (int m : members) {
    const uint32_t* c = clock_of(m);
    for (int k = 0; k < s.threads; ++k) joined[k] = std::max(joined[k], c[k]);
  }
  for (int m : members) {
    std::memcpy(clock_of(m), joined.data(), sizeof(uint32_t) * s.threads);
    clock_of(m)[m] += 1;
  }
}
inline bool happened_before(int other, uint32_t clk, int t) {
  return other == t || clock_of(t)[other] >= clk;
}

// ---- shared-memory race detection ----
inline Word& shadow_word(size_t offset) { return st().shadow[offset / 4]; }

inline void check_write(size_t offset, size_t bytes, int t, const char* what, bool record) {
  State& s = st();
  for (size_t o = offset; o < offset + bytes; o += 4) {
    Word& w = shadow_word(o);
    if (!s.options.racecheck) {
      if (record) w.wtid = int16_t(t);  // written: reads of it are initialised
      continue;
    }
    if (w.wtid >= 0 && !happened_before(w.wtid, w.wclk, t)) {
      fail(std::string(what) + ": write-after-write race on shared byte " + std::to_string(o) +
           " (last written by thread " + std::to_string(w.wtid) + ")");
    }
    auto check_reader = [&](int reader, uint32_t clk) {
      if (!happened_before(reader, clk, t)) {
        fail(std::string(what) + ": write-after-read race on shared byte " + std::to_string(o) +
             " (read by thread " + std::to_string(reader) + ")");
      }
    };
    if (w.wide >= 0) {
      const std::vector<uint32_t>& clocks = s.wide_reads[w.wide];
      for (int r = 0; r < s.threads; ++r) {
        if (clocks[r] != 0) check_reader(r, clocks[r]);
      }
    } else {
      for (int k = 0; k < w.nreads; ++k) check_reader(w.rtid[k], w.rclk[k]);
    }
    if (record) {
      w.wtid = int16_t(t);
      w.wclk = clock_of(t)[t];
      w.nreads = 0;
      if (w.wide >= 0) std::fill(s.wide_reads[w.wide].begin(), s.wide_reads[w.wide].end(), 0u);
    }
  }
}

inline void check_read(size_t offset, size_t bytes, int t, const char* what) {
  State& s = st();
  for (size_t o = offset; o < offset + bytes; o += 4) {
    Word& w = shadow_word(o);
    if (w.wtid < 0) {
      fail(std::string(what) + ": read of uninitialised shared byte " + std::to_string(o));
    }
    if (!s.options.racecheck) continue;
    if (!happened_before(w.wtid, w.wclk, t)) {
      fail(std::string(what) + ": read-after-write race on shared byte " + std::to_string(o) +
           " (written by thread " + std::to_string(w.wtid) + ")");
    }
    if (w.wide >= 0) {
      s.wide_reads[w.wide][t] = clock_of(t)[t];
      continue;
    }
    int k = 0;
    while (k < w.nreads && w.rtid[k] != t) ++k;
    if (k == kMaxReaders) {  // one more reader: a clock per thread from now on
      w.wide = int32_t(s.wide_reads.size());
      s.wide_reads.emplace_back(s.threads, 0u);
      for (int j = 0; j < w.nreads; ++j) s.wide_reads[w.wide][w.rtid[j]] = w.rclk[j];
      s.wide_reads[w.wide][t] = clock_of(t)[t];
      continue;
    }
    if (k == w.nreads) ++w.nreads;
    w.rtid[k] = int16_t(t);
    w.rclk[k] = clock_of(t)[t];
  }
}

inline size_t shared_offset(const void* p, size_t bytes, const char* what) {
  State& s = st();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < s.smem.data() || c + bytes > s.smem.data() + s.smem.size()) {
    fail(std::string(what) + ": shared access outside the block's " +
         std::to_string(s.smem.size()) + " bytes");
  }
  const size_t offset = size_t(c - s.smem.data());
  if (offset % bytes != 0) {
    fail(std::string(what) + ": misaligned shared access of " + std::to_string(bytes) +
         " bytes at offset " + std::to_string(offset));
  }
  if (offset % 4 != 0 || bytes % 4 != 0) {
    fail(std::string(what) + ": shared accesses narrower than 4 bytes are not emulated");
  }
  return offset;
}

// ---- global memory ----
inline Buffer& global_buffer(const void* p, size_t bytes, bool write, const char* what) {
  State& s = st();
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a % bytes != 0) {
    fail(std::string(what) + ": misaligned global access of " + std::to_string(bytes) + " bytes");
  }
  for (Buffer& b : s.buffers) {
    if (a >= b.begin && a + bytes <= b.end) {
      if (write && !b.writable) fail(std::string(what) + ": write to read-only " + b.name);
      return b;
    }
    if (a < b.end && a + bytes > b.begin) {
      fail(std::string(what) + ": global access straddles the end of " + b.name);
    }
  }
  fail(std::string(what) + ": global access outside every buffer");
}

inline void record_global(Buffer& b, const void* p, size_t bytes, bool write) {
  if (!b.writable) return;
  State& s = st();
  const size_t first = (reinterpret_cast<uintptr_t>(p) - b.begin) / 4;
  for (size_t w = first; w < first + (bytes + 3) / 4; ++w) {
    if (write) {
      if (b.writes[w] == 255) continue;
      b.writes[w] += 1;
      b.writer[w] = s.block_id;
    } else if (b.reader[w] == -1) {
      b.reader[w] = s.block_id;
    } else if (b.reader[w] != s.block_id) {
      b.reader[w] = -2;
    }
  }
}

template <typename V>
inline V load(const void* p, Space space) {
  V v;
  if (space == Space::kGlobal) {
    record_global(global_buffer(p, sizeof(V), false, "load"), p, sizeof(V), false);
  } else {
    check_read(shared_offset(p, sizeof(V), "load"), sizeof(V), tid(), "shared load");
  }
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store(void* p, const V& v, Space space) {
  if (space == Space::kGlobal) {
    record_global(global_buffer(p, sizeof(V), true, "store"), p, sizeof(V), true);
  } else {
    check_write(shared_offset(p, sizeof(V), "store"), sizeof(V), tid(), "shared store", true);
  }
  std::memcpy(p, &v, sizeof(V));
}

// ---- cp.async ----
inline void cp_async16(void* dst, const void* src, bool valid) {
  State& s = st();
  Fiber& f = s.fibers[s.current];
  Copy c;
  c.dst = static_cast<unsigned char*>(dst);
  const size_t offset = shared_offset(dst, 16, "cp.async");
  check_write(offset, 16, s.current, "cp.async issue", false);
  if (valid) {
    record_global(global_buffer(src, 16, false, "cp.async"), src, 16, false);
    std::memcpy(c.data, src, 16);
  } else {
    std::memset(c.data, 0, 16);
  }
  f.open.push_back(c);
}
inline void cp_async_commit() {
  State& s = st();
  Fiber& f = s.fibers[s.current];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
inline void cp_async_wait(int n) {
  State& s = st();
  Fiber& f = s.fibers[s.current];
  while (int(f.groups.size()) > n) {
    for (const Copy& c : f.groups.front()) {
      const size_t offset = size_t(c.dst - s.smem.data());
      check_write(offset, 16, s.current, "cp.async completion", true);
      std::memcpy(c.dst, c.data, 16);
    }
    f.groups.erase(f.groups.begin());
  }
}

// ---- barriers ----
inline void barrier_sync(int id, int count, const char* where) {
  State& s = st();
  if (count <= 0 || count % 32 != 0 || count > s.threads) {
    fail(std::string(where) + ": barrier thread count " + std::to_string(count));
  }
  Barrier& b = s.barriers[id];
  if (b.arrived == 0) {
    b.expected = count;
  } else if (b.expected != count) {
    fail(std::string(where) + ": barrier " + std::to_string(id) + " expects " +
         std::to_string(b.expected) + " threads, this one " + std::to_string(count));
  }
  b.members.push_back(s.current);
  b.arrived += 1;
  const uint64_t gen = b.gen;
  if (b.arrived == b.expected) {
    join_clocks(b.members);
    for (int m : b.members) release(m);
    b.members.clear();
    b.arrived = 0;
    b.gen += 1;
    return;
  }
  Fiber& f = s.fibers[s.current];
  f.wait_gen = gen;
  while (b.gen == gen) yield_blocked(where);
}
inline void sync_block() { barrier_sync(0, st().threads, "__syncthreads"); }
inline void sync_named(int id, int threads) {
  if (id < 1 || id > 15) fail("bar.sync: named barrier id " + std::to_string(id));
  barrier_sync(id, threads, "bar.sync");
}
[[noreturn]] inline void trap() { fail("__trap"); }

// ---- warp collectives ----
enum Kind { kShfl = 0, kSyncWarp, kLdmatrix, kLdmatrixTrans, kMma16, kMmaBf16 };
constexpr const char* kKindNames[] = {"shfl", "__syncwarp", "ldmatrix", "ldmatrix.trans",
                                      "mma.f16", "mma.bf16"};

// Lane `lane` of the current warp deposits `in`; when all 32 lanes are in, `compute` fills
// every lane's `out`; returns this lane's slot.
template <typename Compute>
inline const uint64_t* collective(int kind, int arg, const uint64_t* in, int n, Compute compute) {
  State& s = st();
  const int t = s.current, warp = t / 32, lane = t % 32;
  Fiber& f = s.fibers[t];
  Collective& c = s.warps[f.collectives % 2][warp];
  f.collectives += 1;
  if (c.arrived == 0) {
    c.kind = kind;
    c.arg = arg;
  } else if (c.kind != kind || c.arg != arg) {
    fail(std::string("warp divergence: lane reaches ") + kKindNames[kind] +
         " while another lane of its warp is in " + kKindNames[c.kind]);
  }
  std::memcpy(c.in[lane], in, sizeof(uint64_t) * n);
  c.arrived += 1;
  const uint64_t gen = c.gen;
  if (c.arrived == 32) {
    compute(c);
    c.arrived = 0;
    c.gen += 1;
    for (int l = 0; l < 32; ++l) release(warp * 32 + l);
  } else {
    while (c.gen == gen) yield_blocked(kKindNames[kind]);
  }
  return c.out[lane];
}

inline float shfl_xor(float v, int lane_mask) {
  uint64_t in = 0;
  std::memcpy(&in, &v, 4);
  const uint64_t* out = collective(kShfl, lane_mask, &in, 1, [&](Collective& c) {
    for (int l = 0; l < 32; ++l) c.out[l][0] = c.in[l ^ lane_mask][0];
  });
  float r;
  std::memcpy(&r, out, 4);
  return r;
}

inline void sync_warp() {
  State& s = st();
  const int warp = s.current / 32;
  collective(kSyncWarp, 0, nullptr, 0, [&](Collective&) {
    std::vector<int> lanes(32);
    for (int l = 0; l < 32; ++l) lanes[l] = warp * 32 + l;
    join_clocks(lanes);
  });
}

// ldmatrix .x4: matrix m's row i is 16 bytes at the address of lane 8 m + i. Lane l receives,
// of each matrix, the 32 bits holding (row l / 4, cols 2 (l % 4), 2 (l % 4) + 1); with .trans,
// (row 2 (l % 4), col l / 4) in the low half and (row 2 (l % 4) + 1, col l / 4) in the high.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* ptr, bool trans) {
  State& s = st();
  const int warp = s.current / 32;
  const uint64_t in = reinterpret_cast<uintptr_t>(ptr);
  const uint64_t* out =
      collective(trans ? kLdmatrixTrans : kLdmatrix, 0, &in, 1, [&](Collective& c) {
        uint16_t mat[4][8][8];
        for (int m = 0; m < 4; ++m) {
          if (s.options.stats != nullptr) {  // one phase per matrix: 8 rows of 16 bytes
            unsigned quads = 0;
            for (int i = 0; i < 8; ++i) {
              const uintptr_t a = uintptr_t(c.in[8 * m + i][0]) - uintptr_t(s.smem.data());
              quads |= 1u << ((a / 16) % 8);
            }
            s.options.stats->ldmatrix_phases += 1;
            s.options.stats->ldmatrix_conflicts += quads != 0xffu;
          }
          for (int i = 0; i < 8; ++i) {
            const int owner = 8 * m + i;
            const void* row = reinterpret_cast<const void*>(uintptr_t(c.in[owner][0]));
            const int saved = s.current;
            s.current = warp * 32 + owner;  // the read is the lane's that gave the address
            const size_t offset = shared_offset(row, 16, "ldmatrix");
            check_read(offset, 16, s.current, "ldmatrix");
            s.current = saved;
            std::memcpy(mat[m][i], row, 16);
          }
        }
        for (int l = 0; l < 32; ++l) {
          for (int m = 0; m < 4; ++m) {
            uint16_t lo, hi;
            if (!trans) {
              lo = mat[m][l / 4][2 * (l % 4)];
              hi = mat[m][l / 4][2 * (l % 4) + 1];
            } else {
              lo = mat[m][2 * (l % 4)][l / 4];
              hi = mat[m][2 * (l % 4) + 1][l / 4];
            }
            c.out[l][m] = uint64_t(lo) | (uint64_t(hi) << 16);
          }
        }
      });
  for (int m = 0; m < 4; ++m) r[m] = uint32_t(out[m]);
}

inline float bits_to_float(uint16_t bits, bool half) {
  if (half) {
    __half_raw h;
    h.x = bits;
    return __half2float(__half(h));
  }
  __nv_bfloat16_raw b;
  b.x = bits;
  return __bfloat162float(__nv_bfloat16(b));
}

// mma.m16n8k16, A 16x16 row-major, B 16x8 column-major, C = D 16x8 fp32. With g = lane / 4,
// t = lane % 4 (PTX ISA, "Matrix fragments for mma.m16n8k16"): a regs {a0a1, a2a3, a4a5, a6a7}
// hold A (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); b regs {b0b1, b2b3} hold
// B (k 2t..2t+1, n g), (k 2t+8.., n g); c0..c3 are (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
// Products are exact in fp32; the sum is taken in double and rounded once.
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                     bool half) {
  uint64_t in[10];
  for (int k = 0; k < 4; ++k) in[k] = a[k];
  in[4] = b0;
  in[5] = b1;
  for (int k = 0; k < 4; ++k) {
    uint32_t bits;
    std::memcpy(&bits, &d[k], 4);
    in[6 + k] = bits;
  }
  const uint64_t* out = collective(half ? kMma16 : kMmaBf16, 0, in, 10, [&](Collective& c) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int k = 0; k < 4; ++k) {
        A[rows[k]][cols[k]] = bits_to_float(uint16_t(c.in[l][k]), half);
        A[rows[k]][cols[k] + 1] = bits_to_float(uint16_t(c.in[l][k] >> 16), half);
      }
      for (int k = 0; k < 2; ++k) {
        B[2 * t + 8 * k][g] = bits_to_float(uint16_t(c.in[l][4 + k]), half);
        B[2 * t + 8 * k + 1][g] = bits_to_float(uint16_t(c.in[l][4 + k] >> 16), half);
      }
      for (int k = 0; k < 4; ++k) {
        float v;
        const uint32_t bits = uint32_t(c.in[l][6 + k]);
        std::memcpy(&v, &bits, 4);
        C[g + 8 * (k / 2)][2 * t + k % 2] = v;
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int k = 0; k < 4; ++k) {
        const int row = g + 8 * (k / 2), col = 2 * t + k % 2;
        double acc = C[row][col];
        for (int kk = 0; kk < 16; ++kk) acc += double(A[row][kk]) * double(B[kk][col]);
        const float v = float(acc);
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        c.out[l][k] = bits;
      }
    }
  });
  for (int k = 0; k < 4; ++k) {
    const uint32_t bits = uint32_t(out[k]);
    std::memcpy(&d[k], &bits, 4);
  }
}

// ---- launch ----
inline void fiber_entry() {
  State& s = st();
  Fiber& f = s.fibers[s.current];
  try {
    (*s.body)();
    if (!f.open.empty() || !f.groups.empty()) fail("cp.async copies still pending at exit");
  } catch (...) {
    if (!s.error) s.error = std::current_exception();
  }
  s.fibers[s.current].done = true;
  swapcontext(&s.fibers[s.current].ctx, &s.scheduler);
}

inline std::string deadlock_report(State& s) {
  std::string r = "deadlock: no thread can run;";
  int shown = 0;
  for (int t = 0; t < s.threads && shown < 8; ++t) {
    if (!s.fibers[t].done) {
      r += " thread " + std::to_string(t) + " waits in " + s.fibers[t].waiting_at + ";";
      ++shown;
    }
  }
  return r;
}

// Runs `body` for every thread of every block of `grid`, blocks in order, threads as fibers.
// `buffers`: the global memory the kernel may touch.
inline void launch(Dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body,
                   std::vector<Buffer>& buffers, const Options& options) {
  if (threads <= 0 || threads % 32 != 0 || threads > 1024) {
    throw Error("emulator: block of " + std::to_string(threads) + " threads");
  }
  State s;
  s.grid = grid;
  s.threads = threads;
  s.options = options;
  s.rng.seed(unsigned(options.schedule));
  s.body = &body;
  for (Buffer& b : buffers) {
    const size_t words = (b.end - b.begin + 3) / 4;
    if (b.writable) {
      b.writer.assign(words, -1);
      b.writes.assign(words, 0);
      b.reader.assign(words, -1);
    }
  }
  s.buffers = std::move(buffers);
  struct Restore {
    State* prev;
    ~Restore() { state() = prev; }
  } restore{state()};
  state() = &s;
  s.fibers.resize(threads);
  for (Fiber& f : s.fibers) f.stack.resize(64 * 1024);  // kernel frames are a few KB
  s.warps[0].resize(threads / 32);
  s.warps[1].resize(threads / 32);
  const int blocks = int(grid.x * grid.y * grid.z);
  for (int block = 0; block < blocks; ++block) {
    s.block_id = block;
    if (options.stats != nullptr) options.stats->blocks += 1;
    s.smem.assign(smem_bytes, 0xff);  // NaN in every float format
    s.shadow.assign((smem_bytes + 3) / 4, Word{});
    s.wide_reads.clear();
    s.vc.assign(size_t(threads) * threads, 0);
    for (int t = 0; t < threads; ++t) s.vc[size_t(t) * threads + t] = 1;
    for (Barrier& b : s.barriers) b = Barrier{};
    for (auto& parity : s.warps) {
      for (Collective& c : parity) c = Collective{};
    }
    for (int t = 0; t < threads; ++t) {
      Fiber& f = s.fibers[t];
      f.done = f.blocked = false;
      f.groups.clear();
      f.open.clear();
      f.collectives = 0;
      f.waiting_at = "";
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    int next = 0;
    while (true) {
      std::vector<int> runnable;
      for (int t = 0; t < threads; ++t) {
        if (!s.fibers[t].done && !s.fibers[t].blocked) runnable.push_back(t);
      }
      if (runnable.empty()) {
        bool all_done = true;
        for (const Fiber& f : s.fibers) all_done = all_done && f.done;
        if (all_done) break;
        s.current = -1;
        throw Error("block " + std::to_string(block) + ": " + deadlock_report(s));
      }
      int pick;
      if (options.schedule == 0) {  // round robin from `next`
        pick = runnable.front();
        for (int t : runnable) {
          if (t >= next) { pick = t; break; }
        }
      } else if (options.schedule == 1) {
        pick = runnable.back();
      } else {
        pick = runnable[s.rng() % runnable.size()];
      }
      next = pick + 1;
      s.current = pick;
      swapcontext(&s.scheduler, &s.fibers[pick].ctx);
      s.current = -1;
      if (s.error) std::rethrow_exception(s.error);
    }
  }
  buffers = std::move(s.buffers);
  for (const Buffer& b : buffers) {
    if (!b.writable) continue;
    for (size_t w = 0; w < b.writes.size(); ++w) {
      if (b.writes[w] > 1) {
        throw Error(b.name + ": word " + std::to_string(w) + " written " +
                    std::to_string(b.writes[w]) + " times in one launch");
      }
      if (b.writes[w] == 1 && b.reader[w] != -1 && b.reader[w] != b.writer[w]) {
        throw Error(b.name + ": word " + std::to_string(w) + " written by block " +
                    std::to_string(b.writer[w]) + " and read by another block");
      }
    }
  }
}

}  // namespace emu
}  // namespace lsk
