"""rms_norm microbenchmark (pytest-benchmark, not a test).

Providers on identical shapes: the op's backends, "torch" (the reference: PyTorch's chain of
elementwise kernels) and "triton", each launcher called directly; extra_info["auto_backend"]
is what "auto" picks. GB/s counts the bytes read (x, residual, weight) plus written (y, and h
with a residual).

    pytest bench/bench_rms_norm.py -k gpu                           # GPU grid
    pytest bench/bench_rms_norm.py -k cpu --benchmark-disable       # quick CPU smoke
"""
import pytest
import torch

from layerskip_kernels.ops.rms_norm import RMS_NORM

DIMS = {"llama-3.2-1b": 2048, "llama-3-8b": 4096, "stories260K": 64}
ROWS = (1, 8, 64, 4096)  # a decode step, a verify, a decode batch, a prefill
PROVIDERS = ("torch", "triton")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(measure, provider, model, rows, residual, dtype, device):
    dim = DIMS[model]

    def inputs():
        return (torch.randn(rows, dim, device=device, dtype=dtype),
                torch.randn(dim, device=device, dtype=dtype), 1e-5,
                torch.randn(rows, dim, device=device, dtype=dtype) if residual else None)
    example = inputs()
    nbytes = example[0].element_size() * (rows * dim * (2 + 2 * residual) + dim)
    measure(RMS_NORM.impls[provider].run, nbytes, inputs, first=example, op=RMS_NORM.name,
            provider=provider, model=model, rows=rows, dim=dim, residual=residual, dtype=str(dtype),
            auto_backend=RMS_NORM.resolve("auto", example[0].device, example))


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
