"""rms_norm microbenchmark (pytest-benchmark, not a test).

Providers on identical shapes: our op per backend (the torch reference, triton). GB/s counts
the bytes read (x, residual, weight) plus written (y, and h with a residual).

    pytest bench/bench_rms_norm.py                                  # GPU grid
    pytest bench/bench_rms_norm.py -k cpu --benchmark-disable       # quick CPU smoke
"""
import importlib.util
import math
import platform

import pytest
import torch

from layerskip_kernels.ops.rms_norm import rms_norm

DIMS = {"llama-3.2-1b": 2048, "llama-3-8b": 4096}
ROWS = (1, 64, 4096)  # a decode step, a verify batch, a prefill
PROVIDERS = ("torch", "triton")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(benchmark, provider, model, rows, residual, dtype, device):
    dim = DIMS[model]
    x = torch.randn(rows, dim, device=device, dtype=dtype)
    r = torch.randn(rows, dim, device=device, dtype=dtype) if residual else None
    weight = torch.randn(dim, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        rms_norm(x, weight, 1e-5, r, backend=provider)
        sync()

    timed()  # compile / warm up outside the timing
    benchmark(timed)
    elem = x.element_size()
    nbytes = elem * (rows * dim * (2 + 2 * residual) + dim)
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats else float("nan")
    benchmark.extra_info.update(
        provider=provider, model=model, rows=rows, dim=dim, residual=residual, dtype=str(dtype),
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
@pytest.mark.parametrize("residual", (False, True), ids=("plain", "residual"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("model", tuple(DIMS))
def test_gpu(benchmark, model, rows, residual, provider):
    run(benchmark, provider, model, rows, residual, torch.bfloat16, "cuda")


@pytest.mark.parametrize("residual", (False, True), ids=("plain", "residual"))
def test_cpu(benchmark, residual):
    """Tiny shapes, in seconds: the quick mode's smoke test."""
    run(benchmark, "torch", "llama-3.2-1b", 4, residual, torch.float32, "cpu")
