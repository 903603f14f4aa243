"""RMSNorm with an optional fused residual add: BLOCK_R whole rows per program, in registers.

Semantics: ``layerskip_kernels.ops.rms_norm``. The launcher flattens x to (rows, dim) and
restores its shape; the layout follows Liger-Kernel's rms_norm forward:
https://github.com/linkedin/Liger-Kernel/blob/main/src/liger_kernel/ops/rms_norm.py
with several rows per program when a row is short (a [BLOCK_R, BLOCK] tile of >= 2048
elements, so a program still moves a few KB and issues 16-byte loads), and one program per row
from 2048 elements up. A decode step's single row is one launch of one program.
"""
import torch
import triton
import triton.language as tl

from ..ops._checks import check
from ..ops.rms_norm import MAX_KERNEL_DIM


@triton.jit
def _rms_norm_fwd_kernel(
    X, RESIDUAL, W, Y, H_OUT, n_rows, n_cols, eps,
    stride_x, stride_r, stride_y, stride_h,
    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """Grid (cdiv(n_rows, BLOCK_R),). Contract (last dims contiguous, row strides in elements):
    X, RESIDUAL, Y, H_OUT: (n_rows, n_cols), one dtype (fp32, fp16, bf16); W: (n_cols,), any
    float. h = X (+ RESIDUAL, rounded to the dtype and stored to H_OUT when HAS_RESIDUAL);
    Y = W * h * rsqrt(mean(h^2) + eps), in fp32, rounded once. BLOCK >= n_cols and BLOCK_R:
    powers of 2.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    h = h.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RESIDUAL + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        h = (h + r.to(tl.float32)).to(H_OUT.dtype.element_ty)  # the stream keeps its dtype
        tl.store(H_OUT + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = h * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


MIN_TILE = 2048  # elements a program handles at least, rows permitting


def launch_config(dim, rows=1):
    """BLOCK: the row padded to a power of 2; BLOCK_R rows per program so a tile holds
    MIN_TILE elements when rows are short (1 from 2048 elements up, and never more rows than
    there are); warps grow with the tile so each thread holds 8 to 64 elements."""
    check(dim <= MAX_KERNEL_DIM, "x", f"a last dim of at most {MAX_KERNEL_DIM} for the Triton "
          "kernel (whole rows in registers)", dim)
    block = triton.next_power_of_2(dim)
    block_r = max(1, min(MIN_TILE // block, triton.next_power_of_2(max(rows, 1))))
    tile = block * block_r
    num_warps = 4 if tile < 2048 else 8 if tile < 8192 else 16 if tile < 32768 else 32
    return dict(BLOCK_R=block_r, BLOCK=block, num_warps=num_warps)


def _rows(t, dim):
    rows = t.reshape(-1, dim)  # a view when the leading dims allow it, else a copy
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _out(out, x, name):
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    check(out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), name,
          f"a contiguous {x.dtype} tensor of shape {tuple(x.shape)}",
          f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    return out


def rms_norm_triton(x, weight, eps, residual=None, out=None, residual_out=None):
    """Triton backend of ``ops.rms_norm`` (arguments already checked there).

    out, residual_out: optional contiguous tensors shaped as x to write y and h into.
    Returns y, or (y, h) with a residual.
    """
    dim = x.shape[-1]
    y = _out(out, x, "out")
    h = _out(residual_out, x, "residual_out") if residual is not None else None
    x2 = _rows(x, dim)
    r2 = _rows(residual, dim) if residual is not None else x2  # never read without HAS_RESIDUAL
    y2, h2 = y.view(-1, dim), (h if h is not None else y).view(-1, dim)
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    n_rows = x2.shape[0]
    if n_rows > 0:
        config = launch_config(dim, n_rows)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, config["BLOCK_R"]),)](
            x2, r2, weight, y2, h2, n_rows, dim, float(eps),
            x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
            HAS_RESIDUAL=residual is not None, **config,
        )
    return y if residual is None else (y, h)
