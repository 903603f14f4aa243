"""Self-speculative decoding: the model's own early layers (or a layer-skip subset) draft,
all layers verify the drafts in one pass, over one shared KV cache, for a ragged batch.

At the start of a round every layer holds valid KV for positions [0, p_b) of row b, and
token x[p_b] (already emitted) is pending. A round:
  draft   k tokens, each through the draft layers at positions p_b .. p_b + k - 1;
  verify  positions p_b .. p_b + k with the remaining layers in one pass;
  accept  m_b drafts and one token from the full model;
  roll back by setting p_b += m_b + 1: KV past that is stale, never read, later overwritten.
"""
import torch

from .autoregressive import drop_finished, logits_of, prefill
from ..ops.greedy_accept import greedy_rule
from .sampling import logits_to_probs, sample


class ExitDraft:
    """LayerSkip: draft with layers [0, E). Their KV for the drafted positions is reused by
    verification, and so are their outputs (the exit cache), so verification runs layers
    [0, E) only on the last draft and layers [E, L) on the k + 1 pending positions."""

    def __init__(self, model, exit_layer, batch_size, max_drafts):
        self.model, self.exit_layer = model, exit_layer
        self.draft_layers = range(exit_layer)
        weight = model.embed_tokens.weight
        self.exit_cache = torch.empty(batch_size, max_drafts + 1, model.config.dim,
                                      dtype=weight.dtype, device=weight.device)

    def hidden(self, tokens, i, cache, positions):
        """The draft's hidden state (B, dim) for tokens (B,) at positions, the i-th of this
        round, before the shared head."""
        h = self.model.run_layers(self.model.embed_tokens(tokens[:, None]), self.draft_layers,
                                  cache, positions)[:, 0]
        self.exit_cache[:len(h), i] = h  # the batch shrinks as rows finish
        return h

    def verify(self, last_draft, k, cache, cache_seqlens):
        """Full-model logits (B, k + 1, vocab) at positions p .. p + k."""
        self.hidden(last_draft, k, cache, cache_seqlens + k)
        layers = range(self.exit_layer, self.model.config.n_layers)
        pending = self.exit_cache[:len(last_draft), :k + 1]
        h = self.model.run_layers(pending, layers, cache, cache_seqlens)
        return self.model.head(h)


class SkipDraft:
    """Unified layer skipping as the draft: the kept layers draft; verification recomputes
    every layer on the k + 1 pending positions (the draft's hidden states differ)."""

    def __init__(self, model, kept_layers):
        self.model, self.draft_layers = model, kept_layers
        self.pending = None

    def hidden(self, tokens, i, cache, positions):
        self.pending = [tokens] if i == 0 else self.pending + [tokens]
        h = self.model.embed_tokens(tokens[:, None])
        return self.model.run_layers(h, self.draft_layers, cache, positions)[:, 0]

    def verify(self, last_draft, k, cache, cache_seqlens):
        tokens = torch.stack(self.pending + [last_draft], dim=1)
        return logits_of(self.model, tokens, range(self.model.config.n_layers), cache,
                         cache_seqlens)


def accept(drafts, draft_probs, logits, sampling, generator):
    """Accepted draft count m (B,) and the full model's next token (B,).

    Greedy: accept the longest prefix where the full model's argmax equals the draft, then
    take the full model's token. Sampling: accept draft d_i with probability
    min(1, p(d_i) / q(d_i)); at the first rejection sample from norm(max(0, p - q)); if all k
    are accepted, sample the bonus token from p. This leaves the output distribution p.
    """
    temperature = sampling[0]
    B, k = drafts.shape
    if temperature == 0:
        m, next_token = greedy_rule(drafts, logits)
        return m.long(), next_token
    p = logits_to_probs(logits, *sampling)  # (B, k + 1, vocab)
    p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, k, generator=generator, device=drafts.device)
    m = (u * q_draft < p_draft).int().cumprod(-1).sum(-1)
    rows = torch.arange(B, device=drafts.device)
    target = p[rows, m]
    padded_q = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    residual = (target - padded_q[rows, m]).clamp_min(0)  # q = 0 past the drafts: p itself
    empty = residual.sum(-1, keepdim=True) == 0  # only when p == q, where nothing is rejected
    residual = torch.where(empty, target, residual)
    return m, torch.multinomial(residual, 1, generator=generator).squeeze(1)


def speculative_round(drafter, tokens, cache, cache_seqlens, num_speculations, sampling,
                      generator, confidence=None):
    """Draft up to num_speculations tokens after `tokens` (B,), verify them in one pass and
    accept: returns drafts (B, k), accepted counts m (B,) and the full model's next token (B,).
    With `confidence`, drafting stops once no row's draft is at least that sure."""
    model, drafts, draft_probs, current = drafter.model, [], [], tokens
    for i in range(num_speculations):
        h = drafter.hidden(current, i, cache, cache_seqlens + i)
        if sampling[0] == 0 and confidence is None:
            current = model.head_argmax(h)  # fused on a GPU: no full-vocabulary logits
        else:
            draft_logits = model.head(h)
            if sampling[0] == 0:
                current = draft_logits.argmax(-1)
            else:
                draft_probs.append(logits_to_probs(draft_logits, *sampling))
                current = torch.multinomial(draft_probs[-1], 1, generator=generator).squeeze(1)
        drafts.append(current)
        if confidence is not None and bool((draft_logits.softmax(-1).amax(-1) < confidence).all()):
            break
    drafts = torch.stack(drafts, dim=1)
    verify_logits = drafter.verify(current, drafts.shape[1], cache, cache_seqlens)
    draft_probs = torch.stack(draft_probs, dim=1) if draft_probs else None
    m, next_token = accept(drafts, draft_probs, verify_logits, sampling, generator)
    return drafts, m, next_token


def decode_self_speculative(model, cache, prompts, outputs, sampling, generator, drafter,
                            num_speculations, confidence=None):
    """The cache must hold num_speculations + 1 positions past the longest output."""
    logits, cache_seqlens = prefill(model, cache, prompts, range(model.config.n_layers))
    tokens = sample(logits, *sampling, generator)
    for row, token in enumerate(tokens.tolist()):
        outputs.extend(row, [token])
    stats = {"rounds": 0, "row_rounds": 0, "drafted": 0, "accepted": 0}
    rows = list(range(len(prompts)))
    while not all(outputs.done):
        rows, (tokens, cache_seqlens) = drop_finished(outputs, rows, cache, tokens, cache_seqlens)
        drafts, m, tokens = speculative_round(drafter, tokens, cache, cache_seqlens,
                                              num_speculations, sampling, generator, confidence)
        # The rollback: positions past p + m + 1 are stale, never read, later overwritten.
        cache_seqlens += (m + 1).int()
        k = drafts.shape[1]
        # One host sync per round: everything the host needs, in one transfer.
        emitted = torch.cat([drafts, tokens[:, None], m[:, None]], dim=1).tolist()
        for row, (*row_drafts, next_token, m_row) in zip(rows, emitted):
            outputs.extend(row, row_drafts[:m_row] + [next_token])
            stats["accepted"] += m_row
        stats["rounds"] += 1
        stats["row_rounds"] += len(rows)
        stats["drafted"] += k * len(rows)
    return stats
