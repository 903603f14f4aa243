"""The fused draft head: RMSNorm + lm_head + argmax / top-k, no full-vocabulary logits.

Semantics: ``layerskip_kernels.ops.draft_head``. The lm_head read (vocab x dim weights) is
the whole cost at decode batch sizes, so the kernel is a memory-bound GEMV whose job is to
stream W once, from every SM, at HBM bandwidth. Two stages, no host sync, CUDA-graph safe
(every grid and buffer depends on shapes only):

1. ``_draft_head_partial_kernel``, grid (vocab blocks, row blocks). The vocabulary is cut into
   BLOCK_V-token blocks, enough of them to give every SM several programs (``launch_config``).
   A program streams its [BLOCK_V, dim] slice of W once for BLOCK_B rows of h. The norm is
   folded in, so there is no separate norm launch and no z buffer:
       logits[b, v] = rstd[b] * sum_d W[v, d] * round(h[b, d] * norm_weight[d])
   with rstd[b] = 1 / sqrt(mean_d h[b, d]^2 + eps), the sum of squares accumulated in the same
   pass over dim (rstd is one scalar per row, so it factors out of the dot). Accumulation is
   fp32 throughout; round() is to h's dtype, as the model's norm hands lm_head its input (in
   fp16 this asks |h * norm_weight| < 65504, where the reference asks it of the normed h).
   Two variants (constexpr USE_DOT):
   - FMA (BLOCK_B = 1 or 2, the common decode batch): no tensor cores. Each thread keeps an
     fp32 accumulator per (row, its W elements) and adds w * z elementwise; the reduction over
     dim happens once, after the loop. One W element costs a convert and BLOCK_B FMAs, far
     below what the SM issues while the load stream runs at HBM speed, and no row is wasted.
   - dot (BLOCK_B = 16..64): ``tl.dot`` of W [BLOCK_V, BLOCK_D] (vocab as the M side, so
     Hopper can use wgmma) with z^T [BLOCK_D, BLOCK_B]. tl.dot needs >= 16 columns, so 3..16
     rows are padded to 16: the padded FLOPs are free (the tensor cores idle at this
     arithmetic intensity) and W is still read once for all rows.
   Each logit and its token id are packed into one int64 key (``_pack``) ordered by (logit,
   then lower id first); the block's best key (argmax) or its top K_PAD keys (``_top_keys``:
   tl.topk's bitonic network in registers on a GPU above 8 keys, else rounds of max) go to
   PART. Padded rows are never written; tokens past the vocabulary are PAD_KEY.
2. ``_draft_head_merge_kernel``, grid (groups, rows): the top K_PAD of GROUP candidate lists,
   in one ``tl.max`` (argmax) or ``_top_keys``. Levels repeat on the host until one list is
   left (one level for argmax; two for top-64 over a 128K vocabulary); the last unpacks into
   (values, indices). No sort of the vocabulary, no atomics, ties to the lowest id.

Loop bounds are constexprs (DIM): Triton 3.6's interpreter cannot iterate over a runtime
scalar.
"""
import functools

import torch
import triton
import triton.language as tl

from ..ops._checks import check

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
def _top_keys(keys, K_PAD: tl.constexpr, SORT_NETWORK: tl.constexpr):
    """The K_PAD largest of each row of keys [R, N] (distinct but for PAD_KEY), descending:
    [R, K_PAD]. SORT_NETWORK: ``tl.topk`` (a bitonic network: log-depth, for large K_PAD on a
    GPU); else K_PAD rounds of (row max, mask it out), cheaper for a few keys, and what the
    interpreter runs (it executes tl.topk's xor reductions element by element). Both give the
    same keys: they are distinct."""
    if SORT_NETWORK:
        return tl.topk(keys, K_PAD)
    else:
        slots = tl.arange(0, K_PAD)
        top = tl.full([keys.shape[0], K_PAD], -9223372036854775808, tl.int64)
        for i in tl.static_range(K_PAD):
            best = tl.max(keys, 1)
            top = tl.where(slots[None, :] == i, best[:, None], top)
            keys = tl.where(keys == best[:, None], -9223372036854775808, keys)
        return top


