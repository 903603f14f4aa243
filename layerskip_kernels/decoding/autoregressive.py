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


def extend(output, new_tokens, stop_ids, max_new_tokens):
    """Append new tokens to a row's output up to a stop token (kept) or the length limit;
    True when the row is finished."""
    for token in new_tokens:
        output.append(token)
        if token in stop_ids or len(output) >= max_new_tokens:
            return True
    return False


def decode_autoregressive(model, cache, prompts, max_new_tokens, stop_ids, sampling, generator,
                          prefill_layers, decode_layers):
    """New tokens of each prompt; a row ends at a stop token (kept) or max_new_tokens.
    Early exit runs layers [0, E) throughout; layer skipping prefills with every layer and
    decodes with its skip set."""
    logits, cache_seqlens = prefill(model, cache, prompts, prefill_layers)
    outputs = [[] for _ in prompts]
    done = [False] * len(prompts)
    while True:
        tokens = sample(logits, *sampling, generator)
        for row, token in enumerate(tokens.tolist()):
            done[row] = done[row] or extend(outputs[row], [token], stop_ids, max_new_tokens)
        if all(done):
            break
        logits = logits_of(model, tokens[:, None], decode_layers, cache, cache_seqlens)[:, -1]
        cache_seqlens += 1
    return outputs, {}
