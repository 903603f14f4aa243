"""Decode / verify attention over a static KV cache, with RoPE and the cache write fused.

One launch of ``_attn_kvcache_fwd_kernel`` per call (plus ``_attn_kvcache_merge_kernel`` when the
keys are split). Semantics: ``layerskip_kernels.ops.attention_with_kvcache`` (flash-attn's
``flash_attn_with_kvcache(..., causal=True)`` with the half rotation):
https://github.com/Dao-AILab/flash-attention/blob/main/flash_attn/flash_attn_interface.py

Tiling. A program owns one (batch row b, KV head, row tile, split). The GQA group's GROUP query
heads times the Sq new queries are packed into the rows of one tile, row r = i * GROUP + g
(query i, head kv_head * GROUP + g), padded to BLOCK_M = a power of 2 >= 16 so that ``tl.dot``
has at least 16 rows. Every K/V block is then read once for the whole group and all queries: a
verify of Sq queries reads the same bytes as a decode step. Up to MAX_BLOCK_M rows (128 for
head_dim <= 128: Sq 16 x GROUP 8) fit one tile; more rows (GROUP 16 x Sq 16) take several row
tiles, each of which reads the keys again, rather than a tile that would spill registers.

Split-KV (FlashDecoding). The row's cached keys [0, L), L = cache_seqlens[b] read on the device,
are cut into ``num_splits`` chunks of whole BLOCK_N blocks, so every row spreads over all splits
whatever its length; a split whose chunk is empty computes nothing and stores lse = -inf only.
With one split the program writes the output; with more, each writes its normalised partial
output and its log-sum-exp, and ``_attn_kvcache_merge_kernel`` combines them. The grid depends
only on shapes (num_splits comes from Smax, never from cache_seqlens): no host sync, and the
launch can be captured in a CUDA graph. ``num_splits_heuristic`` says how the count is chosen.

Cache write and read in one launch. The Sq new keys/values go to positions [L, L + Sq), and
no program of this launch ever reads the cache at positions >= L: the last split of each
(b, KV head, row tile) loads k_new/v_new, rotates k_new and attends to them from its registers
(rounded to the cache dtype first, so the values equal what was written); the one of row tile 0
also writes them to the cache. Reads and writes touch disjoint addresses, so the result is
correct on a GPU under any schedule of the programs, with no barrier; exactly one program
writes each new cache row.

Interpreter. Triton 3.6's interpreter (seen with numpy 2.4) cannot turn a runtime scalar, a
1-element array there, into a Python int, so ``range(start, end, BLOCK_N)`` with bounds read
from memory fails ("only 0-dimensional arrays can be converted to Python scalars"; 3.9
squeezes first). Under the interpreter (INTERPRETED) the same block loop runs as a ``while``,
whose condition 3.6 does convert. Compiled, it stays a ``for`` over [start, end), which Triton
software-pipelines (cp.async stages); a ``while`` it would not.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from ..ops._checks import check


@triton.jit
def _load_rotated(ROW_PTRS, pos, row_ok, COS, SIN, stride_cos, stride_sin,
                  HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Load rows ROW_PTRS[r] + [0, HEAD_DIM) as float32, rotated at positions pos[r] if HAS_ROPE.

    Half rotation with x1 = x[:D/2], x2 = x[D/2:]: (x1 cos - x2 sin, x2 cos + x1 sin). Each
    element pairs with x[(d + D/2) % D], loaded a second time (from L1) to keep one full tile.
    """
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(ROW_PTRS[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        partner = (dims + HALF) % HEAD_DIM
        xp = tl.load(ROW_PTRS[:, None] + partner[None, :], mask=row_ok[:, None], other=0.0)
        xp = tl.where(dims[None, :] < HALF, -xp.to(tl.float32), xp.to(tl.float32))
        freq = dims % HALF
        cos = tl.load(COS + pos[:, None] * stride_cos + freq[None, :], mask=row_ok[:, None],
                      other=0.0).to(tl.float32)
        sin = tl.load(SIN + pos[:, None] * stride_sin + freq[None, :], mask=row_ok[:, None],
                      other=0.0).to(tl.float32)
        x = x * cos + xp * sin
    return x


@triton.jit
def _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale_log2,
                         DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold one key block into the running max m_i, sum l_i and output acc (base-2 exponents).

    q, k, v are in the cache dtype (fp16 / bf16 tensor-core dots, fp32 accumulation; the
    probabilities are rounded to it too, as in flash-attn). UPCAST_DOT widens the operands to
    fp32 after that rounding, for the interpreter, whose tl.dot multiplies bf16 bit patterns as
    integers: the products are exact in fp32, so the numbers match the GPU's.
    """
    if UPCAST_DOT:
        q, k = q.to(tl.float32), k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds a valid key for every row
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if UPCAST_DOT:
        p, v = p.to(tl.float32), v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_cached_block(q, k_base, v_base, k_offs, v_offs, block_start, end, m_i, l_i, acc,
                         scale_log2, stride_kcs, stride_vcs, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Cached keys [block_start, block_start + BLOCK_N) that are < end. The block's base
    pointer is a scalar; k_offs / v_offs (BLOCK_N, HEAD_DIM) are loop-invariant int32 offsets."""
    key_ok = block_start + tl.arange(0, BLOCK_N) < end
    k = tl.load(k_base + block_start * stride_kcs + k_offs, mask=key_ok[:, None], other=0.0)
    v = tl.load(v_base + block_start * stride_vcs + v_offs, mask=key_ok[:, None], other=0.0)
    return _online_softmax_step(q, k, v, key_ok[None, :], m_i, l_i, acc, scale_log2,
                                DOT_PRECISION, UPCAST_DOT)


@triton.jit
def _attn_kvcache_fwd_kernel(
    Q, K_CACHE, V_CACHE, K_NEW, V_NEW, SEQLENS, COS, SIN, OUT, O_PART, LSE_PART,
    stride_qb, stride_qs, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_knb, stride_kns, stride_knh,
    stride_vnb, stride_vns, stride_vnh,
    stride_ob, stride_os, stride_oh,
    stride_cos, stride_sin,
    scale_log2, max_seqlen, rotary_rows,
    SQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NEW: tl.constexpr,
    HAS_ROPE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Grid (B, Hkv * ROW_TILES, num_splits), ROW_TILES = cdiv(SQ * GROUP, BLOCK_M).
    Contract (last dims contiguous, strides in elements):
    Q, OUT: (B, SQ, Hkv * GROUP, HEAD_DIM); K_CACHE, V_CACHE: (B, Smax, Hkv, HEAD_DIM), written at
    rows [L, L + SQ); K_NEW, V_NEW: (B, SQ, Hkv, HEAD_DIM); all of one dtype (fp16, bf16, fp32).
    SEQLENS: (B,) int32, L = SEQLENS[b]. COS, SIN: (>= L + SQ, HEAD_DIM / 2), any float dtype.
    O_PART: (B, Hkv, num_splits, ROW_TILES * BLOCK_M, HEAD_DIM) fp32 and LSE_PART: (B, Hkv,
    num_splits, ROW_TILES * BLOCK_M) fp32, contiguous, used when SPLIT (an empty split stores
    its lse = -inf and no partial output). scale_log2 = softmax_scale * log2(e).
    Memory safety with bad lengths, as the CUDA kernel: L is clamped to [0, max_seqlen = Smax],
    new rows past Smax are not written, RoPE positions clamp to rotary_rows - 1 (COS's rows).
    Query i (rotated at L + i) attends to cache positions [0, L) and to new keys j <= i:
    out = sum_j 2^(s_j - m) v_j / sum_j 2^(s_j - m), s_j = q . k_j * scale_log2. RoPE, softmax
    and accumulators in fp32; dot operands (q, k, p, v) in the cache dtype. INTERPRETED: the
    CPU interpreter (a while loop; dots on fp32-widened operands).
    """
    ROWS: tl.constexpr = SQ * GROUP
    ROW_TILES: tl.constexpr = (ROWS + BLOCK_M - 1) // BLOCK_M
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64) // ROW_TILES
    tile = tl.program_id(1) % ROW_TILES
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    cache_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int64), 0), max_seqlen)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    query = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = rows < ROWS
    dims = tl.arange(0, HEAD_DIM)
    q_rows = Q + b * stride_qb + query * stride_qs + head * stride_qh
    q = _load_rotated(q_rows, tl.minimum(cache_len + query, rotary_rows - 1), row_ok, COS, SIN,
                      stride_cos, stride_sin, HEAD_DIM, HAS_ROPE).to(K_CACHE.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Cached keys [start, end): this split's chunk of [0, L). No causal mask: L <= L + i.
    chunk = tl.cdiv(tl.cdiv(cache_len, BLOCK_N), num_splits) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, cache_len)
    k_cache = K_CACHE + b * stride_kcb + kv_head * stride_kch
    v_cache = V_CACHE + b * stride_vcb + kv_head * stride_vch
    keys = tl.arange(0, BLOCK_N)
    k_offs = keys[:, None] * stride_kcs + dims[None, :]
    v_offs = keys[:, None] * stride_vcs + dims[None, :]
    if INTERPRETED:
        block_start = start
        while block_start < end:
            m_i, l_i, acc = _attend_cached_block(q, k_cache, v_cache, k_offs, v_offs,
                                                 block_start, end, m_i, l_i, acc, scale_log2,
                                                 stride_kcs, stride_vcs, BLOCK_N, DOT_PRECISION,
                                                 INTERPRETED)
            block_start += BLOCK_N
    else:
        for block_start in range(start, end, BLOCK_N):
            m_i, l_i, acc = _attend_cached_block(q, k_cache, v_cache, k_offs, v_offs,
                                                 block_start, end, m_i, l_i, acc, scale_log2,
                                                 stride_kcs, stride_vcs, BLOCK_N, DOT_PRECISION,
                                                 INTERPRETED)

    # New keys [L, L + SQ): the last split attends to them from registers; the one of row
    # tile 0 writes them to the cache.
    if split == num_splits - 1:
        j = tl.arange(0, BLOCK_NEW)
        new_ok = j < SQ
        new_pos = cache_len + j
        k_new = _load_rotated(K_NEW + b * stride_knb + j * stride_kns + kv_head * stride_knh,
                              tl.minimum(new_pos, rotary_rows - 1), new_ok, COS, SIN,
                              stride_cos, stride_sin, HEAD_DIM, HAS_ROPE
                              ).to(K_CACHE.dtype.element_ty)
        v_new = tl.load(V_NEW + b * stride_vnb + j[:, None] * stride_vns + kv_head * stride_vnh
                        + dims[None, :], mask=new_ok[:, None], other=0.0)
        write = ((j < tl.where(tile == 0, SQ, 0)) & (new_pos < max_seqlen))[:, None]  # tile 0
        tl.store(k_cache + new_pos[:, None] * stride_kcs + dims[None, :], k_new, mask=write)
        tl.store(v_cache + new_pos[:, None] * stride_vcs + dims[None, :], v_new, mask=write)
        causal = new_ok[None, :] & (j[None, :] <= query[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k_new, v_new, causal, m_i, l_i, acc, scale_log2,
                                             DOT_PRECISION, INTERPRETED)

    if SPLIT:
        # An empty split (l_i == 0) stores lse = -inf and no partial output: the merge skips it.
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        kv_heads = tl.num_programs(1) // ROW_TILES
        part = ((b * kv_heads + kv_head) * num_splits + split) * (ROW_TILES * BLOCK_M) + rows
        tl.store(LSE_PART + part, m_i + tl.log2(l_safe), mask=row_ok)
        tl.store(O_PART + part[:, None] * HEAD_DIM + dims[None, :], acc / l_safe[:, None],
                 mask=(row_ok & (l_i > 0))[:, None])
    else:
        out = OUT + b * stride_ob + query * stride_os + head * stride_oh
        tl.store(out[:, None] + dims[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit
def _attn_kvcache_merge_kernel(
    OUT, O_PART, LSE_PART, num_splits,
    stride_ob, stride_os, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Grid (B, Hkv, SQ * GROUP): one program per query row. Combines the splits of
    _attn_kvcache_fwd_kernel (same contract; ROWS_PAD = ROW_TILES * BLOCK_M), all at once as a
    (BLOCK_S >= num_splits, HEAD_DIM) tile: out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m),
    m = max_s lse_s (base-2 lse). Empty splits (lse = -inf) weigh 0 and their o_s is not read;
    m is finite because the last split always holds the new keys.
    """
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    row = tl.program_id(2)
    splits = tl.arange(0, BLOCK_S)
    part = ((b * tl.num_programs(1) + kv_head) * num_splits + splits) * ROWS_PAD + row
    lse = tl.load(LSE_PART + part, mask=splits < num_splits, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    dims = tl.arange(0, HEAD_DIM)
    o = tl.load(O_PART + part[:, None] * HEAD_DIM + dims[None, :],
                mask=(lse > float("-inf"))[:, None], other=0.0)
    merged = tl.sum(weight[:, None] * o, 0) / tl.sum(weight, 0)
    query = row // GROUP
    head = kv_head * GROUP + row % GROUP
    tl.store(OUT + b * stride_ob + query * stride_os + head * stride_oh + dims,
             merged.to(OUT.dtype.element_ty))


MAX_SPLITS = 128  # the merge holds (splits, D) in one tile
WARPS_PER_SM = 16  # the CTAs of one launch should bring this many warps to every SM
MIN_KEYS_PER_SPLIT = 128  # and each split at least this many keys, and 8 per query row


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 SXM, for the interpreter


def num_splits_heuristic(batch, kv_heads, Sq, group, max_keys, sm_count, config):
    """How many programs share the keys of one (row, KV head, row tile): FlashDecoding.

    From shapes only (max_keys = Smax, never cache_seqlens: no host sync, graph-safe).
    - Enough CTAs. A single long sequence has B * Hkv = 8 programs for 132 SMs; split so that
      the launch brings about WARPS_PER_SM warps to every SM: 4 CTAs of the 4-warp decode
      config, 2 of the 8-warp verify ones. That is what the registers let co-reside (see
      launch_config), so the whole grid is one wave and every SM keeps several K/V tiles in
      flight; one CTA per SM (the old heuristic's 17 splits, with 8 warps) reached ~24% of HBM.
      The count is rounded to the nearest, so B * Hkv programs that already fill the SMs (B=64,
      Hkv=8: 512 CTAs for a target of 528) do not split at all and pay no merge.
    - Long enough splits. Each split writes its (rows, D) fp32 partial output and the merge
      reads it back, 2 * rows / keys of the K/V bytes it saves (fp16 / bf16); at least
      max(128, 8 * rows) keys per split keeps that under 1/16 for decode (rows <= 8) and under
      1/4 for the largest verify tile (128 rows, whose dots make it compute- rather than
      memory-bound, so filling the SMs is worth more there). 128 keys are 4+ K/V tiles: the
      3-stage pipeline still streams.
    - At most MAX_SPLITS; the merge is then one (splits, D) tile per query row, a few KiB.
    Examples (H100, 132 SMs, D 128, bf16, 32K context; tests pin them): decode B=1, Hkv=8 ->
    66 splits, 528 CTAs of 4 warps (the old heuristic: 17 splits, 136 CTAs of 8 warps, one per
    SM); B=8 -> 8; B=32 -> 2; B=64 -> 1. Verify of 5 queries (20 rows, group 4) -> 66, as
    decode; Sq 16 x group 8 (128 rows, 8 warps) -> 32 splits of 1024 keys.
    """
    row_tiles = triton.cdiv(Sq * group, config["BLOCK_M"])
    programs = batch * kv_heads * row_tiles
    target_ctas = WARPS_PER_SM * sm_count / config["num_warps"]
    by_occupancy = max(1, round(target_ctas / max(programs, 1)))
    by_length = max(1, max_keys // max(MIN_KEYS_PER_SPLIT, 8 * Sq * group))
    return min(by_occupancy, by_length, MAX_SPLITS)


HEAD_DIMS = (32, 64, 128, 256)
# The most query rows one program takes, by (dtype is float32, head_dim): more rows than this
# take several row tiles (each reads the keys again) rather than spill registers.
MAX_BLOCK_M = {(False, 32): 128, (False, 64): 128, (False, 128): 128, (False, 256): 32,
               (True, 32): 128, (True, 64): 64, (True, 128): 16, (True, 256): 16}


def launch_config(Sq, group, head_dim, dtype=torch.bfloat16):
    """Tile sizes, warps and pipeline stages for one call shape (none depends on the lengths).

    BLOCK_M: the GROUP * Sq query rows padded to a power of 2 >= 16 (tl.dot's minimum), at most
    MAX_BLOCK_M. The rest was chosen from the compiled kernels' resource usage on sm_80 and
    sm_90 (cuobjdump; tests/test_attention_with_kvcache.py asserts no spills):
    - fp16 / bf16 decode (BLOCK_M 16): 4 warps and BLOCK_N * D = 4096 (8 KiB K + 8 KiB V tiles)
      need 108-122 registers a thread for D <= 128 on sm_90, so 4 CTAs share an SM (3 at D 256).
      With 3 pipeline stages (cp.async) each CTA keeps two K/V tiles in flight: ~128 KiB per
      SM, several times the ~25 KiB an SM must have in flight to keep HBM3 busy (Little's law:
      3.35 TB/s x ~1 us latency / 132 SMs). Many small CTAs are what one long sequence needs
      (see num_splits_heuristic); the previous 8-warp config took ~210 registers: 1 CTA per SM.
    - fp16 / bf16 verify (BLOCK_M 32 .. 128): BLOCK_N * D = 2048; 4 warps up to 32 rows, 8 from
      64 rows (4 spill on sm_80 at D 128), and at D 256 8 warps and at most 32 rows.
    - float32 (ieee dots run on FMA units: each thread holds whole rows of the operands): 8 warps,
      BLOCK_N 32 and fewer rows as D grows. At D 256 it still spills (~200 bytes a thread) with
      every tile tried: correct, but slow.
    """
    fp32 = dtype == torch.float32
    block_m = min(max(16, triton.next_power_of_2(Sq * group)), MAX_BLOCK_M[fp32, head_dim])
    if fp32:
        block_n, num_warps = 32, 8
    else:
        block_n = max(16, (4096 if block_m == 16 else 2048) // head_dim)
        num_warps = 8 if block_m >= 64 or (head_dim == 256 and block_m > 16) else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_NEW=max(16, triton.next_power_of_2(Sq)),
                num_warps=num_warps, num_stages=2 if fp32 and head_dim == 256 else 3)


def merge_config(num_splits, head_dim):
    """The (splits, D) fp32 tile of one row: about 32 elements a thread."""
    block_s = triton.next_power_of_2(num_splits)
    return dict(BLOCK_S=block_s, num_warps=min(8, max(1, block_s * head_dim // 1024)))


def attention_with_kvcache_triton(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                  rotary_cos=None, rotary_sin=None, softmax_scale=None,
                                  num_splits=None, out=None):
    """Triton backend of ``ops.attention_with_kvcache`` (arguments already checked there).

    num_splits: how many programs share one (row, KV head)'s keys; None picks it from the
    shapes and the SM count (``num_splits_heuristic``). out: an optional (B, Sq, Hq, D) tensor
    of q's dtype to write into. Returns out, (B, Sq, Hq, D). Writes k_new / v_new into the
    caches in place.
    """
    B, Sq, Hq, D = q.shape
    Smax, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    if out is None:
        out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    check(out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out",
          f"{q.dtype} of shape {tuple(q.shape)} with a contiguous last dim",
          f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    check(D in HEAD_DIMS, "q", f"head_dim in {HEAD_DIMS}", D)
    config = launch_config(Sq, group, D, q.dtype)
    if num_splits is None:
        num_splits = num_splits_heuristic(B, Hkv, Sq, group, Smax, _sm_count(q.device),
                                          config)
    check(isinstance(num_splits, int) and 1 <= num_splits <= MAX_SPLITS, "num_splits",
          f"an int in [1, {MAX_SPLITS}]", num_splits)
    if B == 0 or Sq == 0:
        return out
    has_rope = rotary_cos is not None
    if has_rope:
        rotary_cos = rotary_cos if rotary_cos.stride(-1) == 1 else rotary_cos.contiguous()
        rotary_sin = rotary_sin if rotary_sin.stride(-1) == 1 else rotary_sin.contiguous()
    else:
        rotary_cos = rotary_sin = q  # never read
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    row_tiles = triton.cdiv(Sq * group, config["BLOCK_M"])
    rows_pad = row_tiles * config["BLOCK_M"]
    if num_splits > 1:
        o_part = torch.empty((B, Hkv, num_splits, rows_pad, D), dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty((B, Hkv, num_splits, rows_pad), dtype=torch.float32,
                               device=q.device)
    else:
        o_part = lse_part = out  # never written
    _attn_kvcache_fwd_kernel[(B, Hkv * row_tiles, num_splits)](
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, rotary_cos, rotary_sin, out,
        o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        rotary_cos.stride(0), rotary_sin.stride(0),
        softmax_scale * math.log2(math.e), Smax, rotary_cos.shape[0] if has_rope else 1,
        SQ=Sq, GROUP=group, HEAD_DIM=D, HAS_ROPE=has_rope, SPLIT=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRETED=q.device.type == "cpu", **config,
    )
    if num_splits > 1:
        _attn_kvcache_merge_kernel[(B, Hkv, Sq * group)](
            out, o_part, lse_part, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            GROUP=group, HEAD_DIM=D, ROWS_PAD=rows_pad, **merge_config(num_splits, D),
        )
    return out
