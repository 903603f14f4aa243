// The layer's kernels, written once for W float lanes (simd.h). llama_layer.cpp includes this
// file once per instruction set inside namespace lsk_cpu::<isa>, after simd.h, with LSK_W and
// LSK_FN defined. Shapes and buffers are in the contract of llama_layer.h and the Plan below;
// every index is int64_t.

// ---------------------------------------------------------------- matmul: out = y @ w^T
// One tile: R weight rows x C tokens, R * C == W accumulators (one vector each, W lanes of
// partial sums along k), reduced to one vector of R * C sums at the end. w rows are ldw floats
// apart (contiguous, nn.Linear layout); y rows ldy apart and zero-padded up to a multiple of W,
// so only the weights need a partial load at a k tail. Rows at or past n_end are neither read
// (clamped) nor written; tokens at or past `tokens` (< C: rows of zeros past the caller's T)
// are computed but not written. add: out += result (the residual add of o_proj), else
// out = result.
// Tail: K is no multiple of W (a separate instantiation, so that the common case carries no
// partial-load code, whose library call would make the compiler spill the accumulators).
// Ahead: also prefetch the R rows after this tile's (next in memory: w rows are contiguous), so
// that a tile of few rows still keeps about 2R cache-line misses in flight. Each row is a few
// lines long, too short for the hardware's stream prefetcher to ramp up on its own.
template <int R, int C, bool Tail, bool Ahead>
LSK_INL void matmul_tile(const float* w, int64_t ldw, int64_t K, int64_t n0, int64_t n_end,
                         const float* y, int64_t ldy, int tokens, float* out, int64_t ldo,
                         bool add, int64_t ahead_end) {
  static_assert(R * C == W, "a tile fills one vector of sums");
  const float* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r < n_end ? n0 + r : n_end - 1) * ldw;
  const int64_t ahead_rows = Ahead ? (ahead_end - n0 - R < R ? ahead_end - n0 - R : R) : 0;
  const char* next = reinterpret_cast<const char*>(w + (n0 + R) * ldw);
  vf acc[W];
  for (int i = 0; i < W; ++i) acc[i] = vf{};
  const int64_t full = K - K % W;
  for (int64_t k = 0; k < full; k += W) {
    if (Ahead)
      for (int r = 0; r < R; ++r)
        if (r < ahead_rows) __builtin_prefetch(next + (r * ldw + k) * 4, 0, 3);
    vf yv[C];
    for (int c = 0; c < C; ++c) yv[c] = loadu(y + c * ldy + k);
    for (int r = 0; r < R; ++r) {
      const vf wv = loadu(wr[r] + k);
      for (int c = 0; c < C; ++c) acc[c * R + r] += wv * yv[c];
    }
  }
  if (Tail && full < K) {
    const int tail = static_cast<int>(K - full);
    vf yv[C];
    for (int c = 0; c < C; ++c) yv[c] = loadu(y + c * ldy + full);
    for (int r = 0; r < R; ++r) {
      const vf wv = load_part(wr[r] + full, tail);
      for (int c = 0; c < C; ++c) acc[c * R + r] += wv * yv[c];
    }
  }
  float s[W];
  storeu(s, reduce_lanes(acc));
  const int rows = n0 + R <= n_end ? R : static_cast<int>(n_end - n0);
  for (int c = 0; c < tokens; ++c) {
    float* o = out + c * ldo + n0;
    const float* sc = s + c * R;
    if (rows == R) {  // fixed trip counts: the compiler turns these into vector moves
      if (add) {
        for (int r = 0; r < R; ++r) o[r] += sc[r];
      } else {
        for (int r = 0; r < R; ++r) o[r] = sc[r];
      }
    } else {
      for (int r = 0; r < rows; ++r) o[r] = add ? o[r] + sc[r] : sc[r];
    }
  }
}

