"""rms_norm microbenchmark (pytest-benchmark, not a test).

Providers on identical shapes: our op per backend (the torch reference, triton). GB/s counts
the bytes read (x, residual, weight) plus written (y, and h with a residual).

    pytest bench/bench_rms_norm.py                                  # GPU grid
    pytest bench/bench_rms_norm.py -k cpu --benchmark-disable       # quick CPU smoke
"""
import pytest
import torch

from layerskip_kernels.ops.rms_norm import rms_norm

DIMS = {"llama-3.2-1b": 2048, "llama-3-8b": 4096}
ROWS = (1, 64, 4096)  # a decode step, a verify batch, a prefill
PROVIDERS = ("torch", "triton")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(measure, provider, model, rows, residual, dtype, device):
    dim = DIMS[model]
    x = torch.randn(rows, dim, device=device, dtype=dtype)
    r = torch.randn(rows, dim, device=device, dtype=dtype) if residual else None
    weight = torch.randn(dim, device=device, dtype=dtype)
    nbytes = x.element_size() * (rows * dim * (2 + 2 * residual) + dim)
    measure(lambda: rms_norm(x, weight, 1e-5, r, backend=provider), nbytes, provider=provider,
            model=model, rows=rows, dim=dim, residual=residual, dtype=str(dtype))


@needs_gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("residual", (False, True), ids=("plain", "residual"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("model", tuple(DIMS))
def test_gpu(measure, model, rows, residual, provider):
    run(measure, provider, model, rows, residual, torch.bfloat16, "cuda")


@pytest.mark.parametrize("residual", (False, True), ids=("plain", "residual"))
def test_cpu(measure, residual):
    """Tiny shapes, in seconds: the quick mode's smoke test."""
    run(measure, "torch", "llama-3.2-1b", 4, residual, torch.float32, "cpu")
