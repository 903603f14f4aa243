"""Greedy acceptance of a self-speculative round: no host sync, CUDA-graph safe.

Semantics: ``layerskip_kernels.ops.greedy_accept``. From int64 tokens, one launch of
``_greedy_accept_kernel`` (one program per row). From logits, two:
1. ``_verify_argmax_partial_kernel``, grid (vocab blocks, B * (k + 1)): each program reads one
   BLOCK_V slice of one position's logits and writes its best (logit, lowest id) as one
   packed int64 key (``draft_head._pack``: a NaN counts as the largest, as torch.argmax). The
   vocabulary is split so that even B = 1 spreads over the GPU (k + 1 rows alone would put
   a 128K-token read in each of 9 programs).
2. ``_greedy_accept_kernel`` with FROM_PARTIAL, grid (B,): per position the max of its block
   keys is the full model's token; then the acceptance, as from tokens.
Loop bounds are constexprs: Triton 3.6's interpreter cannot iterate over a runtime scalar.
"""
import torch
import triton
import triton.language as tl

from ..ops._checks import check
from .draft_head import _pack, _unpack


@triton.jit
def _verify_argmax_partial_kernel(
    VERIFY, PART, vocab, stride_vb, stride_vk,
    K1: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid (num_blocks = cdiv(vocab, BLOCK_V), B * K1). VERIFY: (B, K1, vocab) fp32 / fp16 /
    bf16 logits, last dim contiguous; PART: (B * K1, num_blocks) int64, contiguous: the
    _pack()ed (max logit, its lowest id) of each block of each (row, position)."""
    vblock = tl.program_id(0)
    r = tl.program_id(1)
    b = (r // K1).to(tl.int64)
    i = (r % K1).to(tl.int64)
    ids = vblock * BLOCK_V + tl.arange(0, BLOCK_V)
    x = tl.load(VERIFY + b * stride_vb + i * stride_vk + ids, mask=ids < vocab,
                other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
    keys = tl.where(ids < vocab, _pack(x, ids), -9223372036854775808)
    tl.store(PART + r.to(tl.int64) * tl.num_programs(0) + vblock, tl.max(keys, 0))


@triton.jit
def _greedy_accept_kernel(
    DRAFTS, VERIFY, SEQLENS, ACTIVE, ACCEPTED, NEXT, NEW_SEQLENS, n_blocks,
    stride_db, stride_dk, stride_vb, stride_vk,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKS_PAD: tl.constexpr,
    FROM_PARTIAL: tl.constexpr,
):
    """Grid (B,). Contract: DRAFTS (B, K) int64; SEQLENS (B,) int32; ACTIVE (B,) uint8 (a bool
    tensor's bytes); ACCEPTED, NEW_SEQLENS (B,) int32; NEXT (B,) int64. VERIFY: with
    FROM_PARTIAL, the partial kernel's (B * (K + 1), n_blocks) int64 keys (BLOCKS_PAD: a power
    of 2 >= n_blocks; strides unused); else (B, K + 1) int64 tokens at the given strides.
    BLOCK_K: a power of 2 >= K + 1. accepted = first i < K with DRAFTS[b, i] != target[i],
    else K; NEXT = target[accepted]; NEW_SEQLENS = SEQLENS + (accepted + 1 if ACTIVE else 0).
    """
    b = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK_K)
    if FROM_PARTIAL:
        blocks = tl.arange(0, BLOCKS_PAD)
        keys = tl.load(VERIFY + (b * (K + 1) + pos)[:, None] * n_blocks + blocks[None, :],
                       mask=(pos < K + 1)[:, None] & (blocks < n_blocks)[None, :],
                       other=-9223372036854775808)
        _, target = _unpack(tl.max(keys, 1))
    else:
        target = tl.load(VERIFY + b * stride_vb + pos * stride_vk, mask=pos < K + 1, other=0)
    drafts = tl.load(DRAFTS + b * stride_db + pos * stride_dk, mask=pos < K, other=-1)
    stop = (pos >= K) | (drafts != target)  # position K always stops: all K drafts accepted
    accepted = tl.min(tl.where(stop, pos, BLOCK_K), 0)
    next_token = tl.sum(tl.where(pos == accepted, target, 0), 0)
    active = tl.load(ACTIVE + b) != 0
    seqlen = tl.load(SEQLENS + b)
    tl.store(ACCEPTED + b, accepted.to(tl.int32))
    tl.store(NEXT + b, next_token)
    tl.store(NEW_SEQLENS + b, seqlen + tl.where(active, accepted + 1, 0).to(tl.int32))


def block_v(vocab, rows):
    """Vocabulary per partial program: 4096 logits (8 KB in bf16, 16 loads in flight per
    thread at 4 warps), fewer for a small vocabulary; 8192 once B * (k + 1) rows alone give
    plenty of programs (>= 256), to halve the merge's keys."""
    return min(8192 if rows >= 256 else 4096, triton.next_power_of_2(vocab))


def greedy_accept_triton(drafts, verify_logits, cache_seqlens, active, out=None):
    """Triton backend of ``ops.greedy_accept`` (arguments already checked there).

    out: optional (accepted int32, next_token int64, new_cache_seqlens int32) (B,) tensors to
    write. Returns (accepted, next_token, new_cache_seqlens).
    """
    B, k = drafts.shape
    if out is None:
        out = (torch.empty(B, dtype=torch.int32, device=drafts.device),
               torch.empty(B, dtype=torch.int64, device=drafts.device),
               torch.empty(B, dtype=torch.int32, device=drafts.device))
    for name, t, dtype in zip(("accepted", "next_token", "new_cache_seqlens"), out,
                              (torch.int32, torch.int64, torch.int32)):
        check(t.shape == (B,) and t.dtype == dtype and t.is_contiguous(), f"out {name}",
              f"a contiguous {dtype} tensor of shape ({B},)", f"{t.dtype} {tuple(t.shape)}")
    if B == 0:
        return out
    verify, n_blocks = verify_logits, 1
    if verify_logits.dtype != torch.int64:
        vocab = verify_logits.shape[2]
        bv = block_v(vocab, B * (k + 1))
        n_blocks = triton.cdiv(vocab, bv)
        verify = torch.empty((B * (k + 1), n_blocks), dtype=torch.int64, device=drafts.device)
        _verify_argmax_partial_kernel[(n_blocks, B * (k + 1))](
            verify_logits, verify, vocab, verify_logits.stride(0), verify_logits.stride(1),
            K1=k + 1, BLOCK_V=bv, num_warps=4 if bv <= 4096 else 8,
        )
    _greedy_accept_kernel[(B,)](
        drafts, verify, cache_seqlens, active.view(torch.uint8), *out, n_blocks,
        drafts.stride(0), drafts.stride(1), verify.stride(0), verify.stride(1),
        K=k, BLOCK_K=triton.next_power_of_2(k + 1),
        BLOCKS_PAD=triton.next_power_of_2(n_blocks), FROM_PARTIAL=verify is not verify_logits,
        num_warps=4,
    )
    return out
