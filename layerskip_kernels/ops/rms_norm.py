"""RMSNorm, optionally fused with the residual add before it (pre-norm Llama block).

    h = x + residual            (in x's dtype, rounded as PyTorch's add; h = x without residual)
    y = weight * h / sqrt(mean(h^2) + eps)     (float32 throughout, rounded once to x's dtype)

The weight may have another of the three dtypes than x (say fp32 norms in an fp16 model): both
backends read it as its float32 value, and y keeps x's dtype.

Hugging Face's LlamaRMSNorm rounds h / rms(h) to the input dtype before multiplying by the
weight (two roundings):
https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py
In float32 the two agree bit for bit; in fp16 / bf16 this op is the more accurate one (one
ulp). model/llama.py's RMSNorm runs this op (it is the forward's `norm`), so it rounds once.

Routing (backend "auto" on a GPU): the Triton kernel is one launch that reads x (and the
residual) once; the reference is a chain of elementwise PyTorch kernels (add, cast, square,
mean, rsqrt, two multiplies, cast), each a pass over the rows. So no shape goes to "torch" for
speed; the ROUTING table holds only the kernel's limit. bench/routing.py checks this by kernel
time on every benchmarked shape.
"""
import torch

from ._checks import as_float, check
from .backend import Impl, Op

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_DIM = 65536  # whole rows per program, held in registers

# Where "auto" leaves the Triton kernel for "torch": (argument, the kernel's range, why,
# evidence); evaluated by _kernel_limits, printed by bench/routing.py.
ROUTING = (
    ("x", f"a last dim of at most {MAX_KERNEL_DIM}",
     "the kernel holds whole rows in registers", "a limit of the kernel"),
)


def _check_rms_norm(x, weight, eps, residual):
    check(x.dtype in SUPPORTED_DTYPES, "x", "float32, float16 or bfloat16", x.dtype)
    check(x.dim() >= 1 and x.shape[-1] > 0, "x", "shape (..., dim) with dim >= 1", tuple(x.shape))
    check(x.stride(-1) == 1, "x", "a contiguous last dim (stride 1)", x.stride(-1))
    dim = x.shape[-1]
    check(weight.shape == (dim,), "weight", f"shape ({dim},)", tuple(weight.shape))
    check(weight.dtype in SUPPORTED_DTYPES, "weight", "float32, float16 or bfloat16", weight.dtype)
    check(weight.device == x.device, "weight", f"device {x.device} (as x)", weight.device)
    as_float("eps", eps, "a finite number >= 0", lambda e: e >= 0)
    if residual is not None:
        check(residual.shape == x.shape, "residual", f"shape {tuple(x.shape)} (as x)",
              tuple(residual.shape))
        check(residual.dtype == x.dtype, "residual", f"dtype {x.dtype} (as x)", residual.dtype)
        check(residual.stride(-1) == 1, "residual", "a contiguous last dim (stride 1)",
              residual.stride(-1))
        check(residual.device == x.device, "residual", f"device {x.device} (as x)",
              residual.device)


def rms_norm_reference(x, weight, eps, residual=None):
    """Plain PyTorch: the CPU path and the oracle the kernel is tested against."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, x)


def _launch_triton(*args, **kwargs):
    from ..triton.rms_norm import rms_norm_triton
    return rms_norm_triton(*args, **kwargs)


def _kernel_limits(x, *_):
    """None when the Triton kernel takes the call, else the ROUTING rule it breaks."""
    if x.shape[-1] > MAX_KERNEL_DIM:
        return "x", ROUTING[0][1], x.shape[-1]
    return None


RMS_NORM = Op("rms_norm", {"triton": Impl(_launch_triton, _kernel_limits),
                           "torch": Impl(rms_norm_reference)})


def rms_norm(x, weight, eps, residual=None, backend="auto"):
    """RMSNorm of x (..., dim) with weight (dim,), or of h = x + residual when given.

    Returns y (..., dim) in x's dtype, whatever weight's (float32, float16 or bfloat16); with a
    residual, (y, h) where h = x + residual is the new residual stream (a new tensor; x and
    residual are not modified).
    """
    _check_rms_norm(x, weight, eps, residual)
    return RMS_NORM(backend, x.device, (x, weight, eps, residual))
