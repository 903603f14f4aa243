"""The fused draft head: RMSNorm + lm_head + argmax / top-k, no full-vocabulary logits.

Semantics: ``layerskip_kernels.ops.draft_head``. Three launches, none of them data dependent
on the host (no sync; CUDA-graph safe):
  1. ``_rms_norm_fwd_kernel`` (triton/rms_norm.py): z = rms_norm(h), (B, dim) in h's dtype.
  2. ``_draft_head_block_kernel``, grid (vocab blocks, row blocks): logits of BLOCK_B rows x
     BLOCK_V tokens with ``tl.dot`` (fp32 accumulation), looping over dim, kept in registers
     only. Each logit and its token id are packed into one int64 key (``_pack``) ordered as
     (logit, then lower id first), so one max reduction finds the largest logit and, among
     equal ones, the lowest id. The block's top K per row: K rounds of (max, mask it out),
     written as K candidate keys per row. Every weight tile is read once for BLOCK_B rows
     (all of a decode batch up to 64).
  3. ``_draft_head_merge_kernel``, grid (B,): the top K of the candidates, round i taking the
     largest key below round i-1's: no sort, no atomics, ties to the lowest id.
Argmax is K = 1. A row of h is its own problem: padded rows are masked and never written.
"""
import torch
import triton
import triton.language as tl

from ..ops._checks import check
from .rms_norm import rms_norm_triton

PAD_KEY = -2 ** 63  # a candidate past the vocabulary: below every packed (logit, index)


@triton.jit
def _pack(value, index):
    """(fp32 value, int32 index) -> int64 key whose order is (value ascending, index descending):
    the float's bits made order-preserving as an int32 (negatives: flip the 31 low bits; -0.0
    is made +0.0 first) in the high half, 2^31 - 1 - index in the low half. A NaN of either
    sign is made the positive one, which sorts highest (torch.argmax also picks NaN)."""
    value = tl.where(value != value, float("nan"), value + 0.0)
    bits = value.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def _unpack(key):
    """The inverse of _pack: (fp32 value, int64 index)."""
    bits = (key >> 32).to(tl.int32)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (key & 0x7FFFFFFF)


