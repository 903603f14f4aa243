"""Greedy acceptance of a self-speculative round, on the device with no host sync.

With k drafts d (B, k) and the full model's verify logits at the k + 1 pending positions:
    target = argmax(verify_logits, -1)                (B, k + 1), ties to the lowest id
    accepted[b] = the longest prefix length m with d[b, :m] == target[b, :m]
    next_token[b] = target[b, accepted[b]]
    new_cache_seqlens[b] = cache_seqlens[b] + (accepted[b] + 1 if active[b] else 0)
the greedy branch of ``decoding.self_speculative.accept`` plus the rollback of a round.
Rows that are not active still get accepted / next_token (as accept() computes them); only
their cache length stays put. verify_logits may instead be the argmax itself, (B, k + 1)
int64, e.g. from ``ops.draft_head_argmax`` on the verify hidden states, which never
materialises the logits.

Routing (backend "auto" on a GPU): the Triton path is two launches from logits (a split-vocab
argmax, then the acceptance) or one from tokens, against PyTorch's chain of about seven small
kernels (argmax, compare, cumprod, sum, gather, where, add). No shape goes to "torch" for
speed (ROUTING is empty); bench/routing.py checks this by kernel time on every benchmarked
shape.
"""
import torch

from ._checks import check
from .backend import Impl, Op

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Where "auto" leaves the Triton kernels for "torch": (argument, the kernels' range, why,
# evidence); printed by bench/routing.py. None: they take every call.
ROUTING = ()


def _check_greedy_accept(drafts, verify_logits, cache_seqlens, active):
    check(drafts.dim() == 2 and drafts.dtype == torch.int64, "drafts", "int64 of shape (B, k)",
          f"{drafts.dtype} {tuple(drafts.shape)}")
    B, k = drafts.shape
    if verify_logits.dtype == torch.int64:
        check(verify_logits.shape == (B, k + 1), "verify_logits",
              f"argmax tokens of shape ({B}, k + 1 = {k + 1})", tuple(verify_logits.shape))
    else:
        check(verify_logits.dtype in LOGIT_DTYPES, "verify_logits",
              "float32, float16 or bfloat16 logits, or int64 tokens", verify_logits.dtype)
        check(verify_logits.dim() == 3 and verify_logits.shape[:2] == (B, k + 1)
              and verify_logits.shape[2] > 0, "verify_logits",
              f"shape ({B}, k + 1 = {k + 1}, vocab)", tuple(verify_logits.shape))
        check(verify_logits.stride(-1) == 1, "verify_logits", "a contiguous last dim (stride 1)",
              verify_logits.stride(-1))
    check(cache_seqlens.shape == (B,) and cache_seqlens.dtype == torch.int32, "cache_seqlens",
          f"int32 of shape ({B},)", f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    check(active.shape == (B,) and active.dtype == torch.bool, "active",
          f"bool of shape ({B},)", f"{active.dtype} {tuple(active.shape)}")
    for name, t in (("verify_logits", verify_logits), ("cache_seqlens", cache_seqlens),
                    ("active", active)):
        check(t.device == drafts.device, name, f"device {drafts.device} (as drafts)", t.device)


def greedy_rule(drafts, verify_logits):
    """The greedy acceptance rule: the longest prefix of drafts (B, k) equal to the full
    model's argmax, and the full model's token after it. Returns (accepted int32,
    next_token int64), each (B,)."""
    k = drafts.shape[1]
    target = verify_logits if verify_logits.dtype == torch.int64 else verify_logits.argmax(-1)
    accepted = (drafts == target[:, :k]).int().cumprod(-1).sum(-1, dtype=torch.int32)
    return accepted, target.gather(1, accepted.long()[:, None]).squeeze(1)


def greedy_accept_reference(drafts, verify_logits, cache_seqlens, active):
    """Plain PyTorch: the CPU path and the oracle. Returns (accepted int32, next_token int64,
    new_cache_seqlens int32), each (B,)."""
    accepted, next_token = greedy_rule(drafts, verify_logits)
    advance = torch.where(active, accepted + 1, torch.zeros_like(accepted))
    return accepted, next_token, cache_seqlens + advance


def _launch_triton(*args, **kwargs):
    from ..triton.greedy_accept import greedy_accept_triton
    return greedy_accept_triton(*args, **kwargs)


GREEDY_ACCEPT = Op("greedy_accept", {"triton": Impl(_launch_triton),  # ROUTING: no limits
                                     "torch": Impl(greedy_accept_reference)})


def greedy_accept(drafts, verify_logits, cache_seqlens, active, backend="auto"):
    """Accepted draft count, next token and advanced cache lengths of a greedy round.

    drafts: (B, k) int64; verify_logits: (B, k + 1, vocab) logits of the full model at the
    k + 1 pending positions, or their argmax (B, k + 1) int64; cache_seqlens: (B,) int32, the
    round's start lengths (not modified); active: (B,) bool, rows still generating.
    Returns (accepted (B,) int32, next_token (B,) int64, new_cache_seqlens (B,) int32).
    """
    _check_greedy_accept(drafts, verify_logits, cache_seqlens, active)
    return GREEDY_ACCEPT(backend, drafts.device, (drafts, verify_logits, cache_seqlens, active))
