"""The ops as torch.library custom ops (namespace `layerskip`), so that torch.compile and
torch.library.opcheck see each kernel as one call with a schema: which arguments it writes in
place (the KV cache) and a fake implementation giving the outputs' shapes and dtypes.

Each takes the backend name last and runs that backend's launcher; `custom_op(op, backend)`
gives a callable with the launcher's own signature. The pybind11 modules stay torch-free (they
take data pointers, strides, a dtype code and a stream as integers): a backend's launcher in
ops/<op>.py (attention_with_kvcache's `_launch_cuda` for _C, llama_layer's and draft_head's
for _cpu) is where tensors become those integers, whether called here or directly.
"""
from typing import Optional

import torch
from torch import Tensor

from .attention_with_kvcache import ATTENTION
from .draft_head import DRAFT_HEAD_ARGMAX
from .greedy_accept import GREEDY_ACCEPT
from .rms_norm import RMS_NORM
from .silu_mul import SILU_MUL


@torch.library.custom_op("layerskip::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor,
                           v_new: Tensor, cache_seqlens: Tensor, rotary_cos: Optional[Tensor],
                           rotary_sin: Optional[Tensor], softmax_scale: Optional[float],
                           backend: str) -> Tensor:
    return ATTENTION.impls[backend].run(q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                        rotary_cos, rotary_sin, softmax_scale)


@attention_with_kvcache.register_fake
def _(q, k_cache, v_cache, k_new, v_new, cache_seqlens, rotary_cos, rotary_sin, softmax_scale,
      backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("layerskip::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float, backend: str) -> Tensor:
    return RMS_NORM.impls[backend].run(x, weight, eps, None)


@rms_norm.register_fake
def _(x, weight, eps, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("layerskip::rms_norm_residual", mutates_args=())
def rms_norm_residual(x: Tensor, weight: Tensor, eps: float, residual: Tensor,
                      backend: str) -> tuple[Tensor, Tensor]:
    return RMS_NORM.impls[backend].run(x, weight, eps, residual)


@rms_norm_residual.register_fake
def _(x, weight, eps, residual, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.custom_op("layerskip::draft_head_argmax", mutates_args=())
def draft_head_argmax(h: Tensor, norm_weight: Tensor, eps: float, lm_head_weight: Tensor,
                      backend: str) -> tuple[Tensor, Tensor]:
    return DRAFT_HEAD_ARGMAX.impls[backend].run(h, norm_weight, eps, lm_head_weight)


@draft_head_argmax.register_fake
def _(h, norm_weight, eps, lm_head_weight, backend):
    lead = h.shape[:-1]
    return h.new_empty(lead, dtype=torch.int64), h.new_empty(lead, dtype=torch.float32)


@torch.library.custom_op("layerskip::greedy_accept", mutates_args=())
def greedy_accept(drafts: Tensor, verify_logits: Tensor, cache_seqlens: Tensor, active: Tensor,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return GREEDY_ACCEPT.impls[backend].run(drafts, verify_logits, cache_seqlens, active)


@greedy_accept.register_fake
def _(drafts, verify_logits, cache_seqlens, active, backend):
    B = drafts.shape[0]
    return (drafts.new_empty(B, dtype=torch.int32), drafts.new_empty(B, dtype=torch.int64),
            drafts.new_empty(B, dtype=torch.int32))


@torch.library.custom_op("layerskip::silu_mul", mutates_args=())
def silu_mul(gate_up: Tensor, backend: str) -> Tensor:
    return SILU_MUL.impls[backend].run(gate_up)


@silu_mul.register_fake
def _(gate_up, backend):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


def _rms_norm(backend):
    def run(x, weight, eps, residual=None):
        if residual is None:
            return rms_norm(x, weight, eps, backend)
        return rms_norm_residual(x, weight, eps, residual, backend)
    return run


_CALLERS = {
    "attention_with_kvcache": lambda backend: lambda *args: attention_with_kvcache(*args, backend),
    "rms_norm": _rms_norm,
    "draft_head_argmax": lambda backend: lambda *args: draft_head_argmax(*args, backend),
    "greedy_accept": lambda backend: lambda *args: greedy_accept(*args, backend),
    "silu_mul": lambda backend: lambda gate_up: silu_mul(gate_up, backend),
}


def custom_op(op, backend):
    """A callable with op's launcher signature that runs `backend` through the custom op."""
    return _CALLERS[op.name](backend)