@triton.jit
def _draft_head_block_kernel(
    Z, W, PART, n_rows, vocab, dim, stride_z, stride_w,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Grid (cdiv(vocab, BLOCK_V), cdiv(n_rows, BLOCK_B)). Contract (last dims contiguous):
    Z: (n_rows, dim) and W: (vocab, dim), one dtype (fp32, fp16, bf16); PART: (n_rows,
    num_vocab_blocks, K) int64, contiguous. logits = Z @ W^T in fp32 (dot operands in the dtype;
    UPCAST_DOT widens them for the interpreter, exactly). Writes, for each row, the _pack()ed
    keys of the block's K largest logits, largest first (equal logits by index); past the
    block's valid tokens, PAD_KEY (below every real key).
    """
    vblock = tl.program_id(0)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = vblock * BLOCK_V + tl.arange(0, BLOCK_V)  # int32: vocab < 2^31
    row_ok = rows < n_rows
    col_ok = cols < vocab
    acc = tl.zeros([BLOCK_B, BLOCK_V], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        w = tl.load(W + cols.to(tl.int64)[:, None] * stride_w + d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST_DOT:
            z, w = z.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(z, tl.trans(w), acc, input_precision=DOT_PRECISION)
    pad = tl.full([BLOCK_B, BLOCK_V], -9223372036854775808, tl.int64)
    keys = tl.where(col_ok[None, :], _pack(acc, cols[None, :]), pad)
    part = (rows * tl.num_programs(0) + vblock) * K
    for i in range(K):
        best = tl.max(keys, 1)
        tl.store(PART + part + i, best, mask=row_ok)
        keys = tl.where(keys == best[:, None], pad, keys)


@triton.jit
def _draft_head_merge_kernel(
    PART, VALUES, INDICES, n_cand,
    K: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """Grid (n_rows,). PART: (n_rows, n_cand) int64 keys from the block kernel (distinct but for
    PAD_KEY); VALUES fp32 and INDICES int64: (n_rows, K), contiguous: the K largest keys,
    unpacked, largest first. Round i takes the largest key below round i-1's. K_PAD: a power
    of 2 >= K.
    """
    row = tl.program_id(0).to(tl.int64)
    base = PART + row * n_cand
    slots = tl.arange(0, K_PAD)
    top = tl.full([K_PAD], -9223372036854775808, tl.int64)
    prev = tl.full([], 9223372036854775807, tl.int64)
    for i in range(K):
        best = tl.full([], -9223372036854775808, tl.int64)
        for c0 in range(0, n_cand, CHUNK):
            c = c0 + tl.arange(0, CHUNK)
            key = tl.load(base + c, mask=c < n_cand, other=-9223372036854775808)
            best = tl.maximum(best, tl.max(tl.where(key < prev, key, -9223372036854775808), 0))
        top = tl.where(slots == i, best, top)
        prev = best
    value, index = _unpack(top)
    tl.store(VALUES + row * K + slots, value, mask=slots < K)
    tl.store(INDICES + row * K + slots, index, mask=slots < K)


def launch_config(n_rows, k):
    """Argmax and small k: 128-token blocks, up to 64 rows per tile (the weights read once for a
    decode batch). Larger k: 512-token blocks, so that the merge sees <= 1/8 of the vocabulary.
    Tiles hold 8192 logits and 8192 weights (BLOCK_D >= 16 for tl.dot)."""
    block_v = 128 if k <= 16 else 512
    block_b = min(max(16, triton.next_power_of_2(n_rows)), 8192 // block_v)
    return dict(BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=8192 // block_v,
                num_warps=4 if block_v == 128 else 8)


MERGE_CHUNK = 1024


def draft_head_topk_triton(h, norm_weight, eps, lm_head_weight, k, out=None):
    """Triton backend of ``ops.draft_head_topk`` (arguments already checked there).

    out: optional (values (..., k) float32, indices (..., k) int64) contiguous tensors to write.
    Returns (values, indices).
    """
    dim, vocab = h.shape[-1], lm_head_weight.shape[0]
    lead = h.shape[:-1]
    if out is None:
        out = (torch.empty((*lead, k), dtype=torch.float32, device=h.device),
               torch.empty((*lead, k), dtype=torch.int64, device=h.device))
    values, indices = out
    for name, t, dtype in (("values", values, torch.float32), ("indices", indices, torch.int64)):
        check(t.shape == (*lead, k) and t.dtype == dtype and t.is_contiguous(), f"out {name}",
              f"a contiguous {dtype} tensor of shape {(*lead, k)}",
              f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
    n_rows = values.numel() // k
    if n_rows == 0:
        return values, indices
    z = rms_norm_triton(h.reshape(-1, dim), norm_weight, eps)  # (n_rows, dim), contiguous
    config = launch_config(n_rows, k)
    vblocks = triton.cdiv(vocab, config["BLOCK_V"])
    part = torch.empty((n_rows, vblocks, k), dtype=torch.int64, device=h.device)
    _draft_head_block_kernel[(vblocks, triton.cdiv(n_rows, config["BLOCK_B"]))](
        z, lm_head_weight, part, n_rows, vocab, dim, z.stride(0),
        lm_head_weight.stride(0), K=k,
        DOT_PRECISION="ieee" if h.dtype == torch.float32 else "tf32",
        UPCAST_DOT=h.device.type == "cpu", **config,
    )
    _draft_head_merge_kernel[(n_rows,)](
        part, values, indices, vblocks * k, K=k, K_PAD=triton.next_power_of_2(k),
        CHUNK=min(MERGE_CHUNK, triton.next_power_of_2(vblocks * k)), num_warps=4,
    )
    return values, indices


def draft_head_argmax_triton(h, norm_weight, eps, lm_head_weight, out=None):
    """Triton backend of ``ops.draft_head_argmax``: top-k with k = 1.

    out: optional (tokens (...,) int64, max_logit (...,) float32) contiguous tensors.
    Returns (tokens, max_logit).
    """
    if out is not None:
        tokens, max_logit = out
        draft_head_topk_triton(h, norm_weight, eps, lm_head_weight, 1,
                               out=(max_logit[..., None], tokens[..., None]))
        return tokens, max_logit
    values, indices = draft_head_topk_triton(h, norm_weight, eps, lm_head_weight, 1)
    return indices[..., 0], values[..., 0]
