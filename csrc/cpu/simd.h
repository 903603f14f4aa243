// Portable SIMD for the CPU kernels: GCC / clang vector extensions, W float lanes.
//
// Included by llama_layer.cpp once per instruction set, inside its own namespace, with
//   LSK_W   float lanes of a vector (16: AVX-512, 8: AVX2, 4: SSE2 / NEON / anything else)
//   LSK_FN  the attributes of every function here (the target, e.g. target("avx2,fma"))
// so the same source compiles to zmm, ymm or xmm code and the dispatcher picks at run time.
// Needs <cstdint> and <cstring> included before. No function here takes or returns a vector
// across a non-inlined call (always_inline), so no vector ABI crosses a target boundary.

#define LSK_INL LSK_FN __attribute__((always_inline)) static inline

constexpr int W = LSK_W;
typedef float vf __attribute__((vector_size(LSK_W * 4)));
typedef int32_t vi __attribute__((vector_size(LSK_W * 4)));

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define LSK_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define LSK_SHUF(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

LSK_INL vf splat(float s) { return vf{} + s; }
LSK_INL vi isplat(int32_t s) { return vi{} + s; }

LSK_INL vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

LSK_INL void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// The first n < W floats at p, zeros after: never reads past p + n.
LSK_INL vf load_part(const float* p, int n) {
  vf v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

LSK_INL void store_part(float* p, vf v, int n) {
  for (int i = 0; i < n; ++i) p[i] = v[i];
}

LSK_INL vf select(vi mask, vf yes, vf no) {  // mask lanes: -1 (yes) or 0 (no)
  return (vf)(((vi)yes & mask) | ((vi)no & ~mask));
}

LSK_INL vf vmax(vf a, vf b) { return select(a > b, a, b); }
LSK_INL vf vmin(vf a, vf b) { return select(a < b, a, b); }

LSK_INL float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

LSK_INL float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Lane j of the result is the sum of the lanes of acc[j], for W vectors acc[0..W): a tree of
// pairwise shuffles and adds (2W - 2 shuffles and W - 1 adds for W sums, instead of W
// reductions). The first two levels stay inside 128-bit chunks (unpcklps / unpckhps, then
// unpcklpd / unpckhpd: cheap, no index vectors) and leave, in chunk c of vector k, the partial
// sums over input chunk c of sources 4k..4k+3; each further level adds the even chunks to the
// odd ones (vshuff32x4 / vperm2f128), so that chunk k ends up holding sources 4k..4k+3.
#define LSK_PAIR(x, y, LO, HI) (LSK_SHUF(x, y, LO) + LSK_SHUF(x, y, HI))
#if LSK_W == 16
#define LSK_UNPCKLPS 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29
#define LSK_UNPCKHPS 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31
#define LSK_UNPCKLPD 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define LSK_UNPCKHPD 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LSK_EVEN_CHUNKS 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define LSK_ODD_CHUNKS 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
LSK_INL vf reduce_lanes(const vf* a) {
  vf b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = LSK_PAIR(a[2 * i], a[2 * i + 1], LSK_UNPCKLPS, LSK_UNPCKHPS);
  for (int i = 0; i < 4; ++i) c[i] = LSK_PAIR(b[2 * i], b[2 * i + 1], LSK_UNPCKLPD, LSK_UNPCKHPD);
  for (int i = 0; i < 2; ++i) d[i] = LSK_PAIR(c[2 * i], c[2 * i + 1], LSK_EVEN_CHUNKS, LSK_ODD_CHUNKS);
  return LSK_PAIR(d[0], d[1], LSK_EVEN_CHUNKS, LSK_ODD_CHUNKS);
}
#elif LSK_W == 8
#define LSK_UNPCKLPS 0, 8, 1, 9, 4, 12, 5, 13
#define LSK_UNPCKHPS 2, 10, 3, 11, 6, 14, 7, 15
#define LSK_UNPCKLPD 0, 1, 8, 9, 4, 5, 12, 13
#define LSK_UNPCKHPD 2, 3, 10, 11, 6, 7, 14, 15
#define LSK_EVEN_CHUNKS 0, 1, 2, 3, 8, 9, 10, 11
#define LSK_ODD_CHUNKS 4, 5, 6, 7, 12, 13, 14, 15
LSK_INL vf reduce_lanes(const vf* a) {
  vf b[4], c[2];
  for (int i = 0; i < 4; ++i) b[i] = LSK_PAIR(a[2 * i], a[2 * i + 1], LSK_UNPCKLPS, LSK_UNPCKHPS);
  for (int i = 0; i < 2; ++i) c[i] = LSK_PAIR(b[2 * i], b[2 * i + 1], LSK_UNPCKLPD, LSK_UNPCKHPD);
  return LSK_PAIR(c[0], c[1], LSK_EVEN_CHUNKS, LSK_ODD_CHUNKS);
}
#elif LSK_W == 4
#define LSK_UNPCKLPS 0, 4, 1, 5
#define LSK_UNPCKHPS 2, 6, 3, 7
#define LSK_UNPCKLPD 0, 1, 4, 5
#define LSK_UNPCKHPD 2, 3, 6, 7
LSK_INL vf reduce_lanes(const vf* a) {
  vf b[2];
  for (int i = 0; i < 2; ++i) b[i] = LSK_PAIR(a[2 * i], a[2 * i + 1], LSK_UNPCKLPS, LSK_UNPCKHPS);
  return LSK_PAIR(b[0], b[1], LSK_UNPCKLPD, LSK_UNPCKHPD);
}
#else
#error "LSK_W must be 4, 8 or 16"
#endif
#undef LSK_UNPCKLPS
#undef LSK_UNPCKHPS
#undef LSK_UNPCKLPD
#undef LSK_UNPCKHPD
#undef LSK_EVEN_CHUNKS
#undef LSK_ODD_CHUNKS

// exp(x) to about 2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial
// in r, times 2^n built in the exponent bits). x is clamped to [-87, 88.3]: at the bottom the
// result stays a normal float (exp(-87) = 1.6e-38), as a subnormal would cost every FPU
// instruction that touches it a slow assist; callers that need an exact 0 (masked softmax
// lanes) select it themselves.
LSK_INL vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.0f)), splat(88.3762626f));
  vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);
  n += (vi)(__builtin_convertvector(n, vf) > fx);  // truncation -> floor (-1 where rounded up)
  vf fn = __builtin_convertvector(n, vf);
  vf r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (vf)((n + 127) << 23);
}
