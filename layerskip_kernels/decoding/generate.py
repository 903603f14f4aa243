"""`generate`: the one entry point of every decoding strategy, with its argument checks."""
import time
from dataclasses import dataclass, field

import torch

from .autoregressive import decode_autoregressive

STRATEGIES = ("autoregressive", "early_exit")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each prompt
    stats: dict = field(default_factory=dict)


def _check_generate(model, prompts, max_new_tokens, strategy, exit_layer, temperature, top_k,
                    top_p):
    c = model.config
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}]: expected at least one token (BOS), got an empty prompt")
        if min(prompt) < 0 or max(prompt) >= c.vocab_size:
            raise ValueError(f"prompts[{i}]: expected token ids in [0, {c.vocab_size}), got "
                             f"ids from {min(prompt)} to {max(prompt)}")
        if len(prompt) > c.max_seq_len:
            raise ValueError(f"prompts[{i}]: expected at most max_seq_len={c.max_seq_len} "
                             f"tokens, got {len(prompt)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > c.max_seq_len:
        raise ValueError(f"max_new_tokens: the longest prompt ({longest}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds max_seq_len={c.max_seq_len}")
    if strategy == "early_exit" and (exit_layer is None or not 1 <= exit_layer <= c.n_layers - 1):
        raise ValueError(f"exit_layer: expected an integer in [1, {c.n_layers - 1}], got {exit_layer}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k: expected >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")


def _stop_tokens(model, eos_token_id):
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    device = model.embed_tokens.weight.device
    table = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    table[ids] = True
    return lambda tokens: table[tokens]


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=128, strategy="autoregressive", exit_layer=None,
             num_speculations=None, speedup=None, temperature=0.0, top_k=0, top_p=1.0,
             seed=None, eos_token_id=None):
    """Generate up to max_new_tokens for each prompt (a ragged batch of token-id lists).

    strategy: "autoregressive" (all layers) or "early_exit" (layers [0, exit_layer), then the
    shared head). temperature 0 is greedy; otherwise top_k (0 = off) and top_p filter the
    distribution. A row stops after emitting a token of eos_token_id (an int or a list;
    default: the model config's), which is kept in its output.
    """
    _check_generate(model, prompts, max_new_tokens, strategy, exit_layer, temperature, top_k,
                    top_p)
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
    start = time.perf_counter()
    tokens, stats = decode_autoregressive(
        model, cache, prompts, max_new_tokens, _stop_tokens(model, eos_token_id),
        exit_layer=exit_layer if strategy == "early_exit" else None,
        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    elapsed = time.perf_counter() - start
    new_tokens = sum(len(t) for t in tokens)
    stats.update(strategy=strategy, new_tokens=new_tokens, time_s=elapsed,
                 tokens_per_s=new_tokens / elapsed)
    return GenerationResult(tokens, stats)
