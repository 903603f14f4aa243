// The CPU layer's dispatcher: the work buffers, the thread team, and the pick of an instruction
// set at run time. The kernels (llama_layer_body.h over simd.h) are compiled here three times
// on x86-64 (AVX-512, AVX2 + FMA, the SSE2 baseline) and once elsewhere (e.g. NEON on aarch64),
// so one binary runs on any CPU of its architecture and uses the widest vectors it has.
#include "llama_layer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LSK_PAUSE() _mm_pause()
#define LSK_X86 1
#elif defined(__aarch64__)
#define LSK_PAUSE() __asm__ __volatile__("yield")
#else
#define LSK_PAUSE() ((void)0)
#endif

namespace lsk_cpu {

struct Range {
  int64_t begin, end;
};

// The threads of one call. run(n, fn, ctx): fn(ctx, task, tid) for every task in [0, n), the
// caller (tid 0) and any awake pool thread claiming tasks until none is left; returns when all
// are done. tasks(units): how many tasks to cut `units` W-row panels into (1 when alone: no
// scheduling at all; else a few per thread, so a late thread leaves little to wait for).
typedef void (*TaskFn)(void* ctx, int64_t task, int tid);

struct Team {
  int nt;
  void* pool;
  void (*for_each)(void* pool, int64_t tasks, TaskFn fn, void* ctx);
  void run(int64_t n, TaskFn fn, void* ctx) const {
    if (nt == 1 || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(ctx, i, 0);
      return;
    }
    for_each(pool, n, fn, ctx);
  }
  int64_t tasks(int64_t units) const { return nt == 1 ? 1 : std::min<int64_t>(units, 4 * nt); }
};

// The work buffers of one call (floats; ld* are row strides, multiples of the vector width,
// rows zero-padded where a matmul reads them).
struct Plan {
  int64_t T, ldd, ldqkv, lda, ldgu, ldact;
  float* qkv;      // (T, ldqkv)   q | k | v of each token
  float* attn;     // (T, lda)     attention output, heads side by side
  float* gate_up;  // (T, ldgu)    gate | up
  float* act;      // (T, ldact)   silu(gate) * up
  float* y;        // (T, ldd)     normed activations
  float* const* scores;  // per thread: (G * S, keys) rounded up to 16s: softmax rows or columns
  float* const* queries; // per thread: (D, W) up to W queries, transposed
};

// ---------------------------------------------------------------- the kernels, per ISA
#if defined(LSK_X86) && (defined(__GNUC__) || defined(__clang__))
namespace avx512 {
#define LSK_W 16
#define LSK_FN __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma,avx2,bmi2")))
#include "simd.h"
#include "llama_layer_body.h"
#undef LSK_W
#undef LSK_FN
#undef LSK_INL
}  // namespace avx512
namespace avx2 {
#define LSK_W 8
#define LSK_FN __attribute__((target("avx2,fma")))
#include "simd.h"
#include "llama_layer_body.h"
#undef LSK_W
#undef LSK_FN
#undef LSK_INL
}  // namespace avx2
#define LSK_HAVE_X86_CLONES 1
#endif
namespace generic {
#define LSK_W 4
#define LSK_FN
#include "simd.h"
#include "llama_layer_body.h"
#undef LSK_W
#undef LSK_FN
#undef LSK_INL
}  // namespace generic

namespace {

enum class Isa { kAvx512, kAvx2, kGeneric };

bool supported(Isa isa) {
#ifdef LSK_HAVE_X86_CLONES
  __builtin_cpu_init();
  if (isa == Isa::kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == Isa::kGeneric;
}

Isa detect() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (supported(isa)) return isa;
  return Isa::kGeneric;
}

const char* const kIsaNames[] = {"avx512", "avx2", "generic"};

// The widest instruction set the CPU has; set_isa() may pick a narrower one (tests).
std::atomic<Isa> g_isa{detect()};

// ---------------------------------------------------------------- work buffers
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& other) noexcept : data_(other.data_), size_(other.size_) {
    other.data_ = nullptr;
    other.size_ = 0;
  }
  ~Buffer() { release(); }
  float* get(size_t n) {  // 64-byte aligned, at least n floats; old contents are not kept
    if (n > size_) {
      release();
      size_ = std::max(n, 2 * size_);
      data_ = static_cast<float*>(::operator new[](size_ * sizeof(float), std::align_val_t(64)));
    }
    return data_;
  }

