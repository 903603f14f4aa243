"""Decode / verify attention over a static KV cache, with the cache write and RoPE fused.

Semantics match flash-attn's ``flash_attn_with_kvcache(..., causal=True)`` with Llama's
half rotation (GPT-NeoX style, ``rotary_interleaved=False``):
https://github.com/Dao-AILab/flash-attention/blob/main/flash_attn/flash_attn_interface.py

For each row b and new position i < Sq, at cache position p = cache_seqlens[b] + i:
    q[b, i] and k_new[b, i] are rotated by RoPE at position p (when cos/sin are given),
    k_cache[b, p], v_cache[b, p] = k_new[b, i], v_new[b, i]   (in place)
    out[b, i] = softmax(q[b, i] . k_cache[b, :p+1]^T * scale) @ v_cache[b, :p+1]
Query heads map to KV heads in groups (GQA): query head h reads KV head h // (Hq // Hkv).
cache_seqlens is never modified: the caller advances it.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import check, overlaps_itself, share_memory
from .backend import Impl, Op

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_HEAD_DIMS = (32, 64, 128, 256)
CUDA_HEAD_DIMS = (32, 64, 128)  # _C.ATTENTION_HEAD_DIMS (no 256: csrc/*_kernel.cuh says why)
CUDA_DTYPES = (torch.float16, torch.bfloat16)  # tensor-core MMA
MAX_KERNEL_QUERIES = 16  # decode and verify; a prompt runs the model's prefill path


def _check_attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                  rotary_cos, rotary_sin):
    check(q.dim() == 4, "q", "4 dims (B, Sq, Hq, D)", tuple(q.shape))
    B, Sq, Hq, D = q.shape
    check(q.dtype in SUPPORTED_DTYPES, "q", "float32, float16 or bfloat16", q.dtype)
    check(k_cache.dim() == 4 and k_cache.shape[0] == B and k_cache.shape[3] == D,
          "k_cache", f"(B={B}, Smax, Hkv, D={D})", tuple(k_cache.shape))
    Smax, Hkv = k_cache.shape[1], k_cache.shape[2]
    check(Hkv > 0 and Hq % Hkv == 0, "k_cache", f"a KV head count dividing Hq={Hq}", Hkv)
    check_caches(k_cache, v_cache)
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check(t.shape == (B, Sq, Hkv, D), name, f"shape {(B, Sq, Hkv, D)}", tuple(t.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new),
                    ("v_new", v_new)):
        check(t.dtype == q.dtype, name, f"dtype {q.dtype} (as q)", t.dtype)
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new),
             ("v_new", v_new))
    for name, t in named:
        check(t.stride(-1) == 1, name, "a contiguous last dim (stride 1)", t.stride(-1))
        check(t.device == q.device, name, f"device {q.device} (as q)", t.device)
    check(cache_seqlens.shape == (B,) and cache_seqlens.dtype == torch.int32,
          "cache_seqlens", f"int32 of shape ({B},)", f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    check(cache_seqlens.device == q.device, "cache_seqlens", f"device {q.device} (as q)",
          cache_seqlens.device)
    check_rotary(rotary_cos, rotary_sin, Smax, D, q.device, "q")
    if cache_seqlens.device.type == "cpu":  # a bounds check on the GPU would cost a host sync
        longest = int(cache_seqlens.max()) if B else 0
        check(int(cache_seqlens.min()) >= 0 if B else True, "cache_seqlens", ">= 0",
              cache_seqlens.tolist())
        check(longest + Sq <= Smax, "cache_seqlens",
              f"cache_seqlens + Sq <= Smax={Smax} (cache full)", f"{longest} + {Sq}")


def check_caches(k_cache, v_cache):
    """What a cache written in place must be (attention_with_kvcache and llama_layer): v_cache
    of k_cache's shape, neither written through an overlapping (expanded) view, and the two
    apart in memory, since a write to one would change the other."""
    check(v_cache.shape == k_cache.shape, "v_cache", f"shape {tuple(k_cache.shape)}",
          tuple(v_cache.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check(not overlaps_itself(t), name, "a tensor with one address per element (not "
              "expanded or otherwise overlapping)", f"strides {t.stride()}")
    check(not share_memory(k_cache, v_cache), "v_cache", "memory apart from k_cache's",
          "a view overlapping k_cache")


def check_rotary(rotary_cos, rotary_sin, Smax, D, device, anchor):
    """RoPE tables: both or neither, (>= Smax, D/2) floating-point tables on `device` (as
    argument `anchor`). The kernels read any float dtype (CUDA as float32 unless fp16 / bf16);
    integer tables would be angles rounded to whole numbers."""
    check((rotary_cos is None) == (rotary_sin is None), "rotary_sin",
          "given together with rotary_cos", "only one of them")
    if rotary_cos is None:
        return
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        check(t.dim() == 2 and t.shape[0] >= Smax and t.shape[1] == D // 2, name,
              f"shape (>= Smax={Smax}, D/2={D // 2})", tuple(t.shape))
        check(t.is_floating_point(), name, "a floating-point table", t.dtype)
        check(t.device == device, name, f"device {device} (as {anchor})", t.device)


def rotary_factors(cos, sin):
    """(cos, sin) tables (..., D/2) -> factors (..., 1, D) for rotate(): half rotation
    x' = x * [cos, cos] + swap_halves(x) * [-sin, sin], broadcast over heads, float32."""
    cos, sin = cos.float()[..., None, :], sin.float()[..., None, :]
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rotate(x, factors):
    """RoPE on x (..., H, D) with rotary_factors(); pairs are (x[j], x[j + D/2])."""
    cos, sin = factors
    x32 = x.float()
    return (x32 * cos + x32.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


@dataclass
class AttentionPlan:
    """The reference path's work that every layer of one forward shares: it depends on the
    positions only."""
    cache_seqlens: torch.Tensor  # (B,) int32
    positions: torch.Tensor  # (B, Sq) int64: where the new tokens go
    keys: int  # cache slots [0, keys) hold every key any query may see
    rotary: tuple | None  # rotary_factors() at the positions, (B, Sq, 1, D)
    hidden: torch.Tensor  # (B, 1, 1, Sq, keys) bool: True where query i must not see key j
    stale: torch.Tensor  # (B, 1, keys, 1) bool: keys past every query of the row


def plan_attention(cache_seqlens, Sq, max_seq_len, rotary_cos=None, rotary_sin=None):
    """Prepare the reference attention of Sq new tokens per row, once for all layers.

    On a CPU the keys past the longest row are sliced off (reading the lengths on the host);
    elsewhere every slot is kept and masked, with no host sync, so a CUDA graph can capture it.
    """
    device = cache_seqlens.device
    positions = cache_seqlens.long()[:, None] + torch.arange(Sq, device=device)
    keys = max_seq_len
    if device.type == "cpu" and len(positions):
        longest = int(positions.max())
        check(longest < max_seq_len and int(cache_seqlens.min()) >= 0, "cache_seqlens",
              f"0 <= cache_seqlens and cache_seqlens + Sq <= Smax={max_seq_len} (cache full)",
              f"{longest + 1} slots needed")
        # A multiple of 64 keeps the matmul shapes few, so oneDNN reuses its kernels.
        keys = min(max_seq_len, (longest // 64 + 1) * 64)
    slots = torch.arange(keys, device=device)
    hidden = slots > positions[:, None, None, :, None]
    stale = (slots >= cache_seqlens.long()[:, None] + Sq)[:, None, :, None]
    rotary = None if rotary_cos is None else rotary_factors(rotary_cos[positions],
                                                            rotary_sin[positions])
    return AttentionPlan(cache_seqlens, positions, keys, rotary, hidden, stale)


def attend(q, k_cache, v_cache, k_new, v_new, plan, softmax_scale=None):
    """The reference attention of one layer with a plan from plan_attention(): write the new
    K/V, then attend. Cache slots a query must not see are masked exactly (a NaN there cannot
    reach the output), as flash-attn's semantics promise."""
    B, Sq, Hq, D = q.shape
    if plan.rotary is not None:
        q, k_new = rotate(q, plan.rotary), rotate(k_new, plan.rotary)
    rows = torch.arange(B, device=q.device)[:, None]
    k_cache[rows, plan.positions] = k_new
    v_cache[rows, plan.positions] = v_new
    Hkv, keys = k_cache.shape[2], plan.keys
    G = Hq // Hkv
    # Each KV head serves its group of query heads x Sq queries as one matrix of rows.
    q = q.float().view(B, Sq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B * Hkv, G * Sq, D)
    k = k_cache[:, :keys].float().permute(0, 2, 3, 1).reshape(B * Hkv, D, keys)
    v = torch.where(plan.stale, 0.0, v_cache[:, :keys].float().transpose(1, 2))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    scores = torch.bmm(q, k).mul_(scale)
    scores.view(B, Hkv, G, Sq, keys).masked_fill_(plan.hidden, float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(B * Hkv, keys, D))
    out = out.view(B, Hkv, G, Sq, D).permute(0, 3, 1, 2, 4).to(k_new.dtype)
    return out.reshape(B, Sq, Hq, D).contiguous()  # as the kernels return it


def causal_attention(q, k, v, rotary, kv=None):
    """S new tokens per row at positions 0..S-1 (a prompt, or training without a cache):
    RoPE with rotary_factors() of those positions, then causal SDPA (flash or cuDNN on a GPU).
    With kv = (k_cache, v_cache), the rotated keys and the values fill cache rows [0, S)."""
    q, k = rotate(q, rotary), rotate(k, rotary)
    if kv is not None:
        kv[0][:, :k.shape[1]], kv[1][:, :v.shape[1]] = k, v
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attention_with_kvcache_reference(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                     rotary_cos=None, rotary_sin=None, softmax_scale=None):
    """Plain PyTorch: the CPU path and the oracle the kernels are tested against."""
    plan = plan_attention(cache_seqlens, q.shape[1], k_cache.shape[1], rotary_cos, rotary_sin)
    return attend(q, k_cache, v_cache, k_new, v_new, plan, softmax_scale)


def _launch_triton(*args, **kwargs):
    from ..triton.attention_with_kvcache import attention_with_kvcache_triton
    return attention_with_kvcache_triton(*args, **kwargs)


def _launch_cuda(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rotary_cos=None,
                 rotary_sin=None, softmax_scale=None, num_splits=None, out=None,
                 row_tiles_per_block=0):
    """CUDA backend (csrc/attention_with_kvcache.cu): arguments checked by the op, and within
    _cuda_limits. num_splits: None picks it from the shape, the SM count and the kernel's
    occupancy (_C.attention_with_kvcache_num_splits), else 1.._C.ATTENTION_MAX_SPLITS.
    out: an optional (B, Sq, Hq, D) tensor of q's dtype. row_tiles_per_block: 0 lets one block
    serve up to 8 tiles of 16 query rows (Hq / Hkv * Sq rows), reading each key once for all;
    1 is the one-tile-per-block kernel as validated on the H100 on 2026-11-25 (a switch to fall
    back to). Returns (B, Sq, Hq, D).
    """
    from .. import _ext
    B, Sq, Hq, D = q.shape
    Smax, Hkv = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    check(out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out",
          f"{q.dtype} of shape {tuple(q.shape)} with a contiguous last dim",
          f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    check(_aligned(out), "out", "16-byte aligned rows (data_ptr and strides multiples of 8)",
          f"data_ptr {out.data_ptr()} strides {out.stride()}")
    if rotary_cos is not None:
        dtype = rotary_cos.dtype if rotary_cos.dtype in _ext.DTYPE_CODES else torch.float32
        rotary_cos, rotary_sin = (t.to(dtype) if t.stride(-1) == 1 else t.to(dtype).contiguous()
                                  for t in (rotary_cos, rotary_sin))
    group = Hq // Hkv
    max_splits = _ext._C.ATTENTION_MAX_SPLITS
    with torch.cuda.device(q.device):
        if num_splits is None:
            num_splits = _ext._C.attention_with_kvcache_num_splits(
                B, Hkv, group * Sq, Smax, D, row_tiles_per_block=row_tiles_per_block)
        check(isinstance(num_splits, int) and 1 <= num_splits <= max_splits, "num_splits",
              f"an int in [1, {max_splits}]", num_splits)
        if B == 0 or Sq == 0 or Hq == 0:
            return out
        o_part = lse_part = None
        if num_splits > 1:
            o_part = torch.empty((B, Hkv, num_splits, group * Sq, D), dtype=torch.float32,
                                 device=q.device)
            lse_part = torch.empty((B, Hkv, num_splits, group * Sq), dtype=torch.float32,
                                   device=q.device)
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        _ext._C.attention_with_kvcache(
            q=q.data_ptr(), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
            k_new=k_new.data_ptr(), v_new=v_new.data_ptr(),
            cache_seqlens=cache_seqlens.data_ptr(),
            rotary_cos=ptr(rotary_cos), rotary_sin=ptr(rotary_sin), out=out.data_ptr(),
            o_part=ptr(o_part), lse_part=ptr(lse_part), batch=B, seqlen_q=Sq, heads_q=Hq,
            heads_kv=Hkv, head_dim=D, max_seqlen=Smax,
            rotary_rows=0 if rotary_cos is None else rotary_cos.shape[0],
            q_strides=q.stride()[:3], k_cache_strides=k_cache.stride()[:3],
            v_cache_strides=v_cache.stride()[:3], k_new_strides=k_new.stride()[:3],
            v_new_strides=v_new.stride()[:3], out_strides=out.stride()[:3],
            cos_stride=0 if rotary_cos is None else rotary_cos.stride(0),
            sin_stride=0 if rotary_sin is None else rotary_sin.stride(0),
            dtype=_ext.DTYPE_CODES[q.dtype],
            rotary_dtype=0 if rotary_cos is None else _ext.DTYPE_CODES[rotary_cos.dtype],
            softmax_scale=softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D),
            num_splits=num_splits, row_tiles_per_block=row_tiles_per_block,
            stream=torch.cuda.current_stream().cuda_stream)
    return out


def _aligned(t):
    """The CUDA kernel moves 16-byte units: every (b, s, h) row must start on one."""
    return t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:3])


def _kernel_limits(head_dims):
    def limits(q, *_):
        D, Sq = q.shape[-1], q.shape[1]
        if D not in head_dims:
            return "q", f"head_dim in {head_dims}", D
        if Sq > MAX_KERNEL_QUERIES:
            return "q", f"at most {MAX_KERNEL_QUERIES} queries per row", Sq
        return None
    return limits


def _cuda_limits(q, k_cache, v_cache, k_new, v_new, *_):
    if q.dtype not in CUDA_DTYPES:
        return "q", "float16 or bfloat16", q.dtype
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new),
                    ("v_new", v_new)):
        if not _aligned(t):
            return (name, "16-byte aligned rows (data_ptr and strides multiples of 8)",
                    f"data_ptr {t.data_ptr()} strides {t.stride()}")
    return _kernel_limits(CUDA_HEAD_DIMS)(q)


ATTENTION = Op("attention_with_kvcache", {
    "cuda": Impl(_launch_cuda, _cuda_limits),
    "triton": Impl(_launch_triton, _kernel_limits(TRITON_HEAD_DIMS)),
    "torch": Impl(attention_with_kvcache_reference),
})


def attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                           rotary_cos=None, rotary_sin=None, softmax_scale=None,
                           backend="auto"):
    """Append k_new/v_new to the cache at ``cache_seqlens`` and attend, causally.

    q: (B, Sq, Hq, D); k_new, v_new: (B, Sq, Hkv, D); k_cache, v_cache: (B, Smax, Hkv, D),
    written in place; cache_seqlens: (B,) int32, the length of each row before this call;
    rotary_cos, rotary_sin: (>= Smax, D/2) or None. Returns (B, Sq, Hq, D) in q's dtype.
    Query i of row b sees cache positions [0, cache_seqlens[b] + i] (bottom-right causal).
    """
    _check_attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                  rotary_cos, rotary_sin)
    return ATTENTION(backend, q.device, (q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                         rotary_cos, rotary_sin, softmax_scale))