template <int R, int C>
LSK_INL void matmul_tile_any(const float* w, int64_t K, int64_t n0, int64_t n_end,
                             const float* y, int64_t ldy, int tokens, float* out, int64_t ldo,
                             bool add, int64_t ahead_end) {
  const bool ahead = C > 1 && ahead_end > n0 + R;  // one row per tile: 16 misses in flight already
  if (K % W == 0) {
    if (ahead)
      matmul_tile<R, C, false, true>(w, K, K, n0, n_end, y, ldy, tokens, out, ldo, add,
                                     ahead_end);
    else
      matmul_tile<R, C, false, false>(w, K, K, n0, n_end, y, ldy, tokens, out, ldo, add, 0);
  } else {
    matmul_tile<R, C, true, false>(w, K, K, n0, n_end, y, ldy, tokens, out, ldo, add, 0);
  }
}

// out[t, n] (+)= y[t, :K] . w[n, :K] for t < T, n in [n_begin, n_end). Each panel of W weight
// rows is read from memory once and then served from L1 to every tile of tokens (4 at a time,
// then 2, then 1), so the weights stream once per call whatever T is. A tile costs about its
// loads, R + C per W FMAs: when T % 4 == 3 the last 3 tokens go as a 4-token tile (8 loads a
// step, against 10 + 17 for a 2-token and a 1-token tile), reading a row of zeros that y must
// hold past T (llama_layer.cpp, matmul_input).
LSK_INL void matmul(const float* w, int64_t K, int64_t n_begin, int64_t n_end, const float* y,
                    int64_t ldy, int64_t T, float* out, int64_t ldo, bool add) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += W) {
    const int64_t pend = n0 + W < n_end ? n0 + W : n_end;
    // The first pass over the panel reads it from memory: it prefetches ahead (rows up to
    // n_end); later passes find it in L1.
    int64_t t = 0;
    for (; t + 3 <= T; t += 4) {
      const int tokens = T - t < 4 ? 3 : 4;
      for (int64_t r0 = n0; r0 < pend; r0 += W / 4)
        matmul_tile_any<W / 4, 4>(w, K, r0, pend, y + t * ldy, ldy, tokens, out + t * ldo, ldo,
                                  add, t == 0 ? n_end : 0);
    }
    if (T - t >= 2) {
      for (int64_t r0 = n0; r0 < pend; r0 += W / 2)
        matmul_tile_any<W / 2, 2>(w, K, r0, pend, y + t * ldy, ldy, 2, out + t * ldo, ldo, add,
                                  t == 0 ? n_end : 0);
      t += 2;
    }
    if (T - t == 1)
      matmul_tile_any<W, 1>(w, K, n0, pend, y + t * ldy, ldy, 1, out + t * ldo, ldo, add,
                            t == 0 ? n_end : 0);
  }
}

// ---------------------------------------------------------------- elementwise
// y[:dim] = h * (1 / sqrt(mean(h^2) + eps)) * weight, y zero-padded to ldy (a multiple of W).
LSK_INL void rms_norm_row(const float* h, const float* weight, int64_t dim, float eps, float* y,
                          int64_t ldy) {
  vf ss0 = {}, ss1 = {};
  int64_t j = 0;
  for (; j + 2 * W <= dim; j += 2 * W) {
    const vf a = loadu(h + j), b = loadu(h + j + W);
    ss0 += a * a;
    ss1 += b * b;
  }
  for (; j < dim; j += W) {
    const vf a = j + W <= dim ? loadu(h + j) : load_part(h + j, static_cast<int>(dim - j));
    ss0 += a * a;
  }
  const float r = 1.0f / std::sqrt(hsum(ss0 + ss1) / static_cast<float>(dim) + eps);
  for (j = 0; j + W <= dim; j += W) storeu(y + j, loadu(h + j) * r * loadu(weight + j));
  if (j < dim) {
    const int n = static_cast<int>(dim - j);
    storeu(y + j, load_part(h + j, n) * r * load_part(weight + j, n));  // zeros past dim
    j += W;
  }
  for (; j < ldy; j += W) storeu(y + j, vf{});
}

