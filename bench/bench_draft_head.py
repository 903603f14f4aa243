"""draft_head microbenchmark (pytest-benchmark, not a test).

Providers on identical shapes:
- "torch", "triton": the op's backends (each launcher called directly, so a shape that "auto"
  routes away is still measured); extra_info["auto_backend"] is what "auto" picks there.
- "unfused": the model's head as PyTorch runs it, the bar the kernel must clear (RMSNorm,
  F.linear to full logits in the dtype, then argmax / topk).
- "triton:fma", "triton:dot": both kernel variants forced, at B <= 8 (tuning the threshold).
GB/s counts the lm_head weight bytes, which dominate: the kernel should run near HBM bandwidth.
Rows 128 and 576 sit past the ROUTING rule (auto: torch) to measure both sides of it.

    pytest bench/bench_draft_head.py -k gpu                         # GPU grid
    pytest bench/bench_draft_head.py -k cpu --benchmark-disable     # quick CPU smoke
"""
import pytest
import torch
import torch.nn.functional as F

from layerskip_kernels.ops.draft_head import DRAFT_HEAD_ARGMAX, DRAFT_HEAD_TOPK
from layerskip_kernels.ops.rms_norm import rms_norm_reference

HEADS = {"llama-3.2-1b": (2048, 128256), "llama-3-8b": (4096, 128256),
         "llama-2-7b": (4096, 32000), "stories260K": (64, 512)}
BATCHES = (1, 2, 4, 8, 64, 128, 576)  # 128, 576 (a B=64, k=8 verify): past the 64-row rule
MODES = ("argmax", "top50")
PROVIDERS = ("torch", "triton", "unfused", "triton:fma", "triton:dot")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def unfused(h, norm_weight, eps, lm_head_weight, k):
    """What the model's head does in PyTorch: full logits in the dtype, then select."""
    logits = F.linear(rms_norm_reference(h, norm_weight, eps), lm_head_weight)
    return logits.argmax(-1) if k == 1 else logits.topk(k, dim=-1)


def provider_fn(provider, k):
    op = DRAFT_HEAD_ARGMAX if k == 1 else DRAFT_HEAD_TOPK
    extra = () if k == 1 else (k,)
    if provider == "unfused":
        return lambda *args: unfused(*args, k)
    if provider.startswith("triton:"):
        from layerskip_kernels.triton.draft_head import draft_head_topk_triton
        variant = provider.split(":")[1]
        return lambda *args: draft_head_topk_triton(*args, k, variant=variant)
    return lambda *args: op.impls[provider].run(*args, *extra)


def run(measure, provider, model, B, mode, dtype, device):
    dim, vocab = HEADS[model]
    k = 1 if mode == "argmax" else int(mode[3:])

    def inputs():
        return (torch.randn(B, dim, device=device, dtype=dtype),
                torch.randn(dim, device=device, dtype=dtype), 1e-5,
                torch.randn(vocab, dim, device=device, dtype=dtype) / dim ** 0.5)
    example = inputs()
    op = DRAFT_HEAD_ARGMAX if k == 1 else DRAFT_HEAD_TOPK
    auto = op.resolve("auto", example[0].device, example if k == 1 else (*example, k))
    measure(provider_fn(provider, k), vocab * dim * example[0].element_size(), inputs,
            first=example, op=op.name, provider=provider, model=model, B=B, dim=dim,
            vocab=vocab, k=k, mode=mode, dtype=str(dtype), auto_backend=auto)


@needs_gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("model", tuple(HEADS))
def test_gpu(measure, model, B, mode, provider):
    if provider.startswith("triton:") and (B > 8 or model == "stories260K"):
        pytest.skip("variants are compared at B <= 8 on Llama heads")
    run(measure, provider, model, B, mode, torch.bfloat16, "cuda")


@pytest.mark.parametrize("provider", ("torch", "unfused"))
@pytest.mark.parametrize("mode", MODES)
def test_cpu(measure, mode, provider):
    """Tiny shapes, in seconds: the quick mode's smoke test."""
    run(measure, provider, "stories260K", 4, mode, torch.float32, "cpu")
