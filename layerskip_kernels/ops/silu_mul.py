"""silu_mul: the gated activation of Llama's MLP on one fused gate/up projection.

    gate_up = x @ [w1 | w3]^T           (..., 2 * hidden): [gate | up] along the last dim
    y = silu(gate) * up                  (..., hidden), silu(g) = g * sigmoid(g)

computed in float32 and rounded once to gate_up's dtype. gpt-fast fuses w1 and w3 the same way
(one GEMM for gate and up) and splits the result in two:
https://github.com/pytorch-labs/gpt-fast/blob/main/model.py
model/llama.py's MLP runs this op (the forward's `silu_mul`). Hugging Face's LlamaMLP, and the
fused layer's reference (ops/llama_layer.py), compute ``F.silu(gate) * up`` in the model dtype:
in float32 that is this op bit for bit; in fp16 / bf16 it rounds twice (after silu, after the
product), so it can differ from this op by one ulp, and this op is the more accurate of the two.
"""
import torch
import torch.nn.functional as F

from ._checks import check
from .backend import Impl, Op

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_silu_mul(gate_up):
    check(gate_up.dtype in SUPPORTED_DTYPES, "gate_up", "float32, float16 or bfloat16",
          gate_up.dtype)
    check(gate_up.dim() >= 1 and gate_up.shape[-1] > 0 and gate_up.shape[-1] % 2 == 0,
          "gate_up", "shape (..., 2 * hidden) with hidden >= 1", tuple(gate_up.shape))
    check(gate_up.stride(-1) == 1, "gate_up", "a contiguous last dim (stride 1)",
          gate_up.stride(-1))


def silu_mul_reference(gate_up):
    """Plain PyTorch: the CPU path and the oracle the kernel is tested against."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def _launch_triton(*args, **kwargs):
    from ..triton.silu_mul import silu_mul_triton
    return silu_mul_triton(*args, **kwargs)


SILU_MUL = Op("silu_mul", {"triton": Impl(_launch_triton),
                           "torch": Impl(silu_mul_reference)})


def silu_mul(gate_up, backend="auto"):
    """silu(gate) * up for gate_up (..., 2 * hidden) = [gate | up]; returns (..., hidden) in
    gate_up's dtype (float32 math, one rounding). Rows may be strided; the last dim must be
    contiguous."""
    _check_silu_mul(gate_up)
    return SILU_MUL(backend, gate_up.device, (gate_up,))