// Llama's half rotation of one head vector x (D floats) into out (may be x):
// out[j] = x[j] cos[j] - x[j + D/2] sin[j], out[j + D/2] = x[j + D/2] cos[j] + x[j] sin[j].
LSK_INL void rope_row(const float* x, float* out, const float* cos, const float* sin,
                      int64_t D) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < half; j += W) {
    const int n = static_cast<int>(half - j < W ? half - j : W);
    const bool whole = n == W;
    const vf x1 = whole ? loadu(x + j) : load_part(x + j, n);
    const vf x2 = whole ? loadu(x + half + j) : load_part(x + half + j, n);
    const vf c = whole ? loadu(cos + j) : load_part(cos + j, n);
    const vf s = whole ? loadu(sin + j) : load_part(sin + j, n);
    const vf o1 = x1 * c - x2 * s, o2 = x2 * c + x1 * s;
    if (whole) {
      storeu(out + j, o1);
      storeu(out + half + j, o2);
    } else {
      store_part(out + j, o1, n);
      store_part(out + half + j, o2, n);
    }
  }
}

// act[:H] = silu(gate) * up, act zero-padded to lda; gate and up are H floats each.
LSK_INL void silu_mul_row(const float* gate, const float* up, int64_t begin, int64_t end,
                          float* act) {
  for (int64_t j = begin; j < end; j += W) {
    const int n = static_cast<int>(end - j < W ? end - j : W);
    const vf g = n == W ? loadu(gate + j) : load_part(gate + j, n);
    const vf u = n == W ? loadu(up + j) : load_part(up + j, n);
    const vf v = g / (1.0f + vexp(-g)) * u;
    if (n == W) storeu(act + j, v); else store_part(act + j, v, n);
  }
}

// ---------------------------------------------------------------- attention
// Scores of the W queries in qt (column-major: qt[d * ldq + lane]) against keys j0 .. j0 + KC - 1
// (kstride apart): KC independent chains of D broadcast FMAs, each key's element broadcast to
// every query. s[u] holds key j0 + u's score for each query lane.
template <int KC>
LSK_INL void score_keys(const float* qt, int64_t ldq, const float* kc, int64_t kstride,
                        int64_t j0, int64_t D, vf* s) {
  const float* k[KC];
  for (int u = 0; u < KC; ++u) {
    k[u] = kc + (j0 + u) * kstride;
    s[u] = vf{};
  }
  for (int64_t d = 0; d < D; ++d) {
    const vf q = loadu(qt + d * ldq);
    for (int u = 0; u < KC; ++u) s[u] += k[u][d] * q;
  }
}

// Scores of one query against W keys (rows j0 .. j0 + nj - 1, kstride apart; lanes past nj
// repeat key j0 and are masked by the caller): W dot products of D floats (D a multiple of W),
// reduced together. Cheaper than a vector of queries when few queries share a key.
LSK_INL vf score_dot(const float* q, const float* kc, int64_t kstride, int64_t j0, int nj,
                     int64_t D) {
  const float* k[W];
  for (int l = 0; l < W; ++l) k[l] = kc + (j0 + (l < nj ? l : 0)) * kstride;
  vf acc[W];
  for (int l = 0; l < W; ++l) acc[l] = vf{};
  for (int64_t d = 0; d < D; d += W) {
    const vf qv = loadu(q + d);
    for (int l = 0; l < W; ++l) acc[l] += qv * loadu(k[l] + d);
  }
  return reduce_lanes(acc);
}

// acc(dlen floats, NV vectors) = sum_{j < keys} p[j] * v[j * vstride + :dlen]; out = acc * inv.
// Two accumulators per vector (even and odd keys) keep 2 NV FMA chains in flight.
template <int NV>
LSK_INL void pv_chunk(const float* p, int64_t keys, const float* v, int64_t vstride, int64_t dlen,
                      float inv, float* out) {
  vf a0[NV], a1[NV];
  for (int u = 0; u < NV; ++u) a0[u] = a1[u] = vf{};
  const bool whole = dlen == NV * W;
  const int last = static_cast<int>(dlen - (NV - 1) * W);  // lanes of the last vector
  int64_t j = 0;
  if (whole) {
    for (; j + 2 <= keys; j += 2) {
      const float* r0 = v + j * vstride;
      const float* r1 = r0 + vstride;
      for (int u = 0; u < NV; ++u) {
        a0[u] += p[j] * loadu(r0 + u * W);
        a1[u] += p[j + 1] * loadu(r1 + u * W);
      }
    }
  }
  for (; j < keys; ++j) {
    const float* r = v + j * vstride;
    for (int u = 0; u < NV; ++u)
      a0[u] += p[j] * (whole || u < NV - 1 ? loadu(r + u * W) : load_part(r + u * W, last));
  }
  for (int u = 0; u < NV; ++u) {
    const vf o = (a0[u] + a1[u]) * inv;
    if (whole || u < NV - 1) storeu(out + u * W, o); else store_part(out + u * W, o, last);
  }
}

