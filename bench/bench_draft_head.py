"""draft_head microbenchmark (pytest-benchmark, not a test).

Providers on identical shapes: our ops per backend (the torch reference, triton) and the
model's unfused head (RMSNorm, F.linear to full logits in the dtype, then argmax / topk).
GB/s counts the lm_head weight bytes, which dominate: on a GPU the fused head should run near
HBM bandwidth.

    pytest bench/bench_draft_head.py                                # GPU grid
    pytest bench/bench_draft_head.py -k cpu --benchmark-disable     # quick CPU smoke
"""
import pytest
import torch
import torch.nn.functional as F

from layerskip_kernels.ops.draft_head import draft_head_argmax, draft_head_topk
from layerskip_kernels.ops.rms_norm import rms_norm_reference

HEADS = {"llama-3.2-1b": (2048, 128256), "llama-2-7b": (4096, 32000), "stories260K": (64, 512)}
BATCHES = (1, 8, 64)
MODES = ("argmax", "top50")
PROVIDERS = ("torch", "triton", "unfused")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def unfused(h, norm_weight, eps, lm_head_weight, k):
    """What the model's head does today: full logits in the dtype, then select."""
    logits = F.linear(rms_norm_reference(h, norm_weight, eps), lm_head_weight)
    return logits.argmax(-1) if k == 1 else logits.topk(k, dim=-1)


def run(measure, provider, model, B, mode, dtype, device):
    dim, vocab = HEADS[model]
    h = torch.randn(B, dim, device=device, dtype=dtype)
    norm_weight = torch.randn(dim, device=device, dtype=dtype)
    lm_head_weight = torch.randn(vocab, dim, device=device, dtype=dtype) / dim ** 0.5
    k = 1 if mode == "argmax" else int(mode[3:])
    args = (h, norm_weight, 1e-5, lm_head_weight)
    if provider == "unfused":
        fn = lambda: unfused(*args, k)  # noqa: E731
    elif k == 1:
        fn = lambda: draft_head_argmax(*args, backend=provider)  # noqa: E731
    else:
        fn = lambda: draft_head_topk(*args, k, backend=provider)  # noqa: E731
    nbytes = lm_head_weight.numel() * lm_head_weight.element_size()
    measure(fn, nbytes, provider=provider, model=model, B=B, dim=dim, vocab=vocab, k=k,
            dtype=str(dtype))


@needs_gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("model", tuple(HEADS))
def test_gpu(measure, model, B, mode, provider):
    run(measure, provider, model, B, mode, torch.bfloat16, "cuda")


@pytest.mark.parametrize("provider", ("torch", "unfused"))
@pytest.mark.parametrize("mode", MODES)
def test_cpu(measure, mode, provider):
    """Tiny shapes, in seconds: the quick mode's smoke test."""
    run(measure, provider, "stories260K", 4, mode, torch.float32, "cpu")
