"""silu(gate) * up on a fused [gate | up] projection: one program per (row, block of columns).

Semantics: ``layerskip_kernels.ops.silu_mul``. The launcher flattens the leading dims to rows
(a view when the strides allow it) and returns a new contiguous (..., hidden) tensor.
"""
import torch
import triton
import triton.language as tl

from ..ops._checks import check

MAX_BLOCK = 1024  # columns a program: 8 a thread with 4 warps (one 16-byte load of bf16 each)


@triton.jit
def _silu_mul_kernel(GATE_UP, OUT, hidden, stride_in, stride_out, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(hidden, BLOCK)). Contract: GATE_UP: (rows, 2 * hidden), last dim
    contiguous, row stride stride_in (elements); OUT: (rows, hidden), row stride stride_out; one
    dtype (fp32, fp16, bf16). OUT[r, c] = silu(g) * u rounded once, g = GATE_UP[r, c] and
    u = GATE_UP[r, hidden + c] in fp32, silu(g) = g * sigmoid(g) with the sigmoid as
    1 / (1 + e) for g >= 0 and e / (1 + e) below, e = exp(-|g|).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    src = GATE_UP + row * stride_in + cols
    gate = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(src + hidden, mask=ok, other=0.0).to(tl.float32)
    e = tl.exp(-tl.abs(gate))  # in (0, 1]: no overflow to inf for large negative gates
    y = gate * tl.where(gate >= 0, 1.0, e) / (1.0 + e) * up
    tl.store(OUT + row * stride_out + cols, y.to(OUT.dtype.element_ty), mask=ok)


def launch_config(hidden):
    """Blocks of up to MAX_BLOCK columns; fewer warps for narrow rows (8 columns a thread)."""
    block = min(MAX_BLOCK, triton.next_power_of_2(hidden))
    return dict(BLOCK=block, num_warps=max(1, min(4, block // 256)))


def silu_mul_triton(gate_up, out=None):
    """Triton backend of ``ops.silu_mul`` (argument already checked there). out: an optional
    contiguous (..., hidden) tensor of gate_up's dtype to write into. Returns out."""
    hidden = gate_up.shape[-1] // 2
    shape = (*gate_up.shape[:-1], hidden)
    if out is None:
        out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    check(out.shape == shape and out.dtype == gate_up.dtype and out.is_contiguous(), "out",
          f"a contiguous {gate_up.dtype} tensor of shape {shape}",
          f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    rows = gate_up.reshape(-1, 2 * hidden)  # a view when the leading dims allow it, else a copy
    if rows.shape[0] == 0:
        return out
    config = launch_config(hidden)
    grid = (rows.shape[0], triton.cdiv(hidden, config["BLOCK"]))
    _silu_mul_kernel[grid](rows, out, hidden, rows.stride(0), hidden, **config)
    return out
