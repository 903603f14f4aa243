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

// The threads running one call, each with its tid. split(n, unit): this thread's share of n
// items in whole units (the last unit may be short), contiguous, in tid order.
struct Team {
  int tid, nt;
  void (*barrier)(void*);
  void* pool;
  Range split(int64_t n, int64_t unit) const {
    const int64_t units = (n + unit - 1) / unit;
    const int64_t u0 = units * tid / nt, u1 = units * (tid + 1) / nt;
    return {std::min(u0 * unit, n), std::min(u1 * unit, n)};
  }
  void sync() const {
    if (nt > 1) barrier(pool);
  }
};

// The work buffers of one call (floats; ld* are row strides, multiples of the vector width,
// rows zero-padded where a matmul reads them).
struct Plan {
  int64_t T, ldd, ldqkv, lda, ldgu, ldact;
  float* qkv;      // (T, ldqkv)   q | k | v of each token
  float* attn;     // (T, lda)     attention output, heads side by side
  float* gate_up;  // (T, ldgu)    gate | up
  float* act;      // (T, ldact)   silu(gate) * up
  float* const* y;       // per thread (T, ldd): normed activations
  float* const* scores;  // per thread: (G * S, keys rounded up) softmax rows
  float* const* keys;    // per thread: (D, W) a block of keys, transposed
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

Isa detect() {
#ifdef LSK_HAVE_X86_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

const Isa kIsa = detect();

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
// The caller is thread 0; pool threads 1..n-1 persist between calls. Between jobs they spin a
// little (a decode step calls the layer back to back, a few microseconds apart), then sleep on
// a condition variable, so an idle process does not burn a core.
class Pool {
 public:
  ~Pool() { resize(1); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int n) {
    n = std::max(1, n);
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
    // A worker must know the epoch it was born in: a job posted before it first runs is its.
    const uint64_t born = epoch_.load();
    for (int tid = 1; tid < n; ++tid) workers_.emplace_back([this, tid, born] { loop(tid, born); });
  }

  // fn(tid) on every thread of the pool, the caller as tid 0; returns when all have finished.
  void run(const std::function<void(int)>& fn) {
    const int helpers = static_cast<int>(workers_.size());
    if (helpers == 0) return fn(0);
    job_ = &fn;
    done_.store(0);
    epoch_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    fn(0);
    spin_until([&] { return done_.load(std::memory_order_acquire) == helpers; });
  }

  static void barrier_of(void* pool) { static_cast<Pool*>(pool)->barrier(); }

  // A barrier for the n threads of the current job (sense-reversing).
  void barrier() {
    const int n = size();
    const int gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    spin_until([&] { return generation_.load(std::memory_order_acquire) != gen; });
  }

 private:
  template <class Ready>
  static void spin_until(Ready ready) {
    for (int i = 0; !ready(); ++i) {
      if (i < 4096) LSK_PAUSE(); else std::this_thread::yield();
    }
  }

  void loop(int tid, uint64_t seen) {
    for (;;) {
      // Spin for the next job about 100 us, then sleep.
      for (int i = 0; i < 20000 && epoch_.load(std::memory_order_acquire) == seen; ++i) LSK_PAUSE();
      if (epoch_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return epoch_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = epoch_.load();
      if (stop_) return;
      (*job_)(tid);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> done_{0}, sleepers_{0}, arrived_{0}, generation_{0};
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<bool> stop_{false};
};

struct State {
  std::mutex call;  // one call at a time: the buffers and the pool are shared
  Pool pool;
  Buffer qkv, attn, gate_up, act;
  std::vector<Buffer> y, scores, keys;
  std::vector<float*> y_ptr, scores_ptr, keys_ptr;
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

void run_layer(const LayerArgs& a, const Plan& p, const Team& team) {
  switch (kIsa) {
#ifdef LSK_HAVE_X86_CLONES
    case Isa::kAvx512: return avx512::layer(a, p, team);
    case Isa::kAvx2: return avx2::layer(a, p, team);
#endif
    default: return generic::layer(a, p, team);
  }
}

}  // namespace

void llama_layer(const LayerArgs& a) {
  // Memory safety only: the op checked shapes and dtypes.
  require(a.batch >= 0 && a.seqlen >= 1 && a.seqlen <= 16, "seqlen must be in [1, 16]");
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
  if (a.batch == 0) return;

  State& s = state();
  std::lock_guard<std::mutex> lock(s.call);
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
  p.attn = s.attn.get(T * p.lda);
  p.gate_up = s.gate_up.get(T * p.ldgu);
  p.act = s.act.get(T * p.ldact);
  for (int64_t t = 0; t < T; ++t) {  // the pads that matmuls read
    std::memset(p.attn + t * p.lda + a.heads_q * D, 0, (p.lda - a.heads_q * D) * sizeof(float));
    std::memset(p.act + t * p.ldact + a.hidden, 0, (p.ldact - a.hidden) * sizeof(float));
  }
  s.y.resize(nt);
  s.scores.resize(nt);
  s.keys.resize(nt);
  s.y_ptr.resize(nt);
  s.scores_ptr.resize(nt);
  s.keys_ptr.resize(nt);
  for (int i = 0; i < nt; ++i) {
    s.y_ptr[i] = s.y[i].get(T * p.ldd);
    s.scores_ptr[i] = s.scores[i].get(G * a.seqlen * round_up(longest + a.seqlen, kLanes));
    s.keys_ptr[i] = s.keys[i].get(D * kLanes);
  }
  p.y = s.y_ptr.data();
  p.scores = s.scores_ptr.data();
  p.keys = s.keys_ptr.data();

  s.pool.run([&](int tid) { run_layer(a, p, Team{tid, nt, &Pool::barrier_of, &s.pool}); });
}

void draft_head_argmax(const float* h, int64_t rows, int64_t h_row, int64_t dim,
                       const float* norm_weight, float eps, const float* lm_head, int64_t vocab,
                       int64_t* tokens, float* max_logit) {
  require(rows >= 0 && dim >= 1 && vocab >= 1, "rows >= 0, dim >= 1 and vocab >= 1");
  if (rows == 0) return;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.call);
  const int nt = s.pool.size();
  const int64_t ldy = round_up(dim, kLanes), panel = 16 * kLanes;
  std::vector<int64_t> index(rows * nt);
  std::vector<float> value(rows * nt);
  s.y.resize(nt);
  s.scores.resize(nt);
  for (int i = 0; i < nt; ++i) {
    s.y[i].get(rows * ldy);
    s.scores[i].get(rows * panel);
  }
  s.pool.run([&](int tid) {
    const Range part = Team{tid, nt, nullptr, nullptr}.split(vocab, panel);
    float* y = s.y[tid].get(rows * ldy);
    float* logits = s.scores[tid].get(rows * panel);
    int64_t* bi = index.data() + tid * rows;
    float* bv = value.data() + tid * rows;
    if (part.begin >= part.end) {
      for (int64_t r = 0; r < rows; ++r) bi[r] = -1;
      return;
    }
    switch (kIsa) {
#ifdef LSK_HAVE_X86_CLONES
      case Isa::kAvx512:
        return avx512::head_argmax(h, rows, h_row, dim, norm_weight, eps, lm_head, y, ldy,
                                   logits, part.begin, part.end, bi, bv);
      case Isa::kAvx2:
        return avx2::head_argmax(h, rows, h_row, dim, norm_weight, eps, lm_head, y, ldy,
                                 logits, part.begin, part.end, bi, bv);
#endif
      default:
        return generic::head_argmax(h, rows, h_row, dim, norm_weight, eps, lm_head, y,
                                    ldy, logits, part.begin, part.end, bi, bv);
    }
  });
  for (int64_t r = 0; r < rows; ++r) {  // threads hold ascending vocabulary ranges
    tokens[r] = index[r];
    max_logit[r] = value[r];
    for (int t = 1; t < nt; ++t)
      if (index[t * rows + r] >= 0 && value[t * rows + r] > max_logit[r]) {
        tokens[r] = index[t * rows + r];
        max_logit[r] = value[t * rows + r];
      }
  }
}

void set_num_threads(int n) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.call);
  s.pool.resize(n);
}

int num_threads() { return state().pool.size(); }

const char* isa() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace lsk_cpu
