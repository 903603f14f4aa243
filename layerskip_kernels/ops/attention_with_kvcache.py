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

import torch

from ._checks import check
from .backend import resolve_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)
MAX_KERNEL_QUERIES = 16


def _check_attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                  rotary_cos, rotary_sin):
    check(q.dim() == 4, "q", "4 dims (B, Sq, Hq, D)", tuple(q.shape))
    B, Sq, Hq, D = q.shape
    check(q.dtype in SUPPORTED_DTYPES, "q", "float32, float16 or bfloat16", q.dtype)
    check(k_cache.dim() == 4 and k_cache.shape[0] == B and k_cache.shape[3] == D,
          "k_cache", f"(B={B}, Smax, Hkv, D={D})", tuple(k_cache.shape))
    Smax, Hkv = k_cache.shape[1], k_cache.shape[2]
    check(Hkv > 0 and Hq % Hkv == 0, "k_cache", f"a KV head count dividing Hq={Hq}", Hkv)
    check(v_cache.shape == k_cache.shape, "v_cache", f"shape {tuple(k_cache.shape)}",
          tuple(v_cache.shape))
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
    check((rotary_cos is None) == (rotary_sin is None), "rotary_sin",
          "given together with rotary_cos", "only one of them")
    if rotary_cos is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check(t.dim() == 2 and t.shape[0] >= Smax and t.shape[1] == D // 2, name,
                  f"shape (>= Smax={Smax}, D/2={D // 2})", tuple(t.shape))
            check(t.device == q.device, name, f"device {q.device} (as q)", t.device)
    if cache_seqlens.device.type == "cpu":  # a bounds check on the GPU would cost a host sync
        longest = int(cache_seqlens.max()) if B else 0
        check(int(cache_seqlens.min()) >= 0 if B else True, "cache_seqlens", ">= 0",
              cache_seqlens.tolist())
        check(longest + Sq <= Smax, "cache_seqlens",
              f"cache_seqlens + Sq <= Smax={Smax} (cache full)", f"{longest} + {Sq}")


def apply_rotary(x, cos, sin):
    """Half rotation: pairs (x[j], x[j + D/2]). x: (B, S, H, D); cos, sin: (B, S, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, :, None].float(), sin[:, :, None].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attention_with_kvcache_reference(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                     rotary_cos=None, rotary_sin=None, softmax_scale=None):
    """Plain PyTorch: the CPU path and the oracle the kernels are tested against."""
    B, Sq, Hq, D = q.shape
    positions = cache_seqlens.long()[:, None] + torch.arange(Sq, device=q.device)  # (B, Sq)
    if rotary_cos is not None:
        cos, sin = rotary_cos[positions], rotary_sin[positions]
        q, k_new = apply_rotary(q, cos, sin), apply_rotary(k_new, cos, sin)
    rows = torch.arange(B, device=q.device)[:, None]
    k_cache[rows, positions] = k_new
    v_cache[rows, positions] = v_new
    # Keys past the longest row are never attended: slicing them off is the CPU fast path.
    # Rounding up to a multiple of 64 keeps the matmul shapes few, so oneDNN reuses kernels.
    keys = min(k_cache.shape[1], (int(positions.max()) // 64 + 1) * 64)
    k, v = k_cache[:, :keys].transpose(1, 2).float(), v_cache[:, :keys].transpose(1, 2).float()
    Hkv = k.shape[1]
    # Each KV head serves its group of query heads x Sq queries as one matrix of rows.
    q = q.float().view(B, Sq, Hkv, Hq // Hkv, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Sq, D)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    scores = (q.reshape(B, Hkv, -1, D) @ k.transpose(-1, -2)).view(B, Hkv, -1, Sq, keys) * scale
    visible = torch.arange(keys, device=q.device) <= positions[:, None, None, :, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    out = probs.view(B, Hkv, -1, keys) @ v  # (B, Hkv, G * Sq, D)
    return out.view(B, Hkv, -1, Sq, D).permute(0, 3, 1, 2, 4).reshape(B, Sq, Hq, D).to(k_new.dtype)


def _launch_triton(*args, **kwargs):
    from ..triton.attention_with_kvcache import attention_with_kvcache_triton
    return attention_with_kvcache_triton(*args, **kwargs)


_BACKENDS = {"torch": attention_with_kvcache_reference, "triton": _launch_triton}


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
    name = resolve_backend(backend, q.device, available=tuple(_BACKENDS))
    if name != "torch":
        D, Sq = q.shape[-1], q.shape[1]
        check(D in KERNEL_HEAD_DIMS, "q", f"head_dim in {KERNEL_HEAD_DIMS} for backend {name}", D)
        check(Sq <= MAX_KERNEL_QUERIES, "q", f"at most {MAX_KERNEL_QUERIES} queries per row "
              f"for backend {name}", Sq)
    return _BACKENDS[name](q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                           rotary_cos, rotary_sin, softmax_scale)