@triton.jit
def _draft_head_partial_kernel(
    H, NW, W, PART, n_rows, vocab, eps, stride_h, stride_w,
    DIM: tl.constexpr, K_PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, NUM_STAGES: tl.constexpr, SORT_NETWORK: tl.constexpr,
):
    """Grid (cdiv(vocab, BLOCK_V), cdiv(n_rows, BLOCK_B)). Contract (last dims contiguous):
    H: (n_rows, DIM) and W: (vocab, DIM), one dtype (fp32, fp16, bf16); NW: (DIM,) contiguous,
    any float; PART: (n_rows, num_vocab_blocks, K_PAD) int64, contiguous. Writes, for each row,
    the _pack()ed keys of the block's K_PAD largest logits (see the module docstring), largest
    first; past the vocabulary, PAD_KEY. USE_DOT: tl.dot (BLOCK_B >= 16) or elementwise FMAs.
    UPCAST_DOT widens the dot operands to fp32 (the interpreter; exact). K_PAD <= BLOCK_V.
    """
    vblock = tl.program_id(0)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    cols = vblock * BLOCK_V + tl.arange(0, BLOCK_V)  # int32: vocab < 2^31
    col_ok = cols < vocab
    # Clamped, not masked: the hot loads stay unpredicated; the duplicates are dropped below.
    w_rows = W + tl.minimum(cols, vocab - 1).to(tl.int64)[:, None] * stride_w  # [BLOCK_V, 1]
    h_rows = H + tl.minimum(rows, n_rows - 1) * stride_h  # [BLOCK_B]
    # Squares and products accumulate elementwise; the reductions over dim run once, after
    # the loop (a reduction per step would put a barrier in every iteration).
    if USE_DOT:
        ss = tl.zeros([BLOCK_D, BLOCK_B], tl.float32)
        acc = tl.zeros([BLOCK_V, BLOCK_B], tl.float32)
    else:
        ss = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        acc = tl.zeros([BLOCK_B, BLOCK_V, BLOCK_D], tl.float32)
    for d0 in tl.range(0, DIM, BLOCK_D, num_stages=NUM_STAGES):
        d = d0 + tl.arange(0, BLOCK_D)
        if DIM % BLOCK_D == 0:
            w = tl.load(w_rows + d[None, :], eviction_policy="evict_first")
            nw = tl.load(NW + d).to(tl.float32)
        else:
            w = tl.load(w_rows + d[None, :], mask=(d < DIM)[None, :], other=0.0)
            nw = tl.load(NW + d, mask=d < DIM, other=0.0).to(tl.float32)
        if USE_DOT:  # z^T: [BLOCK_D, BLOCK_B]
            if DIM % BLOCK_D == 0:
                h = tl.load(h_rows[None, :] + d[:, None]).to(tl.float32)
            else:
                h = tl.load(h_rows[None, :] + d[:, None], mask=(d < DIM)[:, None],
                            other=0.0).to(tl.float32)
            ss += h * h
            z = (h * nw[:, None]).to(W.dtype.element_ty)
            if UPCAST_DOT:
                acc = tl.dot(w.to(tl.float32), z.to(tl.float32), acc,
                             input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(w, z, acc, input_precision=DOT_PRECISION)
        else:  # z: [BLOCK_B, BLOCK_D]
            if DIM % BLOCK_D == 0:
                h = tl.load(h_rows[:, None] + d[None, :]).to(tl.float32)
            else:
                h = tl.load(h_rows[:, None] + d[None, :], mask=(d < DIM)[None, :],
                            other=0.0).to(tl.float32)
            ss += h * h
            z = (h * nw[None, :]).to(W.dtype.element_ty).to(tl.float32)
            acc += w.to(tl.float32)[None, :, :] * z[:, None, :]
    if USE_DOT:
        rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / DIM + eps)
        logits = tl.trans(acc) * rstd[:, None]  # [BLOCK_B, BLOCK_V]
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(ss, 1) / DIM + eps)
        logits = tl.sum(acc, 2) * rstd[:, None]
    pad = tl.full([BLOCK_B, BLOCK_V], -9223372036854775808, tl.int64)
    keys = tl.where(col_ok[None, :], _pack(logits, cols[None, :]), pad)
    part = PART + (rows * tl.num_programs(0) + vblock) * K_PAD  # [BLOCK_B]
    if K_PAD == 1:
        tl.store(part, tl.max(keys, 1), mask=row_ok)
    else:
        slots = tl.arange(0, K_PAD)
        tl.store(part[:, None] + slots[None, :], _top_keys(keys, K_PAD, SORT_NETWORK),
                 mask=row_ok[:, None])


