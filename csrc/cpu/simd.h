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
// pairwise half-swaps (2W - 2 shuffles and W - 1 adds for W sums, instead of W reductions).
// At each level every input vector holds sources in groups of 2h lanes; LO takes the first h
// lanes of each group of both inputs, HI the last h, so LO + HI holds each source in h lanes.
#define LSK_PAIR(x, y, LO, HI) (LSK_SHUF(x, y, LO) + LSK_SHUF(x, y, HI))
#if LSK_W == 16
#define LSK_LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define LSK_HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LSK_LO4 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define LSK_HI4 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define LSK_LO2 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define LSK_HI2 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define LSK_LO1 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define LSK_HI1 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
LSK_INL vf reduce_lanes(const vf* a) {
  vf b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = LSK_PAIR(a[2 * i], a[2 * i + 1], LSK_LO8, LSK_HI8);
  for (int i = 0; i < 4; ++i) c[i] = LSK_PAIR(b[2 * i], b[2 * i + 1], LSK_LO4, LSK_HI4);
  for (int i = 0; i < 2; ++i) d[i] = LSK_PAIR(c[2 * i], c[2 * i + 1], LSK_LO2, LSK_HI2);
  return LSK_PAIR(d[0], d[1], LSK_LO1, LSK_HI1);
}
#elif LSK_W == 8
#define LSK_LO4 0, 1, 2, 3, 8, 9, 10, 11
#define LSK_HI4 4, 5, 6, 7, 12, 13, 14, 15
#define LSK_LO2 0, 1, 4, 5, 8, 9, 12, 13
#define LSK_HI2 2, 3, 6, 7, 10, 11, 14, 15
#define LSK_LO1 0, 2, 4, 6, 8, 10, 12, 14
#define LSK_HI1 1, 3, 5, 7, 9, 11, 13, 15
LSK_INL vf reduce_lanes(const vf* a) {
  vf c[4], d[2];
  for (int i = 0; i < 4; ++i) c[i] = LSK_PAIR(a[2 * i], a[2 * i + 1], LSK_LO4, LSK_HI4);
  for (int i = 0; i < 2; ++i) d[i] = LSK_PAIR(c[2 * i], c[2 * i + 1], LSK_LO2, LSK_HI2);
  return LSK_PAIR(d[0], d[1], LSK_LO1, LSK_HI1);
}
#elif LSK_W == 4
#define LSK_LO2 0, 1, 4, 5
#define LSK_HI2 2, 3, 6, 7
#define LSK_LO1 0, 2, 4, 6
#define LSK_HI1 1, 3, 5, 7
LSK_INL vf reduce_lanes(const vf* a) {
  vf d[2];
  for (int i = 0; i < 2; ++i) d[i] = LSK_PAIR(a[2 * i], a[2 * i + 1], LSK_LO2, LSK_HI2);
  return LSK_PAIR(d[0], d[1], LSK_LO1, LSK_HI1);
}
#else
#error "LSK_W must be 4, 8 or 16"
#endif
#undef LSK_LO8
#undef LSK_HI8
#undef LSK_LO4
#undef LSK_HI4
#undef LSK_LO2
#undef LSK_HI2
#undef LSK_LO1
#undef LSK_HI1

// exp(x) to about 2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial
// in r, times 2^n built in the exponent bits). x is clamped to [-87.3, 88.3]: callers that need
// an exact 0 (masked softmax lanes) select it themselves.
LSK_INL vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.3365448f)), splat(88.3762626f));
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
