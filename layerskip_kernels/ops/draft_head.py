"""The fused draft head: final RMSNorm + lm_head + argmax (greedy) or top-k (sampling), without
the full-vocabulary logits in memory on kernel backends. Every early exit shares this head.

    z = rms_norm(h, norm_weight, eps)              (ops.rms_norm: rounded to h's dtype, as the
                                                    model's norm hands lm_head its input)
    logits = z @ lm_head_weight^T                  (float32 accumulation, never rounded)
    argmax: (tokens, max_logit); top-k: (values, indices), values descending.

Ties go to the lowest vocabulary index (as torch.argmax and a stable descending sort). In
float32 this equals ``argmax(F.linear(norm(h), W))`` of the model's head; in fp16 / bf16 the
logits stay in float32, where the model's head rounds them to the dtype (more ties there).
"""
import torch
import torch.nn.functional as F

from ._checks import check
from .backend import Impl, Op
from .rms_norm import MAX_KERNEL_DIM, SUPPORTED_DTYPES, rms_norm_reference

MAX_KERNEL_TOPK = 64


def _check_draft_head(h, norm_weight, eps, lm_head_weight, k=1):
    check(h.dtype in SUPPORTED_DTYPES, "h", "float32, float16 or bfloat16", h.dtype)
    check(h.dim() >= 1 and h.shape[-1] > 0, "h", "shape (..., dim) with dim >= 1",
          tuple(h.shape))
    check(h.stride(-1) == 1, "h", "a contiguous last dim (stride 1)", h.stride(-1))
    dim = h.shape[-1]
    check(norm_weight.shape == (dim,), "norm_weight", f"shape ({dim},)", tuple(norm_weight.shape))
    check(norm_weight.dtype in SUPPORTED_DTYPES, "norm_weight", "float32, float16 or bfloat16",
          norm_weight.dtype)
    check(isinstance(eps, (int, float)) and eps >= 0, "eps", "a number >= 0", repr(eps))
    check(lm_head_weight.dim() == 2 and lm_head_weight.shape[1] == dim
          and lm_head_weight.shape[0] > 0, "lm_head_weight", f"shape (vocab >= 1, dim={dim})",
          tuple(lm_head_weight.shape))
    check(lm_head_weight.dtype == h.dtype, "lm_head_weight", f"dtype {h.dtype} (as h)",
          lm_head_weight.dtype)
    check(lm_head_weight.stride(-1) == 1, "lm_head_weight", "a contiguous last dim (stride 1)",
          lm_head_weight.stride(-1))
    for name, t in (("norm_weight", norm_weight), ("lm_head_weight", lm_head_weight)):
        check(t.device == h.device, name, f"device {h.device} (as h)", t.device)
    vocab = lm_head_weight.shape[0]
    check(isinstance(k, int) and 1 <= k <= vocab, "k", f"an int in [1, vocab={vocab}]", repr(k))


def draft_head_logits(h, norm_weight, eps, lm_head_weight):
    """float32 logits (..., vocab) of the head: the reference paths' shared part."""
    z = rms_norm_reference(h, norm_weight, eps)
    return F.linear(z.float(), lm_head_weight.float())


def draft_head_argmax_reference(h, norm_weight, eps, lm_head_weight):
    """Plain PyTorch: the CPU path and the oracle. Returns (tokens int64, max_logit float32)."""
    logits = draft_head_logits(h, norm_weight, eps, lm_head_weight)
    tokens = logits.argmax(-1)  # the first of equal maxima
    return tokens, logits.gather(-1, tokens[..., None]).squeeze(-1)


def draft_head_topk_reference(h, norm_weight, eps, lm_head_weight, k):
    """Plain PyTorch: (values float32, indices int64), each (..., k). A stable descending sort
    puts equal logits in index order (torch.topk leaves their order unspecified)."""
    logits = draft_head_logits(h, norm_weight, eps, lm_head_weight)
    values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
    return values[..., :k].contiguous(), indices[..., :k].contiguous()


def _triton_topk(h, norm_weight, eps, lm_head_weight, k):
    from ..triton.draft_head import draft_head_topk_triton
    return draft_head_topk_triton(h, norm_weight, eps, lm_head_weight, k)


def _triton_argmax(h, norm_weight, eps, lm_head_weight):
    from ..triton.draft_head import draft_head_argmax_triton
    return draft_head_argmax_triton(h, norm_weight, eps, lm_head_weight)


def _kernel_limits(h, norm_weight, eps, lm_head_weight, k=1):
    if h.shape[-1] > MAX_KERNEL_DIM:
        return "h", f"a last dim of at most {MAX_KERNEL_DIM}", h.shape[-1]
    if k > MAX_KERNEL_TOPK:
        return "k", f"at most {MAX_KERNEL_TOPK}", k
    return None


DRAFT_HEAD_ARGMAX = Op("draft_head_argmax", {"triton": Impl(_triton_argmax, _kernel_limits),
                                             "torch": Impl(draft_head_argmax_reference)})
DRAFT_HEAD_TOPK = Op("draft_head_topk", {"triton": Impl(_triton_topk, _kernel_limits),
                                         "torch": Impl(draft_head_topk_reference)})


def draft_head_argmax(h, norm_weight, eps, lm_head_weight, backend="auto"):
    """Greedy draft token of each hidden state: argmax of lm_head(rms_norm(h)).

    h: (..., dim), e.g. (B, dim) at the exit layer; norm_weight: (dim,); lm_head_weight:
    (vocab, dim) of h's dtype. Returns (tokens (...,) int64, max_logit (...,) float32).
    """
    _check_draft_head(h, norm_weight, eps, lm_head_weight)
    return DRAFT_HEAD_ARGMAX(backend, h.device, (h, norm_weight, eps, lm_head_weight))


def draft_head_topk(h, norm_weight, eps, lm_head_weight, k, backend="auto"):
    """The k largest logits of lm_head(rms_norm(h)) and their token ids, for top-k sampling.

    Returns (values (..., k) float32 descending, indices (..., k) int64); equal logits in index
    order. Kernel backends take k <= 64.
    """
    _check_draft_head(h, norm_weight, eps, lm_head_weight, k)
    return DRAFT_HEAD_TOPK(backend, h.device, (h, norm_weight, eps, lm_head_weight, k))
