"""Ops: argument checks, a PyTorch reference and backend dispatch, one module per op family."""
from .attention_with_kvcache import (AttentionPlan, attend, attention_with_kvcache,
                                     attention_with_kvcache_reference, plan_attention)
from .backend import resolve_backend
from .kv_cache_append import kv_cache_append, kv_cache_append_reference

__all__ = ["AttentionPlan", "attend", "attention_with_kvcache", "plan_attention", "attention_with_kvcache_reference", "kv_cache_append",
           "kv_cache_append_reference", "resolve_backend"]
