"""The fused draft head: final RMSNorm + lm_head + argmax (greedy) or top-k (sampling), without
the full-vocabulary logits in memory on kernel backends. Every early exit shares this head.

    z = rms_norm(h, norm_weight, eps)              (ops.rms_norm: rounded to h's dtype, as the
                                                    model's norm hands lm_head its input)
    logits = z @ lm_head_weight^T                  (float32 accumulation, never rounded)
    argmax: (tokens, max_logit); top-k: (values, indices), values descending.

Ties go to the lowest vocabulary index (as torch.argmax and a stable descending sort). A NaN
logit counts as the largest (as torch.argmax); a NaN in h makes all of its row's logits NaN, so
its token is 0. In float32 this equals ``argmax(F.linear(norm(h), W))`` of the model's head; in
fp16 / bf16 the logits stay in float32, where the model's head rounds them to the dtype (more
ties there). The Triton kernel folds the norm into the dot (``rstd * (W @ round(h * weight))``,
see triton/draft_head.py): one rounding per element of z as here, at another place.

Routing (backend "auto" on a GPU): the Triton kernel streams W once from every SM with no
logits in memory; the ROUTING rules below send the shapes where it cannot win to "torch", the
unfused path (RMSNorm, one cuBLAS GEMM into float32 logits, argmax or a stable sort).
"""
import torch
import torch.nn.functional as F

from ._checks import as_float, check
from .backend import Impl, Op
from .rms_norm import SUPPORTED_DTYPES, rms_norm_reference

MAX_KERNEL_TOPK = 64  # the kernel's top-k lives in registers (K_PAD <= 64 keys per row)
MAX_KERNEL_ROWS = 64  # one row tile of the dot variant

# Where "auto" leaves the Triton kernel for "torch": (argument, the kernel's range, why,
# evidence). Evaluated by _kernel_limits; printed by bench/routing.py beside the measurements
# (bench/results/routing-<device>.json), which is where a rule's evidence comes from.
ROUTING = (
    ("h", f"at most {MAX_KERNEL_ROWS} rows",
     "past one 64-row tile the kernel reads W once per tile; cuBLAS's GEMM tiles M",
     "expected, unmeasured (bench/routing.py on the next GPU)"),
    ("k", f"at most {MAX_KERNEL_TOPK}",
     "the kernel keeps each block's top k in registers (a 64-key sorting network)",
     "a limit of the kernel"),
)


def _check_draft_head(h, norm_weight, eps, lm_head_weight, k=1):
    check(h.dtype in SUPPORTED_DTYPES, "h", "float32, float16 or bfloat16", h.dtype)
    check(h.dim() >= 1 and h.shape[-1] > 0, "h", "shape (..., dim) with dim >= 1",
          tuple(h.shape))
    check(h.stride(-1) == 1, "h", "a contiguous last dim (stride 1)", h.stride(-1))
    dim = h.shape[-1]
    check(norm_weight.shape == (dim,), "norm_weight", f"shape ({dim},)", tuple(norm_weight.shape))
    check(norm_weight.dtype in SUPPORTED_DTYPES, "norm_weight", "float32, float16 or bfloat16",
          norm_weight.dtype)
    as_float("eps", eps, "a finite number >= 0", lambda e: e >= 0)
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


_MM_OUT_DTYPE = {"ok": hasattr(torch.ops.aten.mm, "dtype")}


def draft_head_logits(h, norm_weight, eps, lm_head_weight):
    """float32 logits (..., vocab) of the head: the reference paths' shared part. On a GPU in
    fp16 / bf16, cuBLAS multiplies in the dtype into float32 (torch.mm's out_dtype: the same
    exact products and float32 sums as upcasting, without a float32 copy of W)."""
    z = rms_norm_reference(h, norm_weight, eps)
    if z.is_cuda and z.dtype != torch.float32 and _MM_OUT_DTYPE["ok"]:
        try:
            logits = torch.mm(z.reshape(-1, z.shape[-1]), lm_head_weight.t(),
                              out_dtype=torch.float32)
            return logits.view(*z.shape[:-1], lm_head_weight.shape[0])
        except (RuntimeError, TypeError):  # raised at dispatch, before any launch
            _MM_OUT_DTYPE["ok"] = False
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
    """None when the Triton kernel takes the call, else the ROUTING rule it breaks."""
    rows = h.numel() // h.shape[-1]
    if rows > MAX_KERNEL_ROWS:
        return "h", ROUTING[0][1] + " (routing: " + ROUTING[0][2] + ")", f"{rows} rows"
    if k > MAX_KERNEL_TOPK:
        return "k", ROUTING[1][1], k
    return None


def _cpu_argmax(h, norm_weight, eps, lm_head_weight):
    from .llama_layer import draft_head_argmax_cpu
    return draft_head_argmax_cpu(h, norm_weight, eps, lm_head_weight)


def _cpu_limits(*args):
    from .llama_layer import draft_head_cpu_limits
    return draft_head_cpu_limits(*args)


DRAFT_HEAD_ARGMAX = Op("draft_head_argmax", {"cpu": Impl(_cpu_argmax, _cpu_limits),
                                             "triton": Impl(_triton_argmax, _kernel_limits),
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
