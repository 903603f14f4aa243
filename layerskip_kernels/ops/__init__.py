"""Ops: argument checks, a PyTorch reference and backend dispatch, one module per op family."""
from .attention_with_kvcache import (AttentionPlan, attend, attention_with_kvcache,
                                     attention_with_kvcache_reference, plan_attention)
from .backend import Impl, Op, bind, triton_available
from .draft_head import (bound_draft_head_argmax, draft_head_argmax, draft_head_argmax_reference,
                         draft_head_topk, draft_head_topk_reference)
from .greedy_accept import greedy_accept, greedy_accept_reference
from .kv_cache_append import kv_cache_append, kv_cache_append_reference
from .rms_norm import bound_rms_norm, rms_norm, rms_norm_reference

__all__ = ["AttentionPlan", "Impl", "Op", "attend", "attention_with_kvcache",
           "attention_with_kvcache_reference", "bind", "bound_draft_head_argmax",
           "bound_rms_norm", "draft_head_argmax", "draft_head_argmax_reference",
           "draft_head_topk", "draft_head_topk_reference", "greedy_accept",
           "greedy_accept_reference", "kv_cache_append", "kv_cache_append_reference",
           "plan_attention", "rms_norm", "rms_norm_reference", "triton_available"]
