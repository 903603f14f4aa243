"""Self-speculative decoding: the model's own early layers (or a layer-skip subset) draft,
all layers verify the drafts in one pass, over one shared KV cache, for a ragged batch.

At the start of a round every layer holds valid KV for positions [0, p_b) of row b, and
token x[p_b] (already emitted, rows.tokens) is pending. A round:
  draft   k tokens, each through the draft layers at positions p_b .. p_b + k - 1;
  verify  positions p_b .. p_b + k with the remaining layers in one pass;
  accept  m_b drafts and one token from the full model;
  roll back by setting p_b += m_b + 1: KV past that is stale, never read, later overwritten.
"""
import time

import torch

from ..ops._checks import check
from ..ops.greedy_accept import greedy_rule
from .autoregressive import check_shadow, decode_autoregressive, decode_step, run_layers_split
from .sampling import logits_to_probs


class ExitDraft:
    """LayerSkip: draft with layers [0, E). Their KV for the drafted positions is reused by
    verification, and so are their outputs (the exit cache), so verification runs layers
    [0, E) only on the last draft and layers [E, L) on the k + 1 pending positions.

    `seen` (greedy_round's shadow exits, {exit: []}): the layers are split at each exit,
    whose hidden states are appended there, (n, 1, dim) per position below E and (n, k + 1,
    dim) once above: every layer's state at the round's positions, at no extra layer."""

    def __init__(self, model, exit_layer):
        self.model, self.exit_layer = model, exit_layer
        self.key = ("exit", exit_layer)  # what a captured round depends on

    def check_shadow(self, shadow, k, rows):
        check_shadow(shadow, range(self.model.config.n_layers), rows.emitted, k,
                     self.exit_layer)

    def hidden(self, tokens, i, rows, seen=None):
        """The draft's hidden state (n, dim) of tokens (n,), the i-th of this round (at
        positions p + i), before the shared head; kept in the exit cache."""
        model = self.model
        step = model.step(rows.cache, rows.cache_seqlens + i, 1)
        h = run_layers_split(model, model.embed_tokens(tokens[:, None]), range(self.exit_layer),
                             step, rows.cache, seen or (), seen)[:, 0]
        rows.exit_cache[:, i] = h
        return h

    def verify(self, last_draft, k, rows, seen=None):
        """Full-model hidden states (n, k + 1, dim) at positions p .. p + k."""
        self.hidden(last_draft, k, rows, seen)
        model = self.model
        step = model.step(rows.cache, rows.cache_seqlens, k + 1)
        return run_layers_split(model, rows.exit_cache[:, :k + 1],
                                range(self.exit_layer, model.config.n_layers), step, rows.cache,
                                seen or (), seen)


class SkipDraft:
    """Unified layer skipping as the draft: the kept layers draft; verification recomputes
    every layer on the k + 1 pending positions (the draft's hidden states differ)."""

    def __init__(self, model, kept_layers):
        self.model, self.draft_layers = model, kept_layers
        self.key = ("skip", tuple(kept_layers))

    def check_shadow(self, shadow, k, rows):
        check(not shadow, "shadow", "() with a layer-skip draft (its hidden states are not "
              "the full model's, and verification would run every layer again)", repr(shadow))

    def hidden(self, tokens, i, rows, seen=None):
        model = self.model
        step = model.step(rows.cache, rows.cache_seqlens + i, 1)
        return model.run_layers(model.embed_tokens(tokens[:, None]), self.draft_layers, step,
                                rows.cache)[:, 0]

    def verify(self, last_draft, k, rows, seen=None):
        model = self.model
        tokens = torch.cat([rows.tokens[:, None], rows.drafts[:, :k]], 1)  # last_draft included
        step = model.step(rows.cache, rows.cache_seqlens, k + 1)
        return model.run_layers(model.embed_tokens(tokens), range(model.config.n_layers), step,
                                rows.cache)