 private:
  void release() {
    if (data_ != nullptr) ::operator delete[](data_, std::align_val_t(64));
    data_ = nullptr;
  }
  float* data_ = nullptr;
  size_t size_ = 0;
};

// ---------------------------------------------------------------- the thread team
// Off by default (one thread: the caller). A layer of a small model is ~20 us and four
// parallel phases, so a pool must hand work over in well under a microsecond, i.e. spin; on a
// machine whose cores are also busy (torch's own OpenMP team, other processes) a spinning or
// descheduled helper then costs more than it brings. Measured on the shared 2-core dev box
// (load 3-5): 2 threads made the default model's layer ~2x slower than 1 (torch's own 2-thread
// path ~100x slower), so threads are opt-in via set_num_threads for machines whose cores the
// process owns.
//
// The caller is thread 0; pool threads 1..n-1 persist between calls. A parallel phase is
// published as one 64-bit word (phase id | task count | next task), so claiming a task is one
// fetch_add that also says which phase it belongs to: a thread that wakes late cannot take a
// task of a phase it did not see. The caller claims tasks too and never waits for a thread
// that has claimed nothing, so an oversubscribed machine degrades to about one thread's speed
// instead of stalling on a descheduled helper. Between phases the pool threads spin a little
// (a decode step runs its layers a few microseconds apart), then sleep on a condition variable.
class Pool {
 public:
  ~Pool() { resize(1); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int n) {
    n = std::max(1, std::min(n, 64));
    if (n == size()) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      epoch_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_ = false;
    for (int tid = 1; tid < n; ++tid) workers_.emplace_back([this, tid] { loop(tid); });
  }

  static void for_each_of(void* pool, int64_t n, TaskFn fn, void* ctx) {
    static_cast<Pool*>(pool)->for_each(n, fn, ctx);
  }

  void for_each(int64_t n, TaskFn fn, void* ctx) {
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    phase_id_ = (phase_id_ + 1) & 0xffff;
    work_.store(phase_id_ << 48 | static_cast<uint64_t>(n) << 32, std::memory_order_release);
    epoch_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    claim(0);
    for (int i = 0; done_.load(std::memory_order_acquire) != n; ++i)
      if (i < 4096) LSK_PAUSE(); else std::this_thread::yield();
  }

 private:
  // Run tasks of the published phase until none is left.
  void claim(int tid) {
    for (;;) {
      const uint64_t w = work_.fetch_add(1, std::memory_order_acq_rel);
      const int64_t task = static_cast<int64_t>(w & 0xffffffffu);
      if (task >= static_cast<int64_t>(w >> 32 & 0xffff)) return;
      fn_(ctx_, task, tid);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  static bool open(uint64_t w) { return (w & 0xffffffffu) < (w >> 32 & 0xffff); }

  void loop(int tid) {
    for (;;) {
      const uint64_t seen = epoch_.load();
      // Spin about 50 us for work, then sleep until the next phase is published.
      for (int i = 0; i < 10000 && !open(work_.load(std::memory_order_acquire)) && !stop_; ++i)
        LSK_PAUSE();
      if (stop_) return;
      if (!open(work_.load(std::memory_order_acquire))) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return epoch_.load() != seen; });
        sleepers_.fetch_sub(1);
        continue;
      }
      claim(tid);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> work_{0}, epoch_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  uint64_t phase_id_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
};

struct State {
  std::mutex call;  // one call at a time: the buffers and the pool are shared
  Pool pool;
  Buffer y, qkv, attn, gate_up, act, stack;
  std::vector<Buffer> scores, queries;  // per thread
  std::vector<float*> scores_ptr, queries_ptr;
};

State& state() {
  static State s;
  return s;
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("llama_layer (C++): " + what);
}

constexpr int64_t kLanes = 16;  // row padding for every ISA (a multiple of each W)

// A matmul's input buffer for T rows of ld floats: one more row, of zeros, when T % 4 == 3
// (the last three tokens run as a 4-token tile; llama_layer_body.h, matmul).
float* matmul_input(Buffer& buffer, int64_t T, int64_t ld) {
  const int64_t rows = T % 4 == 3 ? T + 1 : T;
  float* p = buffer.get(rows * ld);
  std::memset(p + T * ld, 0, (rows - T) * ld * sizeof(float));
  return p;
}

void run_layer(const LayerArgs& a, const Plan& p, const Team& team) {
  switch (g_isa.load()) {
#ifdef LSK_HAVE_X86_CLONES
    case Isa::kAvx512: return avx512::layer(a, p, team);
    case Isa::kAvx2: return avx2::layer(a, p, team);
#endif
    default: return generic::layer(a, p, team);
  }
}

}  // namespace