// out[:D] = inv * sum_{j < keys} p[j] * v[j * vstride + :D], 4 vectors at a time.
LSK_INL void pv(const float* p, int64_t keys, const float* v, int64_t vstride, int64_t D,
                float inv, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 4 * W) {
    const int64_t dlen = D - d0 < 4 * W ? D - d0 : 4 * W;
    switch ((dlen + W - 1) / W) {
      case 4: pv_chunk<4>(p, keys, v + d0, vstride, dlen, inv, out + d0); break;
      case 3: pv_chunk<3>(p, keys, v + d0, vstride, dlen, inv, out + d0); break;
      case 2: pv_chunk<2>(p, keys, v + d0, vstride, dlen, inv, out + d0); break;
      default: pv_chunk<1>(p, keys, v + d0, vstride, dlen, inv, out + d0); break;
    }
  }
}

// P @ V for QC query lanes of a key-major probability block (p[j * W + c]), dlen <= 2 W
// columns of V: out[c][:dlen] = inv[c] * sum_{j < keys} p[j * W + c] * v[j * vstride + :dlen].
// Each V row is read once for the QC queries; 2 QC accumulator chains. A query's masked keys
// have p exactly 0 (the rows read are this call's or earlier positions: written, finite).
template <int QC>
LSK_INL void pv_lanes(const float* p, int64_t keys, const float* v, int64_t vstride,
                      int64_t dlen, const float* inv, float* const* out) {
  const bool two = dlen > W;
  const int tail = static_cast<int>(dlen - (two ? W : 0));  // lanes of the last vector
  vf a0[QC], a1[QC];
  for (int c = 0; c < QC; ++c) a0[c] = a1[c] = vf{};
  for (int64_t j = 0; j < keys; ++j) {
    const float* r = v + j * vstride;
    const vf v0 = two || tail == W ? loadu(r) : load_part(r, tail);
    const vf v1 = !two ? vf{} : tail == W ? loadu(r + W) : load_part(r + W, tail);
    for (int c = 0; c < QC; ++c) {
      const vf pj = splat(p[j * W + c]);
      a0[c] += pj * v0;
      if (two) a1[c] += pj * v1;
    }
  }
  for (int c = 0; c < QC; ++c) {
    const vf o0 = a0[c] * inv[c], o1 = a1[c] * inv[c];
    if (!two) {
      if (tail == W) storeu(out[c], o0); else store_part(out[c], o0, tail);
    } else {
      storeu(out[c], o0);
      if (tail == W) storeu(out[c] + W, o1); else store_part(out[c] + W, o1, tail);
    }
  }
}

// The G x S queries of (row b, KV head g) one at a time, for few queries (decode): each block
// of W keys scored by W dot products straight from the cache rows, a softmax along the row
// (scores[qi * lds + j]), then P @ V.
LSK_INL void attend_rows(const LayerArgs& a, const Plan& p, float* scores, int64_t b, int64_t g,
                         const float* kc, const float* vc) {
  const int64_t S = a.seqlen, D = a.head_dim, G = a.heads_q / a.heads_kv;
  const int64_t L = a.cache_seqlens[b], keys = L + S, nq = G * S, lds = (keys + W - 1) / W * W;
  vi lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  for (int64_t j0 = 0; j0 < keys; j0 += W) {
    const int nj = static_cast<int>(keys - j0 < W ? keys - j0 : W);
    const vi key = lane + static_cast<int32_t>(j0);
    for (int64_t qi = 0; qi < nq; ++qi) {
      const float* q = p.qkv + (b * S + qi % S) * p.ldqkv + (g * G + qi / S) * D;
      const vf sc = score_dot(q, kc, a.k_strides[1], j0, nj, D);
      const vi hidden = key > isplat(static_cast<int32_t>(L + qi % S));
      storeu(scores + qi * lds + j0,
             select(hidden, splat(-__builtin_inff()), sc * a.softmax_scale));
    }
  }
  for (int64_t qi = 0; qi < nq; ++qi) {
    const int64_t i = qi % S, visible = L + i + 1;
    float* sc = scores + qi * lds;
    vf m = splat(-__builtin_inff());
    for (int64_t j = 0; j < visible; j += W) {
      const vi shown = lane + static_cast<int32_t>(j) < isplat(static_cast<int32_t>(visible));
      m = vmax(m, select(shown, loadu(sc + j), splat(-__builtin_inff())));
    }
    const float mx = hmax(m);
    vf sum = {};
    for (int64_t j = 0; j < visible; j += W) {
      const vi shown = lane + static_cast<int32_t>(j) < isplat(static_cast<int32_t>(visible));
      const vf e = select(shown, vexp(loadu(sc + j) - mx), vf{});
      storeu(sc + j, e);
      sum += e;
    }
    pv(sc, visible, vc, a.v_strides[1], D, 1.0f / hsum(sum),
       p.attn + (b * S + i) * p.lda + (g * G + qi / S) * D);
  }
}

