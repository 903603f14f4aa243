"""Decode / verify attention over a static KV cache, with RoPE and the cache write fused.

One launch of ``_attn_kvcache_fwd_kernel`` per call (plus ``_attn_kvcache_merge_kernel`` when the
keys are split). Semantics: ``layerskip_kernels.ops.attention_with_kvcache`` (flash-attn's
``flash_attn_with_kvcache(..., causal=True)`` with the half rotation):
https://github.com/Dao-AILab/flash-attention/blob/main/flash_attn/flash_attn_interface.py

Tiling. A program owns one (batch row b, KV head, split). The GQA group's GROUP query heads
times the Sq new queries are packed into the rows of one tile, row r = i * GROUP + g (query i,
head kv_head * GROUP + g), padded to BLOCK_M = a power of 2 >= 16 so that ``tl.dot`` has at
least 16 rows. Every K/V block is then read once for the whole group.

Split-KV. The row's cached keys [0, L), L = cache_seqlens[b] read on the device, are cut into
``num_splits`` chunks of whole BLOCK_N blocks, so every row spreads over all splits whatever its
length; a split whose chunk is empty computes nothing and writes lse = -inf. With one split the
program writes the output; with more, each writes its normalised partial output and its
log-sum-exp, and ``_attn_kvcache_merge_kernel`` combines them. The grid depends only on shapes,
never on cache_seqlens: no host sync, and the launch can be captured in a CUDA graph.

Cache write and read in one launch. The Sq new keys/values go to positions [L, L + Sq), and
no program of this launch ever reads the cache at positions >= L: the last split of each
(b, KV head) loads k_new/v_new, rotates k_new, writes both to the cache, and attends to them
from its registers (rounded to the cache dtype first, so the values equal what was written).
Reads and writes touch disjoint addresses, so the result is correct on a GPU under any
schedule of the programs, with no barrier; exactly one program writes each new cache row.
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
def _attn_kvcache_fwd_kernel(
    Q, K_CACHE, V_CACHE, K_NEW, V_NEW, SEQLENS, COS, SIN, OUT, O_PART, LSE_PART,
    stride_qb, stride_qs, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_knb, stride_kns, stride_knh,
    stride_vnb, stride_vns, stride_vnh,
    stride_ob, stride_os, stride_oh,
    stride_cos, stride_sin,
    scale_log2,
    SQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NEW: tl.constexpr,
    HAS_ROPE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Grid (B, Hkv, num_splits). Contract (last dims contiguous, strides in elements):
    Q, OUT: (B, SQ, Hkv * GROUP, HEAD_DIM); K_CACHE, V_CACHE: (B, Smax, Hkv, HEAD_DIM), written at
    rows [L, L + SQ); K_NEW, V_NEW: (B, SQ, Hkv, HEAD_DIM); all of one dtype (fp16, bf16, fp32).
    SEQLENS: (B,) int32, L = SEQLENS[b]. COS, SIN: (>= L + SQ, HEAD_DIM / 2), any float dtype.
    O_PART: (B, Hkv, num_splits, BLOCK_M, HEAD_DIM) fp32 and LSE_PART: (B, Hkv, num_splits,
    BLOCK_M) fp32, contiguous, used when SPLIT. scale_log2 = softmax_scale * log2(e).
    Query i (rotated at L + i) attends to cache positions [0, L) and to new keys j <= i:
    out = sum_j 2^(s_j - m) v_j / sum_j 2^(s_j - m), s_j = q . k_j * scale_log2. RoPE, softmax
    and accumulators in fp32; dot operands (q, k, p, v) in the cache dtype. UPCAST_DOT: interpreter.
    """
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    cache_len = tl.load(SEQLENS + b).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    query = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = rows < SQ * GROUP
    dims = tl.arange(0, HEAD_DIM)
    q_rows = Q + b * stride_qb + query * stride_qs + head * stride_qh
    q = _load_rotated(q_rows, cache_len + query, row_ok, COS, SIN, stride_cos, stride_sin,
                      HEAD_DIM, HAS_ROPE).to(K_CACHE.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Cached keys [start, end): this split's chunk of [0, L). No causal mask: L <= L + i.
    chunk = tl.cdiv(tl.cdiv(cache_len, BLOCK_N), num_splits) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, cache_len)
    k_cache = K_CACHE + b * stride_kcb + kv_head * stride_kch
    v_cache = V_CACHE + b * stride_vcb + kv_head * stride_vch
    for block_start in range(start, end, BLOCK_N):
        pos = block_start + tl.arange(0, BLOCK_N)
        key_ok = pos < end
        k = tl.load(k_cache + pos[:, None] * stride_kcs + dims[None, :], mask=key_ok[:, None],
                    other=0.0)
        v = tl.load(v_cache + pos[:, None] * stride_vcs + dims[None, :], mask=key_ok[:, None],
                    other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, key_ok[None, :], m_i, l_i, acc,
                                             scale_log2, DOT_PRECISION, UPCAST_DOT)

    # New keys [L, L + SQ): the last split writes them and attends to them from registers.
    if split == num_splits - 1:
        j = tl.arange(0, BLOCK_NEW)
        new_ok = j < SQ
        new_pos = cache_len + j
        k_new = _load_rotated(K_NEW + b * stride_knb + j * stride_kns + kv_head * stride_knh,
                              new_pos, new_ok, COS, SIN, stride_cos, stride_sin,
                              HEAD_DIM, HAS_ROPE).to(K_CACHE.dtype.element_ty)
        v_new = tl.load(V_NEW + b * stride_vnb + j[:, None] * stride_vns + kv_head * stride_vnh
                        + dims[None, :], mask=new_ok[:, None], other=0.0)
        tl.store(k_cache + new_pos[:, None] * stride_kcs + dims[None, :], k_new,
                 mask=new_ok[:, None])
        tl.store(v_cache + new_pos[:, None] * stride_vcs + dims[None, :], v_new,
                 mask=new_ok[:, None])
        causal = new_ok[None, :] & (j[None, :] <= query[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k_new, v_new, causal, m_i, l_i, acc, scale_log2,
                                             DOT_PRECISION, UPCAST_DOT)

    if SPLIT:
        # An empty split (l_i == 0) stores lse = -inf and zeros, which the merge ignores.
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        part = ((b * tl.num_programs(1) + kv_head) * num_splits + split) * BLOCK_M + rows
        tl.store(LSE_PART + part, m_i + tl.log2(l_safe))
        tl.store(O_PART + part[:, None] * HEAD_DIM + dims[None, :], acc / l_safe[:, None])
    else:
        out = OUT + b * stride_ob + query * stride_os + head * stride_oh
        tl.store(out[:, None] + dims[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit
def _attn_kvcache_merge_kernel(
    OUT, O_PART, LSE_PART, num_splits,
    stride_ob, stride_os, stride_oh,
    SQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (B, Hkv). Combines the splits of _attn_kvcache_fwd_kernel (same contract):
    out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m), m = max_s lse_s (base-2 lse).
    """
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    first = (b * tl.num_programs(1) + kv_head) * num_splits * BLOCK_M
    # Start from the last split, which always holds the new keys, so m is finite from the start.
    last = first + (num_splits - 1) * BLOCK_M + rows
    m = tl.load(LSE_PART + last)
    weight = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.load(O_PART + last[:, None] * HEAD_DIM + dims[None, :])
    for s in range(0, num_splits - 1):
        part = first + s * BLOCK_M + rows
        lse = tl.load(LSE_PART + part)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        weight = weight * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * tl.load(O_PART + part[:, None] * HEAD_DIM
                                                          + dims[None, :])
        m = m_new
    query = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    out = OUT + b * stride_ob + query * stride_os + head * stride_oh
    tl.store(out[:, None] + dims[None, :], (acc / weight[:, None]).to(OUT.dtype.element_ty),
             mask=(rows < SQ * GROUP)[:, None])


MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost (q load, merge) outweighs its keys


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 SXM, for the interpreter


def num_splits_heuristic(batch_heads, max_keys, sm_count):
    """Split the keys only while B * Hkv programs leave SMs idle, and keep splits long enough."""
    if batch_heads >= sm_count:
        return 1
    by_occupancy = triton.cdiv(sm_count, batch_heads)
    by_length = max(1, max_keys // MIN_KEYS_PER_SPLIT)
    return min(by_occupancy, by_length, MAX_SPLITS)


def launch_config(Sq, group, head_dim):
    """GROUP * Sq query rows padded to a power of 2 >= 16 (tl.dot's minimum). The K/V tiles'
    pointers dominate registers: BLOCK_N * D = 4096 with 8 warps stays under 255 registers with
    no spills for every tile on sm_80 / sm_90 (ptxas -v), where 4 warps or 8192 spill."""
    return dict(BLOCK_M=max(16, triton.next_power_of_2(Sq * group)),
                BLOCK_N=4096 // head_dim, BLOCK_NEW=max(16, triton.next_power_of_2(Sq)),
                num_warps=8)


def attention_with_kvcache_triton(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                  rotary_cos=None, rotary_sin=None, softmax_scale=None,
                                  num_splits=None, out=None):
    """Triton backend of ``ops.attention_with_kvcache`` (arguments already checked there).

    num_splits: how many programs share one (row, KV head)'s keys; None picks it from B * Hkv,
    the SM count and Smax. out: an optional (B, Sq, Hq, D) tensor of q's dtype to write into.
    Returns out, (B, Sq, Hq, D). Writes k_new / v_new into the caches in place.
    """
    B, Sq, Hq, D = q.shape
    Smax, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    if out is None:
        out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    check(out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out",
          f"{q.dtype} of shape {tuple(q.shape)} with a contiguous last dim",
          f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if num_splits is None:
        num_splits = num_splits_heuristic(B * Hkv, Smax, _sm_count(q.device))
    check(isinstance(num_splits, int) and num_splits >= 1, "num_splits", "an int >= 1",
          num_splits)
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
    config = launch_config(Sq, group, D)
    if num_splits > 1:
        o_part = torch.empty((B, Hkv, num_splits, config["BLOCK_M"], D), dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty((B, Hkv, num_splits, config["BLOCK_M"]), dtype=torch.float32,
                               device=q.device)
    else:
        o_part = lse_part = out  # never written
    _attn_kvcache_fwd_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, rotary_cos, rotary_sin, out,
        o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        rotary_cos.stride(0), rotary_sin.stride(0),
        softmax_scale * math.log2(math.e),
        SQ=Sq, GROUP=group, HEAD_DIM=D, HAS_ROPE=has_rope, SPLIT=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=q.device.type == "cpu", **config,
    )
    if num_splits > 1:
        _attn_kvcache_merge_kernel[(B, Hkv)](
            out, o_part, lse_part, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            SQ=Sq, GROUP=group, HEAD_DIM=D, BLOCK_M=config["BLOCK_M"],
            num_warps=config["num_warps"],
        )
    return out