namespace {

void check_layer(const LayerArgs& a) {
  // Memory safety only: the op checked shapes and dtypes.
  require(a.batch >= 0 && a.seqlen >= 1 && a.seqlen <= kMaxQueries,
          "seqlen must be in [1, 16]");
  require(a.head_dim >= 2 && a.head_dim % 2 == 0 && a.head_dim <= 256,
          "head_dim must be even and at most 256");
  require(a.heads_kv >= 1 && a.heads_q % a.heads_kv == 0, "heads_q must be a multiple of heads_kv");
  require(a.dim >= 1 && a.hidden >= 1, "dim and hidden must be positive");
  int64_t longest = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t L = a.cache_seqlens[b];
    require(L >= 0 && L + a.seqlen <= a.max_seqlen,
            "cache_seqlens[" + std::to_string(b) + "] + seqlen must be in [seqlen, max_seqlen]");
    longest = std::max(longest, L);
  }
  require(a.rotary_cos == nullptr || a.max_seqlen <= a.rotary_rows,
          "rotary tables need max_seqlen rows");
}

// One layer, the call lock held.
void run_locked(State& s, const LayerArgs& a) {
  int64_t longest = 0;
  for (int64_t b = 0; b < a.batch; ++b) longest = std::max<int64_t>(longest, a.cache_seqlens[b]);
  const int nt = s.pool.size();
  const int64_t T = a.batch * a.seqlen, D = a.head_dim, G = a.heads_q / a.heads_kv;
  Plan p{};
  p.T = T;
  p.ldd = round_up(a.dim, kLanes);
  p.ldqkv = round_up((a.heads_q + 2 * a.heads_kv) * D, kLanes);
  p.lda = round_up(a.heads_q * D, kLanes);
  p.ldgu = round_up(2 * a.hidden, kLanes);
  p.ldact = round_up(a.hidden, kLanes);
  p.qkv = s.qkv.get(T * p.ldqkv);
  p.attn = matmul_input(s.attn, T, p.lda);
  p.gate_up = s.gate_up.get(T * p.ldgu);
  p.act = matmul_input(s.act, T, p.ldact);
  p.y = matmul_input(s.y, T, p.ldd);
  for (int64_t t = 0; t < T; ++t) {  // the pads that matmuls read
    std::memset(p.attn + t * p.lda + a.heads_q * D, 0, (p.lda - a.heads_q * D) * sizeof(float));
    std::memset(p.act + t * p.ldact + a.hidden, 0, (p.ldact - a.hidden) * sizeof(float));
  }
  s.scores.resize(nt);
  s.queries.resize(nt);
  s.scores_ptr.resize(nt);
  s.queries_ptr.resize(nt);
  for (int i = 0; i < nt; ++i) {
    s.scores_ptr[i] = s.scores[i].get(round_up(G * a.seqlen, kLanes)
                                      * round_up(longest + a.seqlen, kLanes));
    s.queries_ptr[i] = s.queries[i].get(D * kLanes);
  }
  p.scores = s.scores_ptr.data();
  p.queries = s.queries_ptr.data();
  run_layer(a, p, Team{nt, &s.pool, &Pool::for_each_of});
}

}  // namespace

void llama_layer(const LayerArgs& a) {
  check_layer(a);
  if (a.batch == 0) return;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.call);
  run_locked(s, a);
}

void llama_layers(const LayerArgs& first, int64_t n, const uintptr_t* weights,
                  const uintptr_t* k_caches, const uintptr_t* v_caches) {
  check_layer(first);
  require(n >= 1, "llama_layers needs at least one layer");
  if (first.batch == 0) return;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.call);
  const int64_t rows = first.batch * first.seqlen * first.dim;
  float* ping = s.stack.get(4 * rows);  // (delta, h) of even layers, then of odd ones
  LayerArgs a = first;
  for (int64_t i = 0; i < n; ++i) {
    const uintptr_t* w = weights + 6 * i;
    a.w_in = reinterpret_cast<const float*>(w[0]);
    a.w_qkv = reinterpret_cast<const float*>(w[1]);
    a.w_o = reinterpret_cast<const float*>(w[2]);
    a.w_post = reinterpret_cast<const float*>(w[3]);
    a.w_gate_up = reinterpret_cast<const float*>(w[4]);
    a.w_down = reinterpret_cast<const float*>(w[5]);
    a.k_cache = reinterpret_cast<float*>(k_caches[i]);
    a.v_cache = reinterpret_cast<float*>(v_caches[i]);
    const bool last = i == n - 1;
    a.delta = last ? first.delta : ping + (i % 2) * 2 * rows;
    a.h = last ? first.h : ping + (i % 2) * 2 * rows + rows;
    run_locked(s, a);
    a.x = a.delta;
    a.residual = a.h;
    a.x_row = a.residual_row = first.dim;
  }
}

