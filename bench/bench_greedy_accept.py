"""greedy_accept microbenchmark (pytest-benchmark, not a test).

Providers on identical shapes: the op's backends, "torch" (the reference: argmax, compare,
cumprod, ...) and "triton", each launcher called directly, from the verify logits
(B, k + 1, vocab) or from their argmax tokens (B, k + 1); extra_info["auto_backend"] is what
"auto" picks. GB/s counts the bytes of what is read (logits or tokens).

    pytest bench/bench_greedy_accept.py -k gpu                      # GPU grid
    pytest bench/bench_greedy_accept.py -k cpu --benchmark-disable  # quick CPU smoke
"""
import pytest
import torch

from layerskip_kernels.ops.greedy_accept import GREEDY_ACCEPT

VOCABS = {"llama-2": 32000, "llama-3": 128256, "stories260K": 512}
BATCHES = (1, 8, 64)
DRAFTS = (4, 8)
SOURCES = ("logits", "tokens")
PROVIDERS = ("torch", "triton")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(measure, provider, model, B, k, source, dtype, device):
    vocab = VOCABS[model]

    def inputs():
        logits = torch.randn(B, k + 1, vocab, device=device, dtype=dtype)
        target = logits.argmax(-1)
        drafts = target[:, :k].clone()
        drafts[:, k // 2] += 1  # reject half way
        verify = logits if source == "logits" else target
        return (drafts, verify, torch.randint(0, 1000, (B,), device=device, dtype=torch.int32),
                torch.ones(B, dtype=torch.bool, device=device))
    example = inputs()
    measure(GREEDY_ACCEPT.impls[provider].run, example[1].numel() * example[1].element_size(),
            inputs, first=example, op=GREEDY_ACCEPT.name, provider=provider, model=model, B=B,
            k=k, vocab=vocab, source=source, dtype=str(dtype),
            auto_backend=GREEDY_ACCEPT.resolve("auto", example[0].device, example))


@needs_gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("k", DRAFTS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("model", tuple(VOCABS))
def test_gpu(measure, model, B, k, source, provider):
    run(measure, provider, model, B, k, source, torch.bfloat16, "cuda")


@pytest.mark.parametrize("source", SOURCES)
def test_cpu(measure, source):
    """Tiny shapes, in seconds: the quick mode's smoke test."""
    run(measure, "torch", "stories260K", 4, 4, source, torch.float32, "cpu")
