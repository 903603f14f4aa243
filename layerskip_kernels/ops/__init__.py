"""Ops: argument checks, a PyTorch reference and backend dispatch, one module per op family."""
from .attention_with_kvcache import attention_with_kvcache, attention_with_kvcache_reference
from .backend import resolve_backend
from .kv_cache_append import kv_cache_append, kv_cache_append_reference

__all__ = ["attention_with_kvcache", "attention_with_kvcache_reference", "kv_cache_append",
           "kv_cache_append_reference", "resolve_backend"]