// One (row b, KV head g): RoPE, the cache write of the S new keys / values, then the G x S
// queries of the group against keys [0, L + S): scores (bottom-right causal mask), an exact
// two-pass softmax in fp32, then P @ V. Keys past each query's position get weight exactly 0
// (the many-query path still reads their V rows: this call's positions, written); slots at or
// past L + S are never read at all.
LSK_INL void attend_group(const LayerArgs& a, const Plan& p, float* scores, float* qt, int64_t b,
                          int64_t g) {
  const int64_t S = a.seqlen, D = a.head_dim, Hq = a.heads_q, Hkv = a.heads_kv, G = Hq / Hkv;
  const int64_t L = a.cache_seqlens[b];
  float* kc = a.k_cache + b * a.k_strides[0] + g * a.k_strides[2];
  float* vc = a.v_cache + b * a.v_strides[0] + g * a.v_strides[2];
  for (int64_t i = 0; i < S; ++i) {
    float* row = p.qkv + (b * S + i) * p.ldqkv;
    const float* k = row + Hq * D + g * D;
    const float* v = row + (Hq + Hkv) * D + g * D;
    float* kdst = kc + (L + i) * a.k_strides[1];
    if (a.rotary_cos != nullptr) {
      const float* cos = a.rotary_cos + (L + i) * a.cos_stride;
      const float* sin = a.rotary_sin + (L + i) * a.sin_stride;
      rope_row(k, kdst, cos, sin, D);
      for (int64_t hh = 0; hh < G; ++hh) {
        float* q = row + (g * G + hh) * D;
        rope_row(q, q, cos, sin, D);
      }
    } else {
      std::memcpy(kdst, k, D * sizeof(float));
    }
    std::memcpy(vc + (L + i) * a.v_strides[1], v, D * sizeof(float));
  }

  // Query qi = hh * S + i (head g * G + hh, new position i) sees keys [0, L + i].
  const int64_t nq = G * S;
  if (D % W == 0 && nq <= 4) {  // decode: few queries, dot products straight from the cache
    attend_rows(a, p, scores, b, g, kc, vc);
    return;
  }
  // Many queries (verify, prefill): W queries at a time, transposed into qt (qt[d * W + lane]),
  // share each key; scores key-major (scores[j * W + lane]), so the masks, the softmax and its
  // sums run across queries.
  for (int64_t q0 = 0; q0 < nq; q0 += W) {
    const int nl = static_cast<int>(nq - q0 < W ? nq - q0 : W);
    vi last;  // each lane's last visible key; padding lanes (q = 0) see them all
    float* out[W];
    int64_t visible = 0;  // keys any lane sees
    for (int l = 0; l < W; ++l) {
      const int64_t qi = q0 + l, i = qi % S, h = g * G + qi / S;
      last[l] = static_cast<int32_t>(l < nl ? L + i : L + S - 1);
      if (l >= nl) {
        for (int64_t d = 0; d < D; ++d) qt[d * W + l] = 0.0f;
        continue;
      }
      const float* q = p.qkv + (b * S + i) * p.ldqkv + h * D;
      for (int64_t d = 0; d < D; ++d) qt[d * W + l] = q[d];
      out[l] = p.attn + (b * S + i) * p.lda + h * D;
      visible = std::max<int64_t>(visible, L + i + 1);
    }
    vf m = splat(-__builtin_inff());
    int64_t j = 0;
    for (; j + 8 <= visible; j += 8) {  // 8 chains: enough FMAs in flight to hide latency
      vf s[8];
      score_keys<8>(qt, W, kc, a.k_strides[1], j, D, s);
      for (int u = 0; u < 8; ++u) {
        const vf sc = select(isplat(static_cast<int32_t>(j + u)) > last,
                             splat(-__builtin_inff()), s[u] * a.softmax_scale);
        storeu(scores + (j + u) * W, sc);
        m = vmax(m, sc);
      }
    }
    for (; j < visible; ++j) {
      vf s[1];
      score_keys<1>(qt, W, kc, a.k_strides[1], j, D, s);
      const vf sc = select(isplat(static_cast<int32_t>(j)) > last, splat(-__builtin_inff()),
                           s[0] * a.softmax_scale);
      storeu(scores + j * W, sc);
      m = vmax(m, sc);
    }
    vf sum = {};
    for (j = 0; j < visible; ++j) {
      const vf e = select(isplat(static_cast<int32_t>(j)) > last, vf{},
                          vexp(loadu(scores + j * W) - m));
      storeu(scores + j * W, e);
      sum += e;
    }
    float inv[W];
    for (int l = 0; l < nl; ++l) inv[l] = 1.0f / sum[l];
    for (int64_t d0 = 0; d0 < D; d0 += 2 * W) {  // 8 queries x 2 vectors of V at a time
      const int64_t dlen = D - d0 < 2 * W ? D - d0 : 2 * W;
      for (int c0 = 0; c0 < nl; c0 += 8) {
        const float* pc = scores + c0;
        const float* vd = vc + d0;
        float* o[8];
        for (int c = 0; c < 8 && c0 + c < nl; ++c) o[c] = out[c0 + c] + d0;
        switch (nl - c0 < 8 ? nl - c0 : 8) {
          case 8: pv_lanes<8>(pc, visible, vd, a.v_strides[1], dlen, inv + c0, o); break;
          case 7: pv_lanes<7>(pc, visible, vd, a.v_strides[1], dlen, inv + c0, o); break;
          case 6: pv_lanes<6>(pc, visible, vd, a.v_strides[1], dlen, inv + c0, o); break;
          case 5: pv_lanes<5>(pc, visible, vd, a.v_strides[1], dlen, inv + c0, o); break;
          case 4: pv_lanes<4>(pc, visible, vd, a.v_strides[1], dlen, inv + c0, o); break;
          case 3: pv_lanes<3>(pc, visible, vd, a.v_strides[1], dlen, inv + c0, o); break;
          case 2: pv_lanes<2>(pc, visible, vd, a.v_strides[1], dlen, inv + c0, o); break;
          default: pv_lanes<1>(pc, visible, vd, a.v_strides[1], dlen, inv + c0, o); break;
        }
      }
    }
  }
}