void draft_head_argmax(const float* h, int64_t rows, int64_t h_row, int64_t dim,
                       const float* norm_weight, float eps, const float* lm_head, int64_t vocab,
                       int64_t* tokens, float* max_logit, float* max_prob) {
  require(rows >= 0 && dim >= 1 && vocab >= 1, "rows >= 0, dim >= 1 and vocab >= 1");
  if (rows == 0) return;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.call);
  const int nt = s.pool.size();
  const int64_t ldy = round_up(dim, kLanes), panel = 16 * kLanes;
  const Team team{nt, &s.pool, &Pool::for_each_of};
  const int64_t tasks = team.tasks((vocab + panel - 1) / panel);
  std::vector<int64_t> index(rows * tasks);
  std::vector<float> value(rows * tasks), exp_sum(max_prob ? rows * tasks : 0);
  float* sums = max_prob ? exp_sum.data() : nullptr;
  float* y = matmul_input(s.y, rows, ldy);
  s.scores.resize(nt);
  s.scores_ptr.resize(nt);
  for (int i = 0; i < nt; ++i) s.scores_ptr[i] = s.scores[i].get(rows * panel);
  switch (g_isa.load()) {
#ifdef LSK_HAVE_X86_CLONES
    case Isa::kAvx512: {
      avx512::head_norm(h, rows, h_row, dim, norm_weight, eps, y, ldy);
      avx512::HeadArgs ha{y, rows, ldy, dim, vocab, tasks, lm_head, s.scores_ptr.data(),
                          index.data(), value.data(), sums};
      team.run(tasks, &avx512::head_task, &ha);
      break;
    }
    case Isa::kAvx2: {
      avx2::head_norm(h, rows, h_row, dim, norm_weight, eps, y, ldy);
      avx2::HeadArgs ha{y, rows, ldy, dim, vocab, tasks, lm_head, s.scores_ptr.data(),
                        index.data(), value.data(), sums};
      team.run(tasks, &avx2::head_task, &ha);
      break;
    }
#endif
    default: {
      generic::head_norm(h, rows, h_row, dim, norm_weight, eps, y, ldy);
      generic::HeadArgs ha{y, rows, ldy, dim, vocab, tasks, lm_head, s.scores_ptr.data(),
                           index.data(), value.data(), sums};
      team.run(tasks, &generic::head_task, &ha);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // tasks hold ascending vocabulary ranges
    tokens[r] = index[r];
    max_logit[r] = value[r];
    for (int64_t t = 1; t < tasks; ++t)
      if (index[t * rows + r] >= 0 && value[t * rows + r] > max_logit[r]) {
        tokens[r] = index[t * rows + r];
        max_logit[r] = value[t * rows + r];
      }
    if (!max_prob) continue;
    float total = 0.0f;
    for (int64_t t = 0; t < tasks; ++t)
      if (index[t * rows + r] >= 0)
        total += exp_sum[t * rows + r] * std::exp(value[t * rows + r] - max_logit[r]);
    max_prob[r] = 1.0f / total;
  }
}

void set_num_threads(int n) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.call);
  s.pool.resize(n);
}

int num_threads() { return state().pool.size(); }

const char* isa() { return kIsaNames[static_cast<int>(g_isa.load())]; }

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric})
    if (supported(isa)) names.push_back(kIsaNames[static_cast<int>(isa)]);
  return names;
}

void set_isa(const std::string& name) {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric})
    if (name == kIsaNames[static_cast<int>(isa)]) {
      require(supported(isa), "set_isa: this CPU cannot run " + name);
      std::lock_guard<std::mutex> lock(state().call);
      g_isa = isa;
      return;
    }
  require(false, "set_isa: expected avx512, avx2 or generic, got " + name);
}

}  // namespace lsk_cpu
