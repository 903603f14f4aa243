"""Greedy acceptance of a self-speculative round: one program per row, one launch, no sync.

Semantics: ``layerskip_kernels.ops.greedy_accept``. With logits, the program takes the argmax
of each of its k + 1 positions itself (a running (max, lowest id) over BLOCK_V-wide chunks),
so the full model's tokens are never written out; with int64 tokens it reads them. The
logits path reads k + 1 rows of the vocabulary per program: with a large vocabulary and a
small batch, prefer tokens from ``ops.draft_head_argmax`` over the verify hidden states.
"""
import torch
import triton
import triton.language as tl

from ..ops._checks import check


@triton.jit
def _greedy_accept_kernel(
    DRAFTS, VERIFY, SEQLENS, ACTIVE, ACCEPTED, NEXT, NEW_SEQLENS, vocab,
    stride_db, stride_dk, stride_vb, stride_vk,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, FROM_LOGITS: tl.constexpr,
):
    """Grid (B,). Contract: DRAFTS (B, K) int64; VERIFY (B, K + 1, vocab) fp32 / fp16 / bf16
    logits, last dim contiguous, when FROM_LOGITS, else (B, K + 1) int64 tokens; SEQLENS (B,)
    int32; ACTIVE (B,) uint8 (a bool tensor's bytes); ACCEPTED, NEW_SEQLENS (B,) int32; NEXT
    (B,) int64. BLOCK_K: a power of 2 >= K + 1. target[i] = argmax VERIFY[b, i] (lowest id of
    equal maxima); accepted = first i < K with DRAFTS[b, i] != target[i], else K;
    NEXT = target[accepted]; NEW_SEQLENS = SEQLENS + (accepted + 1 if ACTIVE else 0).
    """
    b = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK_K)
    if FROM_LOGITS:
        target = tl.zeros([BLOCK_K], tl.int64)
        lanes = tl.arange(0, BLOCK_V)
        for i in range(K + 1):
            row = VERIFY + b * stride_vb + i * stride_vk
            best = tl.full([], float("-inf"), tl.float32)
            best_id = tl.zeros([], tl.int64)
            for v0 in range(0, vocab, BLOCK_V):
                ids = v0 + lanes
                x = tl.load(row + ids, mask=ids < vocab, other=float("-inf")).to(tl.float32)
                m = tl.max(x, 0)
                first = tl.min(tl.where(x == m, ids, vocab), 0).to(tl.int64)
                better = m > best  # strictly: an equal maximum in a later chunk has a higher id
                best = tl.where(better, m, best)
                best_id = tl.where(better, first, best_id)
            target = tl.where(pos == i, best_id, target)
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
    from_logits = verify_logits.dtype != torch.int64
    vocab = verify_logits.shape[2] if from_logits else 0
    _greedy_accept_kernel[(B,)](
        drafts, verify_logits, cache_seqlens, active.view(torch.uint8), *out, vocab,
        drafts.stride(0), drafts.stride(1), verify_logits.stride(0), verify_logits.stride(1),
        K=k, BLOCK_K=triton.next_power_of_2(k + 1), BLOCK_V=1024, FROM_LOGITS=from_logits,
        num_warps=4,
    )
    return out