// ---------------------------------------------------------------- the layer, in phases
// The caller runs the norms; the rest is four parallel phases of independent tasks (KV heads,
// then chunks of W-row panels of o_proj, gate/up and down), each ending when all its tasks are
// done. Tasks are claimed dynamically (Team::run), so a pool thread that the OS has not
// scheduled simply takes none; which thread runs a task never changes its result.
struct Phase {
  const LayerArgs* a;
  const Plan* p;
  int64_t n, tasks;  // rows (or items) split in `tasks` chunks of whole W-row panels
  Range chunk(int64_t i) const {
    const int64_t panels = (n + W - 1) / W;
    const int64_t b = panels * i / tasks * W, e = panels * (i + 1) / tasks * W;
    return {b < n ? b : n, e < n ? e : n};
  }
};

LSK_FN void qkv_head_task(void* ctx, int64_t g, int tid) {
  const Phase& ph = *static_cast<const Phase*>(ctx);
  const LayerArgs& a = *ph.a;
  const Plan& p = *ph.p;
  const int64_t D = a.head_dim, Hq = a.heads_q, Hkv = a.heads_kv, qrows = Hq / Hkv * D;
  const int64_t q0 = g * qrows, k0 = Hq * D + g * D, v0 = (Hq + Hkv) * D + g * D;
  matmul(a.w_qkv, a.dim, q0, q0 + qrows, p.y, p.ldd, p.T, p.qkv, p.ldqkv, false);
  matmul(a.w_qkv, a.dim, k0, k0 + D, p.y, p.ldd, p.T, p.qkv, p.ldqkv, false);
  matmul(a.w_qkv, a.dim, v0, v0 + D, p.y, p.ldd, p.T, p.qkv, p.ldqkv, false);
  for (int64_t b = 0; b < a.batch; ++b) attend_group(a, p, p.scores[tid], p.queries[tid], b, g);
}