@triton.jit
def _draft_head_merge_kernel(
    PART, OUT, VALUES, INDICES, n_lists,
    K: tl.constexpr, K_PAD: tl.constexpr, GROUP: tl.constexpr, FINAL: tl.constexpr,
    SORT_NETWORK: tl.constexpr,
):
    """Grid (cdiv(n_lists, GROUP), n_rows). PART: (n_rows, n_lists, K_PAD) int64 keys, each
    list descending (from the partial kernel or a previous level). Program (g, row) takes the
    top K_PAD keys of lists [g * GROUP, (g + 1) * GROUP): with FINAL it unpacks the first K into
    VALUES fp32 and INDICES int64, (n_rows, K) contiguous; else it writes them to OUT, (n_rows,
    num_groups, K_PAD) int64, the next level's PART. GROUP, K_PAD: powers of 2.
    """
    group = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    lists = group * GROUP + tl.arange(0, GROUP)
    slots = tl.arange(0, K_PAD)
    keys = tl.load(PART + (row * n_lists + lists)[:, None] * K_PAD + slots[None, :],
                   mask=(lists < n_lists)[:, None], other=-9223372036854775808)
    if K_PAD == 1:
        top = tl.max(keys, 0)  # [1]
    else:
        top = tl.reshape(_top_keys(tl.reshape(keys, [1, GROUP * K_PAD]), K_PAD, SORT_NETWORK),
                         [K_PAD])
    if FINAL:
        value, index = _unpack(top)
        tl.store(VALUES + row * K + slots, value, mask=slots < K)
        tl.store(INDICES + row * K + slots, index, mask=slots < K)
    else:
        tl.store(OUT + (row * tl.num_programs(0) + group) * K_PAD + slots, top)


