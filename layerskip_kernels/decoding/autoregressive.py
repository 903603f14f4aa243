"""Plain decoding, one token per step, through all layers, an exit layer or a skip set."""
import torch

from .sampling import sample


def logits_of(model, tokens, layers, cache, cache_seqlens):
    """Logits (B, S, vocab) of tokens (B, S) through `layers`, then the shared head."""
    return model.head(model.run_layers(model.embed_tokens(tokens), layers, cache, cache_seqlens))


def prefill(model, cache, prompts, layers):
    """Run the ragged prompts as one right-padded batch; return each row's last logits and
    its cache length. Padding writes cache slots past a row's length: they are never read
    and the next tokens overwrite them."""
    device = cache.k.device
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, device=device)
    logits = logits_of(model, tokens, layers, cache, torch.zeros_like(lengths))
    last = logits[torch.arange(len(prompts), device=device), lengths.long() - 1]
    return last, lengths


class Outputs:
    """The new tokens of each row, and which rows are finished: a row ends after a stop
    token (kept) or at max_new_tokens. `stream(row, tokens)` sees tokens as they are kept."""

    def __init__(self, batch_size, stop_ids, max_new_tokens, stream=None):
        self.tokens = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.stop_ids, self.max_new_tokens, self.stream = stop_ids, max_new_tokens, stream

    def extend(self, row, new_tokens):
        if self.done[row]:
            return
        out, start = self.tokens[row], len(self.tokens[row])
        for token in new_tokens:
            out.append(token)
            if token in self.stop_ids or len(out) >= self.max_new_tokens:
                self.done[row] = True
                break
        if self.stream:
            self.stream(row, out[start:])


def drop_finished(outputs, rows, cache, *per_row):
    """Remove the rows that finished from the batch (rows[i] is batch row i's prompt index):
    the cache and each per-row tensor shrink, so finished rows stop costing work."""
    keep = [i for i, row in enumerate(rows) if not outputs.done[row]]
    if len(keep) == len(rows):
        return rows, per_row
    index = torch.tensor(keep, dtype=torch.long, device=cache.k.device)
    cache.keep_rows(index)
    return [rows[i] for i in keep], tuple(t[index] for t in per_row)


def decode_autoregressive(model, cache, prompts, outputs, sampling, generator, prefill_layers,
                          decode_layers):
    """Early exit runs layers [0, E) throughout; layer skipping prefills with every layer and
    decodes with its skip set."""
    logits, cache_seqlens = prefill(model, cache, prompts, prefill_layers)
    rows = list(range(len(prompts)))
    while True:
        tokens = sample(logits, *sampling, generator)
        for row, token in zip(rows, tokens.tolist()):
            outputs.extend(row, [token])
        if all(outputs.done):
            return {}
        rows, (tokens, cache_seqlens) = drop_finished(outputs, rows, cache, tokens, cache_seqlens)
        logits = logits_of(model, tokens[:, None], decode_layers, cache, cache_seqlens)[:, -1]
        cache_seqlens += 1
