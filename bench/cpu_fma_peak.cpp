// The CPU's float32 FMA peak per core: 12 independent AVX-512 FMA chains in a loop of
// register-only instructions, on 1..N threads at once. It bounds what any CPU layer kernel can
// do (bench/results/README.md, "The embedded default model").
//
//     g++ -O2 -pthread bench/cpu_fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak 1 && /tmp/fma_peak 2
//
// x86-64 with AVX-512F only (the instructions are written out, not left to the compiler).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

static void fma_chains(long iterations) {
  asm volatile(
      "vxorps %%zmm0, %%zmm0, %%zmm0\n vxorps %%zmm1, %%zmm1, %%zmm1\n"
      "vxorps %%zmm2, %%zmm2, %%zmm2\n vxorps %%zmm3, %%zmm3, %%zmm3\n"
      "vxorps %%zmm4, %%zmm4, %%zmm4\n vxorps %%zmm5, %%zmm5, %%zmm5\n"
      "vxorps %%zmm6, %%zmm6, %%zmm6\n vxorps %%zmm7, %%zmm7, %%zmm7\n"
      "vxorps %%zmm8, %%zmm8, %%zmm8\n vxorps %%zmm9, %%zmm9, %%zmm9\n"
      "vxorps %%zmm10, %%zmm10, %%zmm10\n vxorps %%zmm11, %%zmm11, %%zmm11\n"
      "1:\n"
      "vfmadd231ps %%zmm14, %%zmm15, %%zmm0\n vfmadd231ps %%zmm14, %%zmm15, %%zmm1\n"
      "vfmadd231ps %%zmm14, %%zmm15, %%zmm2\n vfmadd231ps %%zmm14, %%zmm15, %%zmm3\n"
      "vfmadd231ps %%zmm14, %%zmm15, %%zmm4\n vfmadd231ps %%zmm14, %%zmm15, %%zmm5\n"
      "vfmadd231ps %%zmm14, %%zmm15, %%zmm6\n vfmadd231ps %%zmm14, %%zmm15, %%zmm7\n"
      "vfmadd231ps %%zmm14, %%zmm15, %%zmm8\n vfmadd231ps %%zmm14, %%zmm15, %%zmm9\n"
      "vfmadd231ps %%zmm14, %%zmm15, %%zmm10\n vfmadd231ps %%zmm14, %%zmm15, %%zmm11\n"
      "dec %0\n jnz 1b\n"
      : "+r"(iterations)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
        "xmm10", "xmm11", "cc");
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const long iterations = 100000000;
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> team;
  for (int i = 0; i < threads; ++i) team.emplace_back(fma_chains, iterations);
  for (auto& t : team) t.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double flops = 2.0 * 16 * 12 * iterations * threads;  // 2 FLOP x 16 lanes x 12 FMAs
  std::printf("%d thread(s): %.0f GFLOP/s float32 (%.0f per thread)\n", threads, flops / s / 1e9,
              flops / s / 1e9 / threads);
}
