"""attention_with_kvcache microbenchmark (pytest-benchmark, not a test).

Providers on identical shapes:
- "torch", "triton", "cuda": the op's backends, each launcher called directly;
  extra_info["auto_backend"] is what "auto" picks for the shape.
- "sdpa": PyTorch SDPA over the same cache bytes with a separate cache write (no RoPE: the
  unfused lower bound); extra_info["sdpa_backend"] is the kernel PyTorch picks for it
  (flash / efficient / cuDNN / math, from torch._fused_sdp_choice).
- "flash": flash-attn's flash_attn_with_kvcache, "flashinfer": FlashInfer's single-request
  decode (B = 1, one query): each only where installed.
GB/s counts the KV bytes read plus the new rows written, the same bytes for every provider.

    pytest bench/bench_attention_with_kvcache.py -k gpu                       # GPU grid
    pytest bench/bench_attention_with_kvcache.py -k cpu --benchmark-disable   # quick CPU smoke
"""
import importlib.util

import pytest
import torch

import layerskip_kernels as lsk
from layerskip_kernels.ops.attention_with_kvcache import ATTENTION

HEADS = {"llama-3.2-1b": (32, 8, 64), "llama-3-8b": (32, 8, 128)}  # (Hq, Hkv, D)
BATCHES = (1, 8, 64)
CACHES = (512, 2048, 8192, 32768)
QUERIES = (1, 5)
PROVIDERS = ("torch", "triton", "cuda", "sdpa", "flash", "flashinfer")
ARGS = ("q", "k_cache", "v_cache", "k_new", "v_new", "cache_seqlens", "rotary_cos",
        "rotary_sin")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(B, Sq, Hq, Hkv, D, cache_len, dtype, device):
    """Caches sized for cache_len + Sq, every row holding cache_len keys; RoPE tables in dtype.
    A tuple in the op's argument order (ARGS)."""
    Smax = cache_len + Sq
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    inv_freq = 10000.0 ** (-torch.arange(0, D // 2, device=device) / (D // 2))
    angles = torch.arange(Smax, device=device)[:, None] * inv_freq
    return (randn(B, Sq, Hq, D), randn(B, Smax, Hkv, D), randn(B, Smax, Hkv, D),
            randn(B, Sq, Hkv, D), randn(B, Sq, Hkv, D),
            torch.full((B,), cache_len, dtype=torch.int32, device=device),
            angles.cos().to(dtype), angles.sin().to(dtype))


def _sdpa_args(cache_len, q, k_cache, v_cache):
    Sq, end = q.shape[1], cache_len + q.shape[1]
    mask = None  # bottom-right causal: query i sees positions <= cache_len + i
    if Sq > 1:
        mask = torch.ones(Sq, end, dtype=torch.bool, device=q.device).tril(cache_len)
    return (q.transpose(1, 2), k_cache[:, :end].transpose(1, 2),
            v_cache[:, :end].transpose(1, 2), mask)


def sdpa_with_separate_write(cache_len, q, k_cache, v_cache, k_new, v_new, *_):
    """Write the new rows, then SDPA over the cache prefix; cache_len is known on the host."""
    end = cache_len + q.shape[1]
    k_cache[:, cache_len:end], v_cache[:, cache_len:end] = k_new, v_new
    q_t, k, v, mask = _sdpa_args(cache_len, q, k_cache, v_cache)
    return torch.nn.functional.scaled_dot_product_attention(
        q_t, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q_t.shape[1]).transpose(1, 2)


def sdpa_backend(cache_len, q, k_cache, v_cache, *_):
    """The SDPA kernel PyTorch picks for these arguments, by name (None if it cannot tell)."""
    try:
        from torch.nn.attention import SDPBackend
        q_t, k, v, mask = _sdpa_args(cache_len, q, k_cache, v_cache)
        choice = torch._fused_sdp_choice(q_t, k, v, attn_mask=mask, dropout_p=0.0,
                                         is_causal=False, scale=None,
                                         enable_gqa=k.shape[1] != q_t.shape[1])
        return SDPBackend(choice).name.lower()
    except Exception:  # a private API: record nothing rather than fail the benchmark
        return None


def _version(module):
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(__import__(module), "__version__", "installed")


def provider_fn(provider, cache_len, Sq, B):
    if provider in ("torch", "triton", "cuda"):
        if provider == "cuda" and not lsk.cuda_available():
            pytest.skip("the CUDA extension is not built")
        return ATTENTION.impls[provider].run
    if provider == "sdpa":
        return lambda *args: sdpa_with_separate_write(cache_len, *args)
    if provider == "flash":
        if _version("flash_attn") is None:
            pytest.skip("flash_attn is not installed")
        from flash_attn import flash_attn_with_kvcache
        return lambda q, kc, vc, kn, vn, seqlens, cos, sin: flash_attn_with_kvcache(
            q, kc, vc, k=kn, v=vn, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
            causal=True, rotary_interleaved=False)
    if _version("flashinfer") is None:
        pytest.skip("flashinfer is not installed")
    if B != 1 or Sq != 1:
        pytest.skip("flashinfer: only its single-request decode (B = 1, one query) is wired")
    from flashinfer import single_decode_with_kv_cache
    return lambda q, kc, vc, *_: single_decode_with_kv_cache(q[0, 0], kc[0, :cache_len],
                                                             vc[0, :cache_len])


def run(measure, provider, model, B, Sq, cache_len, dtype, device):
    Hq, Hkv, D = HEADS[model]
    fn = provider_fn(provider, cache_len, Sq, B)
    inputs = lambda: make_inputs(B, Sq, Hq, Hkv, D, cache_len, dtype, device)  # noqa: E731
    example = inputs()
    elem = example[0].element_size()
    kv_bytes = 2 * B * Hkv * D * elem * ((cache_len + Sq) + Sq)  # K and V: read, then new rows
    measure(fn, kv_bytes, inputs, first=example, op=ATTENTION.name, provider=provider,
            model=model, B=B, Sq=Sq, cache_len=cache_len, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype),
            rope=provider not in ("sdpa", "flashinfer"),
            auto_backend=ATTENTION.resolve("auto", example[0].device, example),
            sdpa_backend=sdpa_backend(cache_len, *example) if provider == "sdpa" else None,
            flash_attn=_version("flash_attn"), flashinfer=_version("flashinfer"))


@needs_gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("Sq", QUERIES)
@pytest.mark.parametrize("cache_len", CACHES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("model", tuple(HEADS))
def test_gpu(measure, model, B, cache_len, Sq, provider):
    run(measure, provider, model, B, Sq, cache_len, torch.bfloat16, "cuda")


@pytest.mark.parametrize("provider", ("torch", "sdpa"))
@pytest.mark.parametrize("Sq", QUERIES)
def test_cpu(measure, Sq, provider):
    """Tiny shapes, in seconds: the quick mode's smoke test."""
    run(measure, provider, "llama-3.2-1b", 1, Sq, 64, torch.float32, "cpu")
