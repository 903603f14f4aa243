"""RMSNorm with an optional fused residual add: one program per row, the row in registers.

Semantics: ``layerskip_kernels.ops.rms_norm``. The launcher flattens x to (rows, dim) and
restores its shape; the layout follows Liger-Kernel's rms_norm forward:
https://github.com/linkedin/Liger-Kernel/blob/main/src/liger_kernel/ops/rms_norm.py
"""
import torch
import triton
import triton.language as tl

from ..ops._checks import check
from ..ops.rms_norm import MAX_KERNEL_DIM


@triton.jit
def _rms_norm_fwd_kernel(
    X, RESIDUAL, W, Y, H_OUT, n_cols, eps,
    stride_x, stride_r, stride_y, stride_h,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """Grid (rows,). Contract (last dims contiguous, row strides in elements):
    X, RESIDUAL, Y, H_OUT: (rows, n_cols), one dtype (fp32, fp16, bf16); W: (n_cols,), any float.
    h = X (+ RESIDUAL, rounded to the dtype and stored to H_OUT when HAS_RESIDUAL);
    Y = W * h * rsqrt(mean(h^2) + eps), in fp32, rounded once. BLOCK >= n_cols, a power of 2.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = h + tl.load(RESIDUAL + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = h.to(H_OUT.dtype.element_ty)  # the stream is kept in its dtype: normalise that
        tl.store(H_OUT + row * stride_h + cols, h, mask=mask)
        h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)


def launch_config(dim):
    """The whole row in one block; warps grow with it so each thread holds <= 64 elements."""
    check(dim <= MAX_KERNEL_DIM, "x", f"a last dim of at most {MAX_KERNEL_DIM} for the Triton "
          "kernel (one row per program)", dim)
    block = triton.next_power_of_2(dim)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return dict(BLOCK=block, num_warps=num_warps)


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
    config = launch_config(dim)
    y = _out(out, x, "out")
    h = _out(residual_out, x, "residual_out") if residual is not None else None
    x2 = _rows(x, dim)
    r2 = _rows(residual, dim) if residual is not None else x2  # never read without HAS_RESIDUAL
    y2, h2 = y.view(-1, dim), (h if h is not None else y).view(-1, dim)
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    if x2.shape[0] > 0:
        _rms_norm_fwd_kernel[(x2.shape[0],)](
            x2, r2, weight, y2, h2, dim, float(eps),
            x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
            HAS_RESIDUAL=residual is not None, **config,
        )
    return y if residual is None else (y, h)
