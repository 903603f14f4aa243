"""Append new K/V rows to a static KV cache at per-row lengths: a bit copy, no arithmetic.

Semantics: ``layerskip_kernels.ops.kv_cache_append``. With contiguous tensors the S new rows of
batch row b, k_new[b] of shape (S, H, D), are one span of S * H * D elements, and so are their
destination rows k_cache[b, L : L + S] (L = cache_seqlens[b], read on the device: no host
sync, CUDA-graph safe). The launcher views every tensor as integers of the element's width, so
the copy moves bits (NaN payloads and all) and never rounds.
"""
import torch
import triton
import triton.language as tl

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@triton.jit
def _kv_cache_append_kernel(
    K_CACHE, V_CACHE, K_NEW, V_NEW, SEQLENS, span, cache_elems,
    ROW: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (cdiv(span, BLOCK), B). Contract: K_CACHE, V_CACHE: (B, Smax, H, D) contiguous, and
    K_NEW, V_NEW: (B, S, H, D) contiguous, all one integer type (the bits of fp32 / fp16 / bf16);
    SEQLENS: (B,) int32. ROW = H * D elements, span = S * ROW, cache_elems = Smax * ROW.
    ALIGN: a power of 2 dividing ROW (lets the compiler vectorize the stores).
    Copies K_NEW[b] flat into K_CACHE[b] from element L * ROW on (same for V). Elements that
    would land outside [0, Smax) rows (a bad length) are dropped, not written out of bounds.
    """
    block = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    start = tl.multiple_of(tl.load(SEQLENS + b).to(tl.int64) * ROW, ALIGN)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    dst = start + offs
    ok = (offs < span) & (dst >= 0) & (dst < cache_elems)
    src = b * span + offs
    tl.store(K_CACHE + b * cache_elems + dst, tl.load(K_NEW + src, mask=ok), mask=ok)
    tl.store(V_CACHE + b * cache_elems + dst, tl.load(V_NEW + src, mask=ok), mask=ok)


def launch_config(row, element_size):
    """ALIGN: the largest power of 2 up to 16 bytes dividing the row, so rows of whole 16-byte
    units (any H x D multiple of 8 in fp16) move in 16-byte loads and stores, and any other row
    (D = 5) still works, in narrower ones. BLOCK: 4 KiB a tensor per program (two 16-byte
    vectors a thread) for such rows, 2 KiB for the others, whose stores are narrower: 20-64
    registers and no spills either way on sm_80 / sm_90 (8 KiB spilled at 255 registers)."""
    align = 16 // element_size
    while row % align:
        align //= 2
    block_bytes = 4096 if align * element_size == 16 else 2048
    return dict(ROW=row, ALIGN=align, BLOCK=block_bytes // element_size, num_warps=4)


def kv_cache_append_triton(k_cache, v_cache, k_new, v_new, cache_seqlens):
    """Triton backend of ``ops.kv_cache_append`` (arguments already checked there): writes
    k_new / v_new into the caches in place at rows cache_seqlens[b] + i; returns None."""
    B, Smax, H, D = k_cache.shape
    S = k_new.shape[1]
    span = S * H * D
    if B == 0 or span == 0:
        return
    bits = INT_VIEW[k_cache.dtype]
    config = launch_config(H * D, k_cache.element_size())
    grid = (triton.cdiv(span, config["BLOCK"]), B)
    _kv_cache_append_kernel[grid](
        k_cache.view(bits), v_cache.view(bits), k_new.view(bits), v_new.view(bits),
        cache_seqlens, span, Smax * H * D, **config)