LSK_FN void qkv_rows_task(void* ctx, int64_t i, int) {
  const Phase& ph = *static_cast<const Phase*>(ctx);
  const Range r = ph.chunk(i);
  matmul(ph.a->w_qkv, ph.a->dim, r.begin, r.end, ph.p->y, ph.p->ldd, ph.p->T, ph.p->qkv,
         ph.p->ldqkv, false);
}

LSK_FN void attend_task(void* ctx, int64_t bg, int tid) {
  const Phase& ph = *static_cast<const Phase*>(ctx);
  const int64_t Hkv = ph.a->heads_kv;
  attend_group(*ph.a, *ph.p, ph.p->scores[tid], ph.p->queries[tid], bg / Hkv, bg % Hkv);
}

LSK_FN void o_task(void* ctx, int64_t i, int) {  // h += attn @ w_o^T
  const Phase& ph = *static_cast<const Phase*>(ctx);
  const Range r = ph.chunk(i);
  matmul(ph.a->w_o, ph.a->heads_q * ph.a->head_dim, r.begin, r.end, ph.p->attn, ph.p->lda,
         ph.p->T, ph.a->h, ph.a->dim, true);
}

LSK_FN void gate_up_task(void* ctx, int64_t i, int) {  // act = silu(y @ gate^T) * (y @ up^T)
  const Phase& ph = *static_cast<const Phase*>(ctx);
  const LayerArgs& a = *ph.a;
  const Plan& p = *ph.p;
  const Range r = ph.chunk(i);
  const int64_t H = a.hidden;
  matmul(a.w_gate_up, a.dim, r.begin, r.end, p.y, p.ldd, p.T, p.gate_up, p.ldgu, false);
  matmul(a.w_gate_up, a.dim, H + r.begin, H + r.end, p.y, p.ldd, p.T, p.gate_up, p.ldgu, false);
  for (int64_t t = 0; t < p.T; ++t) {
    const float* gu = p.gate_up + t * p.ldgu;
    silu_mul_row(gu, gu + H, r.begin, r.end, p.act + t * p.ldact);
  }
}

LSK_FN void down_task(void* ctx, int64_t i, int) {  // delta = act @ w_down^T
  const Phase& ph = *static_cast<const Phase*>(ctx);
  const Range r = ph.chunk(i);
  matmul(ph.a->w_down, ph.a->hidden, r.begin, r.end, ph.p->act, ph.p->ldact, ph.p->T,
         ph.a->delta, ph.a->dim, false);
}