def finish_round(rows, k, accepted, next_token):
    """What the host reads (drafts, next token, accepted count), and the rollback: live rows
    advance by accepted + 1, so positions past that are stale, never read, later overwritten."""
    rows.emitted[:, :k] = rows.drafts[:, :k]
    rows.emitted[:, k] = next_token
    rows.emitted[:, k + 1] = accepted
    rows.cache_seqlens.add_(torch.where(rows.active, accepted + 1, 0).to(torch.int32))
    rows.tokens.copy_(next_token)


def greedy_round(drafter, rows, k, shadow=()):
    """Draft k tokens, verify them in one pass and accept on the device: the longest prefix
    of drafts equal to the full model's argmax, then the full model's token. No host sync:
    the round replays from a CUDA graph.

    shadow: exits (an ExitDraft's) whose tokens the shared head also reads at each of the
    k + 1 positions from the hidden states the round computes anyway (shadow tokens, DEL,
    arXiv 2504.05598), into rows.emitted as Rows describes: at a position whose input is
    the true prefix (up to the accepted count), exit s's token equals the full model's
    exactly where a draft from s would have been accepted."""
    drafter.check_shadow(shadow, k, rows)
    model, current, seen = drafter.model, rows.tokens, {s: [] for s in shadow}
    for i in range(k):
        current = model.head_argmax(drafter.hidden(current, i, rows, seen))
        rows.drafts[:, i] = current
    target = model.head_argmax(drafter.verify(current, k, rows, seen))  # (n, k + 1)
    accepted, next_token, _ = model.kernels.greedy_accept(rows.drafts[:, :k], target,
                                                          rows.cache_seqlens, rows.active)
    finish_round(rows, k, accepted, next_token)
    for j, s in enumerate(shadow):
        column = k + 2 + j * (k + 1)
        rows.emitted[:, column:column + k + 1] = model.head_argmax(torch.cat(seen[s], 1))


def accept(drafts, draft_probs, logits, sampling, generator):
    """Accepted draft count m (B,) and the full model's next token (B,), from the drafts
    (B, k), the draft's probabilities (B, k, vocab) (None when greedy) and the full model's
    logits (B, k + 1, vocab).

    Greedy: accept the longest prefix where the full model's argmax equals the draft, then
    take the full model's token. Sampling: accept draft d_i with probability
    min(1, p(d_i) / q(d_i)); at the first rejection sample from norm(max(0, p - q)); if all k
    are accepted, sample the bonus token from p. This leaves the output distribution p
    (Leviathan et al., 2023).
    """
    if sampling[0] == 0:
        m, next_token = greedy_rule(drafts, logits)
        return m.long(), next_token
    B, k = drafts.shape
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


def sampled_round(drafter, rows, k, sampling, generator, confidence=None):
    """A round that samples (temperature > 0), or drafts only while the draft is sure
    (`confidence`: stop once no row's draft has that probability); accepts with accept().
    Runs eagerly (host decisions, the sampler's generator). Returns the drafts made."""
    model, current, draft_probs = drafter.model, rows.tokens, []
    for i in range(k):
        logits = model.head(drafter.hidden(current, i, rows))
        if sampling[0] == 0:
            current = logits.argmax(-1)
        else:
            draft_probs.append(logits_to_probs(logits, *sampling))
            current = torch.multinomial(draft_probs[-1], 1, generator=generator).squeeze(1)
        rows.drafts[:, i] = current
        if confidence is not None and bool((logits.softmax(-1).amax(-1) < confidence).all()):
            k = i + 1
            break
    logits = model.head(drafter.verify(current, k, rows))  # (n, k + 1, vocab)
    draft_probs = torch.stack(draft_probs, dim=1) if draft_probs else None
    accepted, next_token = accept(rows.drafts[:, :k], draft_probs, logits, sampling, generator)
    finish_round(rows, k, accepted, next_token)
    return k


def shadow_agreement(emitted, live, k, shadow):
    """{exit: (hits, misses)} of a round's (or, k = 0, a step's) shadow tokens, from the
    host's copy of rows.emitted (Rows' layout): over each live row's positions 0..m (m its
    accepted count, the positions whose input was the true prefix), a hit where shadow[j]'s
    token equals the full model's (the accepted draft, then the next token)."""
    agreement = {}
    for j, s in enumerate(shadow):
        hits = positions = 0
        column = k + 2 + j * (k + 1)
        for i in live:
            row = emitted[i]
            m = row[k + 1]
            full = row[:m] + [row[k]]
            hits += sum(a == b for a, b in zip(row[column:column + m + 1], full))
            positions += m + 1
        agreement[s] = (hits, positions - hits)
    return agreement


