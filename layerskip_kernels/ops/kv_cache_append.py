"""kv_cache_append: write new K/V rows into a static KV cache at per-row lengths.

k_cache, v_cache: (B, Smax, H, D); k_new, v_new: (B, S, H, D); cache_seqlens: (B,) int32.
Writes k_new[b, i] to k_cache[b, cache_seqlens[b] + i] for i < S (same for v), in place.
cache_seqlens is not modified: the caller advances it.
"""
import torch

from .. import _ext
from ._checks import check
from .backend import Impl, Op


def _check_kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, check_bounds=False):
    """All validation. The bounds check reads cache_seqlens on the host, so on a GPU it is a
    sync and runs only with check_bounds=True; on the CPU it always runs."""
    check(k_cache.dim() == 4, "k_cache", "4-D (B, Smax, H, D)", tuple(k_cache.shape))
    B, Smax, H, D = k_cache.shape
    check(v_cache.shape == k_cache.shape, "v_cache", f"shape {tuple(k_cache.shape)}", tuple(v_cache.shape))
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        ok = t.dim() == 4 and t.shape[0] == B and t.shape[2:] == (H, D) and t.shape[1] <= Smax
        check(ok, name, f"shape ({B}, S <= {Smax}, {H}, {D})", tuple(t.shape))
    check(v_new.shape == k_new.shape, "v_new", f"shape {tuple(k_new.shape)}", tuple(v_new.shape))
    check(k_cache.dtype in _ext.DTYPE_CODES, "k_cache", f"dtype in {list(_ext.DTYPE_CODES)}", k_cache.dtype)
    for name, t in (("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        check(t.dtype == k_cache.dtype, name, f"dtype {k_cache.dtype}", t.dtype)
    check(cache_seqlens.dtype == torch.int32, "cache_seqlens", "dtype torch.int32", cache_seqlens.dtype)
    check(cache_seqlens.shape == (B,), "cache_seqlens", f"shape ({B},)", tuple(cache_seqlens.shape))
    tensors = (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new),
               ("cache_seqlens", cache_seqlens))
    for name, t in tensors:
        check(t.device == k_cache.device, name, f"device {k_cache.device}", t.device)
        check(t.is_contiguous(), name, "a contiguous tensor", f"strides {t.stride()}")
    if check_bounds or cache_seqlens.device.type == "cpu":
        S = k_new.shape[1]
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens)) if B else (0, 0)
        check(lo >= 0 and hi + S <= Smax, "cache_seqlens",
              f"0 <= cache_seqlens and cache_seqlens + {S} <= {Smax}", f"range [{lo}, {hi}]")


def kv_cache_append_reference(k_cache, v_cache, k_new, v_new, cache_seqlens):
    """Plain PyTorch, in place, without a host sync."""
    B, S = k_new.shape[:2]
    rows = torch.arange(B, device=k_cache.device)[:, None]
    pos = cache_seqlens.long()[:, None] + torch.arange(S, device=k_cache.device)
    k_cache[rows, pos] = k_new
    v_cache[rows, pos] = v_new


def _launch_cuda(k_cache, v_cache, k_new, v_new, cache_seqlens):
    B, Smax, H, D = k_cache.shape
    with torch.cuda.device(k_cache.device):
        _ext._C.kv_cache_append(
            k_cache.data_ptr(), v_cache.data_ptr(), k_new.data_ptr(), v_new.data_ptr(),
            cache_seqlens.data_ptr(), B, Smax, k_new.shape[1], H, D,
            _ext.DTYPE_CODES[k_cache.dtype], torch.cuda.current_stream().cuda_stream)


def _launch_triton(k_cache, v_cache, k_new, v_new, cache_seqlens):
    from ..triton.kv_cache_append import kv_cache_append_triton
    kv_cache_append_triton(k_cache, v_cache, k_new, v_new, cache_seqlens)


KV_CACHE_APPEND = Op("kv_cache_append", {"cuda": Impl(_launch_cuda),
                                         "triton": Impl(_launch_triton),
                                         "torch": Impl(kv_cache_append_reference)})


def kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, backend="auto",
                    check_bounds=False):
    """Append k_new/v_new to the caches in place at rows cache_seqlens[b] + i; returns None."""
    _check_kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, check_bounds)
    KV_CACHE_APPEND(backend, k_cache.device, (k_cache, v_cache, k_new, v_new, cache_seqlens))
