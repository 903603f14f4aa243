"""Plain decoding, one token per step, through all layers or up to an exit layer."""
import torch

from .sampling import sample


def prefill(model, cache, prompts, exit_layer=None):
    """Run the ragged prompts as one right-padded batch; return each row's last logits and
    its cache length. Padding writes cache slots past a row's length: they are never read
    and the next tokens overwrite them."""
    device = cache.k.device
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, device=device)
    cache_seqlens = torch.zeros_like(lengths)
    logits = model(tokens, cache, cache_seqlens, exit_layer=exit_layer)
    last = logits[torch.arange(len(prompts), device=device), lengths.long() - 1]
    return last, lengths


def decode_autoregressive(model, cache, prompts, max_new_tokens, stop, exit_layer=None,
                          temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """New tokens of each prompt; a row ends at a stop token (kept) or max_new_tokens."""
    logits, cache_seqlens = prefill(model, cache, prompts, exit_layer)
    outputs = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        tokens = sample(logits, temperature, top_k, top_p, generator)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                outputs[row].append(token)
        done |= stop(tokens)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = model(tokens[:, None], cache, cache_seqlens, exit_layer=exit_layer)[:, -1]
        cache_seqlens += 1
    return outputs, {}
