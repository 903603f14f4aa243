"""Turning logits into tokens: greedy, or temperature / top-k / top-p sampling."""
import torch


def logits_to_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Probabilities (..., vocab) in float32 after temperature, top-k and top-p filtering.
    The same filter must be applied to draft and target for lossless speculative sampling."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first stays.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """One token per row of logits (B, vocab): argmax when temperature is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
