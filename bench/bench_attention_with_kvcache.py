"""attention_with_kvcache microbenchmark (pytest-benchmark, not a test).

Providers on identical shapes: our op per backend (torch reference, triton, cuda), PyTorch SDPA
with a separate cache write (no RoPE: the unfused lower bound), and flash-attn's
flash_attn_with_kvcache when importable. GB/s counts the KV bytes read plus written.

    pytest bench/bench_attention_with_kvcache.py                      # GPU grid
    pytest bench/bench_attention_with_kvcache.py -k cpu --benchmark-disable   # quick CPU smoke
"""
import importlib.util

import pytest
import torch

import layerskip_kernels as lsk
from layerskip_kernels.ops.attention_with_kvcache import attention_with_kvcache

HEADS = {"llama-3.2-1b": (32, 8, 64), "llama-3-8b": (32, 8, 128)}  # (Hq, Hkv, D)
BATCHES = (1, 8, 64)
CACHES = (512, 2048, 8192, 32768)
QUERIES = (1, 5)
PROVIDERS = ("torch", "triton", "cuda", "sdpa", "flash")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(B, Sq, Hq, Hkv, D, cache_len, dtype, device):
    """Caches sized for cache_len + Sq, every row holding cache_len keys; RoPE tables in dtype."""
    Smax = cache_len + Sq
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    inv_freq = 10000.0 ** (-torch.arange(0, D // 2, device=device) / (D // 2))
    angles = torch.arange(Smax, device=device)[:, None] * inv_freq
    return dict(q=randn(B, Sq, Hq, D), k_cache=randn(B, Smax, Hkv, D),
                v_cache=randn(B, Smax, Hkv, D), k_new=randn(B, Sq, Hkv, D),
                v_new=randn(B, Sq, Hkv, D),
                cache_seqlens=torch.full((B,), cache_len, dtype=torch.int32, device=device),
                rotary_cos=angles.cos().to(dtype), rotary_sin=angles.sin().to(dtype))


def sdpa_with_separate_write(cache_len, q, k_cache, v_cache, k_new, v_new, **_):
    """Write the new rows, then SDPA over the cache prefix; cache_len is known on the host."""
    Sq, Hq = q.shape[1], q.shape[2]
    end = cache_len + Sq
    k_cache[:, cache_len:end], v_cache[:, cache_len:end] = k_new, v_new
    k, v = k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2)
    mask = None  # bottom-right causal: query i sees positions <= cache_len + i
    if Sq > 1:
        mask = torch.ones(Sq, end, dtype=torch.bool, device=q.device).tril(cache_len)
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=k.shape[1] != Hq).transpose(1, 2)


def provider_fn(provider, inputs, cache_len):
    if provider in ("torch", "triton", "cuda"):
        if provider == "cuda" and not lsk.cuda_available():
            pytest.skip("the CUDA extension is not built")
        return lambda: attention_with_kvcache(**inputs, backend=provider)
    if provider == "sdpa":
        return lambda: sdpa_with_separate_write(cache_len, **inputs)
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed")
    from flash_attn import flash_attn_with_kvcache
    i = inputs
    return lambda: flash_attn_with_kvcache(
        i["q"], i["k_cache"], i["v_cache"], k=i["k_new"], v=i["v_new"],
        rotary_cos=i["rotary_cos"], rotary_sin=i["rotary_sin"], cache_seqlens=i["cache_seqlens"],
        causal=True, rotary_interleaved=False)


def run(measure, provider, model, B, Sq, cache_len, dtype, device):
    Hq, Hkv, D = HEADS[model]
    inputs = make_inputs(B, Sq, Hq, Hkv, D, cache_len, dtype, device)
    elem = torch.tensor([], dtype=dtype).element_size()
    kv_bytes = 2 * B * Hkv * D * elem * ((cache_len + Sq) + Sq)  # K and V: read, then new rows
    measure(provider_fn(provider, inputs, cache_len), kv_bytes, provider=provider, model=model,
            B=B, Sq=Sq, cache_len=cache_len, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype),
            rope=provider != "sdpa", flash_attn=_flash_attn_version())


def _flash_attn_version():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    return __import__("flash_attn").__version__


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