LSK_FN void layer(const LayerArgs& a, const Plan& p, const Team& team) {
  const int64_t T = p.T, dim = a.dim, D = a.head_dim, Hq = a.heads_q, Hkv = a.heads_kv;
  // h = x + residual, y = rms_norm(h)
  for (int64_t t = 0; t < T; ++t) {
    const float* x = a.x + t * a.x_row;
    float* h = a.h + t * dim;
    if (a.residual != nullptr) {
      const float* r = a.residual + t * a.residual_row;
      for (int64_t j = 0; j < dim; ++j) h[j] = x[j] + r[j];
    } else {
      std::memcpy(h, x, dim * sizeof(float));
    }
    rms_norm_row(h, a.w_in, dim, a.eps, p.y + t * p.ldd, p.ldd);
  }
  // q, k, v and attention: one task per KV head when there are enough, else two phases
  if (team.nt == 1 || Hkv >= team.nt) {
    Phase ph{&a, &p, Hkv, Hkv};
    team.run(Hkv, &qkv_head_task, &ph);
  } else {
    const int64_t rows = (Hq + 2 * Hkv) * D;
    Phase rows_ph{&a, &p, rows, team.tasks((rows + W - 1) / W)};
    team.run(rows_ph.tasks, &qkv_rows_task, &rows_ph);
    Phase pairs{&a, &p, a.batch * Hkv, a.batch * Hkv};
    team.run(pairs.tasks, &attend_task, &pairs);
  }
  Phase cols{&a, &p, dim, team.tasks((dim + W - 1) / W)};
  team.run(cols.tasks, &o_task, &cols);
  for (int64_t t = 0; t < T; ++t)
    rms_norm_row(a.h + t * dim, a.w_post, dim, a.eps, p.y + t * p.ldd, p.ldd);
  Phase units{&a, &p, a.hidden, team.tasks((a.hidden + W - 1) / W)};
  team.run(units.tasks, &gate_up_task, &units);
  team.run(cols.tasks, &down_task, &cols);
}

// ---------------------------------------------------------------- the draft head
// tokens[r] = argmax_v lm_head[v] . (rms_norm(h[r]) * norm_weight), the first of equal maxima.
// The caller norms the rows into y; each task takes a range of the vocabulary, one matmul panel
// of 16 W rows at a time into a small logits buffer (never the whole vocabulary), and keeps its
// running argmax; the caller merges the tasks' winners in vocabulary order. With exp_sum, a task
// also keeps sum_v exp(logit_v - its running max), rescaled as the max grows: the softmax's
// largest probability without the full logits.
struct HeadArgs {
  const float* y;
  int64_t rows, ldy, dim, vocab, tasks;
  const float* lm_head;
  float* const* logits;  // per thread, (rows, 16 W)
  int64_t* best_index;   // (tasks, rows)
  float* best_value;
  float* exp_sum;        // (tasks, rows) or null
};

LSK_FN void head_norm(const float* h, int64_t rows, int64_t h_row, int64_t dim,
                      const float* norm_weight, float eps, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(h + r * h_row, norm_weight, dim, eps, y + r * ldy, ldy);
}

LSK_FN void head_task(void* ctx, int64_t i, int tid) {
  const HeadArgs& ha = *static_cast<const HeadArgs*>(ctx);
  const int64_t panel = 16 * W, panels = (ha.vocab + panel - 1) / panel;
  const int64_t begin = panels * i / ha.tasks * panel;
  const int64_t end_ = panels * (i + 1) / ha.tasks * panel, end = end_ < ha.vocab ? end_ : ha.vocab;
  int64_t* bi = ha.best_index + i * ha.rows;
  float* bv = ha.best_value + i * ha.rows;
  float* es = ha.exp_sum ? ha.exp_sum + i * ha.rows : nullptr;
  for (int64_t r = 0; r < ha.rows; ++r) {
    bi[r] = -1;
    bv[r] = -__builtin_inff();
    if (es) es[r] = 0.0f;
  }
  float* logits = ha.logits[tid];
  for (int64_t v0 = begin; v0 < end; v0 += panel) {
    const int64_t v1 = v0 + panel < end ? v0 + panel : end;
    matmul(ha.lm_head + v0 * ha.dim, ha.dim, 0, v1 - v0, ha.y, ha.ldy, ha.rows, logits, panel,
           false);
    for (int64_t r = 0; r < ha.rows; ++r) {
      const float* l = logits + r * panel;
      const float before = bv[r];
      for (int64_t v = v0; v < v1; ++v)
        if (bi[r] < 0 || l[v - v0] > bv[r]) {
          bv[r] = l[v - v0];
          bi[r] = v;
        }
      if (!es) continue;
      if (before != bv[r] && before != -__builtin_inff()) es[r] *= std::exp(before - bv[r]);
      const vf top = splat(bv[r]);
      vf acc{};
      int64_t j = 0;
      for (; j + W <= v1 - v0; j += W) acc += vexp(loadu(l + j) - top);
      float sum = hsum(acc);
      for (; j < v1 - v0; ++j) sum += std::exp(l[j] - bv[r]);
      es[r] += sum;
    }
  }
}