MAX_DOT_ROWS = 64  # rows per program of the dot variant: W is read once per 64 rows
FMA_MAX_ROWS = 2  # the FMA variant up to this many rows, the dot variant above
MERGE_KEYS = {1: 4096}  # keys a merge program reduces: argmax; top-k takes 2048
DEFAULT_SMS = 132  # an H100 SXM, for the interpreter (CPU tensors)
ROUNDS_MAX_K = 8  # top-k by rounds of max up to this K_PAD on a GPU, by tl.topk above


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device):
    """Streaming multiprocessors of the tensors' GPU (DEFAULT_SMS on the CPU)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def launch_config(n_rows, vocab, dim, k, element_size=2, n_sm=DEFAULT_SMS, variant=None,
                  block_v=None, num_stages=None):
    """Tiles of the partial kernel for one call shape; variant, block_v and num_stages override
    the choice (the benchmark's tuning grid compares them).

    A program streams BLOCK_V weight rows for its whole life, and at decode batch sizes a
    program's lifetime is a large part of the kernel's: the tail (programs still running when
    the others are done) is short only with many waves of small programs, each with several
    loads in flight. So the vocabulary is cut into >= 8 blocks per SM where it can be:
    - FMA (<= FMA_MAX_ROWS rows): BLOCK_V in 64 / 32 / 16, the largest that still gives
      8 blocks per SM (128K vocab: 64; 32K: 16), and BLOCK_D = 4096 // BLOCK_V: 4096 weights
      per tile, 32 fp32 accumulators per thread and row at 4 warps; 4 stages (3 tiles, 24 KB,
      in flight).
    - dot (more rows, padded to 16..64): BLOCK_V 128 where that gives >= 4 blocks per SM, else
      64 (Hopper's wgmma takes M = 64 per warp group); BLOCK_D spans 256 bytes of a weight row.
      In fp32 the dot is exact FMAs on registers (no tensor cores): BLOCK_D 32 (16 past 16
      rows) and 8 warps, so that it does not spill.
    K_PAD (a power of 2 >= k) <= BLOCK_V.
    """
    k_pad = triton.next_power_of_2(k)
    dim_pad = max(16, triton.next_power_of_2(dim))  # small dims (tests): no idle lanes
    if variant is None:
        variant = "fma" if n_rows <= FMA_MAX_ROWS else "dot"
    check(variant in ("fma", "dot"), "variant", "None, 'fma' or 'dot'", repr(variant))
    if variant == "fma":
        if block_v is None:
            block_v = next((v for v in (64, 32) if triton.cdiv(vocab, v) >= 8 * n_sm), 16)
        block_v = max(block_v, k_pad)
        return dict(USE_DOT=False, BLOCK_B=triton.next_power_of_2(min(n_rows, FMA_MAX_ROWS)),
                    BLOCK_V=block_v, BLOCK_D=min(4096 // block_v, 512 // element_size, dim_pad),
                    K_PAD=k_pad, num_warps=4, NUM_STAGES=num_stages or 4)
    block_b = min(max(16, triton.next_power_of_2(n_rows)), MAX_DOT_ROWS)
    if block_v is None:
        block_v = 128 if triton.cdiv(vocab, 128) >= 4 * n_sm and element_size == 2 else 64
    block_v = max(block_v, k_pad)
    num_warps = 8 if block_v * block_b >= 8192 else 4
    block_d = min(256 // element_size, dim_pad)
    if element_size == 4:  # an fp32 ("ieee") dot is FMAs on registers: thinner K, 8 warps
        block_d, num_warps = min(32 if block_b <= 16 else 16, dim_pad), 8
    stages = num_stages or (3 if block_v * block_d * element_size >= 32768 else 4)
    return dict(USE_DOT=True, BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d, K_PAD=k_pad,
                num_warps=num_warps, NUM_STAGES=stages)


def merge_group(k_pad, n_lists, merge_keys=None):
    """Lists one merge program takes: MERGE_KEYS keys (or merge_keys), fewer when fewer lists
    are left."""
    group = max(2, (merge_keys or MERGE_KEYS.get(k_pad, 2048)) // k_pad)  # 2: levels shrink
    return min(group, triton.next_power_of_2(n_lists))


def draft_head_topk_triton(h, norm_weight, eps, lm_head_weight, k, out=None, variant=None,
                           sort_network=None, **tuning):
    """Triton backend of ``ops.draft_head_topk`` (arguments already checked there).

    out: optional (values (..., k) float32, indices (..., k) int64) contiguous tensors to write.
    variant, tuning (block_v, num_stages): see ``launch_config``; merge_keys: ``merge_group``
    (None picks by shape).
    sort_network: see ``_top_keys`` (None: on a GPU for k > ROUNDS_MAX_K; never in the
    interpreter). Returns (values, indices).
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
    h2 = h.reshape(n_rows, dim)
    h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
    norm_weight = norm_weight if norm_weight.stride(0) == 1 else norm_weight.contiguous()
    merge_keys = tuning.pop("merge_keys", None)
    config = launch_config(n_rows, vocab, dim, k, h.element_size(), sm_count(h.device), variant,
                           **tuning)
    k_pad, stages = config.pop("K_PAD"), config.pop("NUM_STAGES")
    if sort_network is None:
        sort_network = h.device.type == "cuda" and k_pad > ROUNDS_MAX_K
    n_lists = triton.cdiv(vocab, config["BLOCK_V"])
    part = torch.empty((n_rows, n_lists, k_pad), dtype=torch.int64, device=h.device)
    _draft_head_partial_kernel[(n_lists, triton.cdiv(n_rows, config["BLOCK_B"]))](
        h2, norm_weight, lm_head_weight, part, n_rows, vocab, float(eps), h2.stride(0),
        lm_head_weight.stride(0), DIM=dim, K_PAD=k_pad, NUM_STAGES=stages,
        DOT_PRECISION="ieee" if h.dtype == torch.float32 else "tf32",
        UPCAST_DOT=h.device.type == "cpu", SORT_NETWORK=sort_network, **config,
    )
    while True:  # merge levels: shapes only, so the launches are the same every call
        group = merge_group(k_pad, n_lists, merge_keys)
        n_groups = triton.cdiv(n_lists, group)
        final = n_groups == 1
        nxt = part if final else torch.empty((n_rows, n_groups, k_pad), dtype=torch.int64,
                                             device=h.device)
        _draft_head_merge_kernel[(n_groups, n_rows)](
            part, nxt, values, indices, n_lists, K=k, K_PAD=k_pad, GROUP=group, FINAL=final,
            SORT_NETWORK=sort_network, num_warps=4)
        if final:
            return values, indices
        part, n_lists = nxt, n_groups


def draft_head_argmax_triton(h, norm_weight, eps, lm_head_weight, out=None, **options):
    """Triton backend of ``ops.draft_head_argmax``: top-k with k = 1.

    out: optional (tokens (...,) int64, max_logit (...,) float32) contiguous tensors; options:
    as ``draft_head_topk_triton``. Returns (tokens, max_logit).
    """
    if out is not None:
        tokens, max_logit = out
        draft_head_topk_triton(h, norm_weight, eps, lm_head_weight, 1,
                               out=(max_logit[..., None], tokens[..., None]), **options)
        return tokens, max_logit
    values, indices = draft_head_topk_triton(h, norm_weight, eps, lm_head_weight, 1, **options)
    return indices[..., 0], values[..., 0]
