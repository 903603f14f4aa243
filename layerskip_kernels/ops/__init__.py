"""Ops: argument checks, a PyTorch reference and backend dispatch, one module per op family;
`Kernels`, the model's binding of them; `library`, the torch.library custom ops."""
from . import library
from .attention_with_kvcache import attention_with_kvcache, attention_with_kvcache_reference
from .backend import Impl, Op, triton_available
from .draft_head import (draft_head_argmax, draft_head_argmax_reference, draft_head_topk,
                         draft_head_topk_reference)
from .greedy_accept import greedy_accept, greedy_accept_reference
from .kernels import Kernels
from .rms_norm import rms_norm, rms_norm_reference
from .silu_mul import silu_mul, silu_mul_reference

__all__ = ["Impl", "Kernels", "Op", "attention_with_kvcache", "attention_with_kvcache_reference",
           "draft_head_argmax", "draft_head_argmax_reference", "draft_head_topk",
           "draft_head_topk_reference", "greedy_accept", "greedy_accept_reference",
           "library", "rms_norm",
           "rms_norm_reference", "silu_mul", "silu_mul_reference", "triton_available"]
