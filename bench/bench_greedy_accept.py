"""greedy_accept microbenchmark (pytest-benchmark, not a test).

Providers on identical shapes: our op per backend (the torch reference, triton), from the
verify logits (B, k + 1, vocab) or from their argmax tokens (B, k + 1). GB/s counts the bytes
of what is read (logits or tokens).

    pytest bench/bench_greedy_accept.py                             # GPU grid
    pytest bench/bench_greedy_accept.py -k cpu --benchmark-disable  # quick CPU smoke
"""
import importlib.util
import math
import platform

import pytest
import torch

from layerskip_kernels.ops.greedy_accept import greedy_accept

VOCABS = {"llama-2": 32000, "llama-3": 128256, "stories260K": 512}
BATCHES = (1, 8, 64)
DRAFTS = (4, 8)
SOURCES = ("logits", "tokens")
PROVIDERS = ("torch", "triton")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(benchmark, provider, model, B, k, source, dtype, device):
    vocab = VOCABS[model]
    logits = torch.randn(B, k + 1, vocab, device=device, dtype=dtype)
    target = logits.argmax(-1)
    drafts = target[:, :k].clone()
    drafts[:, k // 2] += 1  # reject half way
    verify = logits if source == "logits" else target
    seqlens = torch.randint(0, 1000, (B,), device=device, dtype=torch.int32)
    active = torch.ones(B, dtype=torch.bool, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        greedy_accept(drafts, verify, seqlens, active, backend=provider)
        sync()

    timed()  # compile / warm up outside the timing
    benchmark(timed)
    nbytes = verify.numel() * verify.element_size()
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats else float("nan")
    benchmark.extra_info.update(
        provider=provider, model=model, B=B, k=k, vocab=vocab, source=source, dtype=str(dtype),
        bytes=nbytes,
        gb_per_s=nbytes / seconds / 1e9 if seconds and not math.isnan(seconds) else None,
        device=(torch.cuda.get_device_name() if device == "cuda"
                else platform.processor() or platform.machine()),
        torch=torch.__version__, triton=_version("triton"),
    )


def _version(module):
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(__import__(module), "__version__", None)


@needs_gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("k", DRAFTS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("model", ("llama-2", "llama-3"))
def test_gpu(benchmark, model, B, k, source, provider):
    run(benchmark, provider, model, B, k, source, torch.bfloat16, "cuda")


@pytest.mark.parametrize("source", SOURCES)
def test_cpu(benchmark, source):
    """Tiny shapes, in seconds: the quick mode's smoke test."""
    run(benchmark, "torch", "stories260K", 4, 4, source, torch.float32, "cpu")