def decode_self_speculative(model, batch, sampling, generator, policy, confidence=None):
    """Rounds until every row is done, each with the drafter and k that `policy` (policy.py)
    chooses, or, where it chooses no drafter, autoregressive steps of every layer (without
    shadows: the rest of the policy's stint of them at once, run by decode_autoregressive,
    so a policy that answers plain steps also has rounds_left() and record_steps()). Greedy
    fixed-k rounds and steps replay from CUDA graphs (on a CPU, one C++ call each, adaptive
    rounds too), rounds that sample or draft adaptively otherwise run eagerly. One host sync
    per round; the policy sees only what it brought back, and host timestamps.

    The policy may also name shadow exits: a greedy round or step heads them too, and the
    policy gets each one's agreement with the full model (shadow_agreement). Rounds that
    sample or draft adaptively ignore them (a sampled token is no argmax to agree with)."""
    stats = {"rounds": 0, "row_rounds": 0, "drafted": 0, "accepted": 0}
    greedy = sampling[0] == 0
    every_layer = tuple(range(model.config.n_layers))
    graphs, last = batch.state.graphs, time.perf_counter()
    while not all(batch.outputs.done):
        live = batch.compact()
        rows = batch.rows
        drafter, k, shadow = policy.choose()
        if not greedy or confidence is not None:
            shadow = ()
        tail = (shadow,) if shadow else ()  # a round's key with shadows names another graph
        captured = graphs.capture_s
        if drafter is None and not shadow:
            # The stint's plain steps, run as autoregressive decoding runs them, and told to
            # the policy at once: no bookkeeping per step (on a small model a step takes
            # ~0.1 ms, and a few microseconds of Python a step are a few percent).
            steps, row_steps = decode_autoregressive(model, batch, sampling, generator,
                                                     every_layer, policy.rounds_left() + 1)
            now = time.perf_counter()
            steady = stats["rounds"] and graphs.capture_s == captured
            policy.record_steps(steps, now - last if steady else None)
            last = now
            stats["rounds"] += steps
            stats["row_rounds"] += row_steps
            continue
        if drafter is None:  # a plain step that shadows (so greedy: shadow is () otherwise)
            step = lambda: decode_step(model, rows, every_layer, sampling,  # noqa: E731
                                       generator, shadow)
            batch.state.run(("step", rows.n, every_layer, shadow), step, batch.replay)
            k = 0
            emitted = rows.emitted[:, :2 + len(shadow)].tolist()  # the step's one host sync
            batch.emit([[row[0]] for row in emitted])
            accepted = [0] * len(live)
        else:
            key = ("round", rows.n, k, drafter.key, *tail)
            eager = lambda: sampled_round(drafter, rows, k, sampling, generator,  # noqa: E731
                                          confidence)
            if not greedy:
                k = eager()
            elif confidence is not None:
                k = batch.state.run_adaptive(key, confidence, eager)
            else:
                batch.state.run(key, lambda: greedy_round(drafter, rows, k, shadow),
                                batch.replay)
            # The round's one host sync.
            emitted = rows.emitted[:, :k + 2 + len(shadow) * (k + 1)].tolist()
            batch.emit([row[:row[k + 1]] + [row[k]] for row in emitted])
            accepted = [emitted[i][k + 1] for i in live]
        now = time.perf_counter()
        # Not a steady cost: the call's first round (its caches and threads cold), or a round
        # that captured a graph (its key's first run).
        steady = stats["rounds"] and graphs.capture_s == captured
        policy.record(accepted, now - last if steady else None, k,
                      shadow=shadow_agreement(emitted, live, k, shadow) if shadow else None)
        last = now
        stats["accepted"] += sum(accepted)
        stats["rounds"] += 1
        stats["row_rounds"] += len(live)
        stats["drafted"] += k * len(live)
    stats.update(policy.stats())
    return stats
