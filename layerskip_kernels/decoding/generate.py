"""`generate`: the one entry point of every decoding strategy: plan the call (plan.py: every
argument checked and resolved before any work), prefill, decode, report."""
import contextlib
import time
from dataclasses import dataclass, field

import torch

from .autoregressive import Batch, Outputs, decode_autoregressive, prefill
from .cpu import cpu_steps_refusal, torch_threads_idle
from .plan import plan_generation
from .self_speculative import decode_self_speculative
from .state import held_state, replayable
from .stop import StopStrings, cut_at_stop, new_text
# Callers (the CLI, benchmark, sweep, eval) import these from here; they are defined with the
# argument checks (arguments.py) and the defaults (plan.py) they belong to.
from .arguments import SEED_RANGE, check_applicable, check_seed, stop_ids  # noqa: F401
from .plan import (AUTO_DRAFT_CAP, DEFAULT_NUM_SPECULATIONS, STRATEGIES,  # noqa: F401
                   default_exit_layer)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each prompt
    stats: dict = field(default_factory=dict)
    texts: list[str] | None = None  # with a tokenizer: each row's new text, cut before a stop


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=128, strategy="autoregressive", exit_layer=None,
             num_speculations=None, speedup=None, temperature=0.0, top_k=0, top_p=1.0,
             seed=None, eos_token_id=None, draft=None, stream=None, cuda_graphs=None,
             attention_mask=None, stop=None, tokenizer=None):
    """Generate up to max_new_tokens for each prompt: a ragged batch of token-id lists, or a
    2-D tensor of ids with an optional attention_mask (1 = token, 0 = padding).

    strategy:
      "autoregressive"    all layers, one token per step;
      "early_exit"        layers [0, exit_layer), then the shared head (lossy);
      "layer_skip"        Unified Layer Skipping for a target `speedup` >= 1: the prompt
                          runs every layer, decoding a fixed, evenly spread subset (lossy);
      "self_speculative"  draft num_speculations tokens (an int, or "auto": stop a round's
                          drafting when the draft is unsure, at most 8) with layers
                          [0, exit_layer) (draft="early_exit", the default) or the layer-skip
                          subset for `speedup` (draft="layer_skip"), verify them with all
                          layers in one pass; lossless: the output is that of "autoregressive".
    exit_layer and num_speculations default to the model's recommendation (config); for
    self_speculative on a model without one, to a quarter of the depth and k = 4 (stats list
    what was defaulted). exit_layer="auto" (self_speculative, draft early_exit): a policy
    (decoding/policy.py) chooses each round's exit layer, and whether to draft at all (else
    one autoregressive step), from the tokens per second the call's rounds measured and
    each exit's agreement with the full model (shadow tokens); it starts where the model's
    last such call with as many prompts ended (stats["recalled"]), else at the model's
    recommendation. With it, num_speculations None lets the policy
    choose k per round too; an int fixes k; "auto" keeps its meaning (each round stops
    drafting when unsure, at most 8). stats["choices"] counts the rounds per choice,
    stats["stints"] lists them in order ((choice, rounds) pairs), stats["fallback_rounds"]
    counts the autoregressive ones, stats["shadow_rounds"] the shadowed ones,
    stats["policy_s"] the policy's time. Its choices follow
    timings: when sampling, a seed's tokens may differ between runs (each is drawn from the
    exact distribution).
    temperature 0 is greedy; otherwise top_k (0 = off) and top_p filter the distribution.
    A row stops after a token of eos_token_id (an int, or a list, tensor or array of them;
    default: the model config's), which is kept in its output. stop: a string or list of
    strings (needs `tokenizer`): a row also ends after the token that completes one in its new
    text (a stop may span tokens), which is kept in its tokens; res.texts (with a tokenizer)
    are the new text of each row, cut before its first stop (excluded, as vLLM's `stop`).
    stream(row, tokens), if given, is called with each row's tokens as they are accepted.
    cuda_graphs: None replays captured steps on CUDA, eagerly elsewhere; False always runs
    eagerly (stats["cuda_graphs"] says which ran).

    Every argument is checked before any work, each error a ValueError naming it: integers
    are ints or numpy / torch integer scalars (never a bool, never a float such as 8.0),
    numbers are finite, and an argument the decoding does not use (draft, exit_layer,
    num_speculations or speedup for another strategy; top_k other than 0, top_p other than 1
    or a seed with temperature 0) is an error, not silently ignored.
    """
    plan = plan_generation(model.config, prompts, max_new_tokens, strategy, exit_layer,
                           num_speculations, speedup, temperature, top_k, top_p, seed,
                           eos_token_id, draft, stream, cuda_graphs, attention_mask, stop,
                           tokenizer)
    prompts, stop, greedy = plan.prompts, plan.stop, plan.temperature == 0
    device = model.embed_tokens.weight.device
    generator = _generator(model, device, plan)
    graphs = plan.cuda_graphs is not False and replayable(device)
    start = time.perf_counter()
    # Greedy decoding on a CPU is C++ calls end to end; sampling interleaves torch ops.
    threads = torch_threads_idle(model) if greedy else contextlib.nullcontext()
    with threads, held_state(model, len(prompts), max(len(p) for p in prompts)
                             + plan.max_new_tokens + plan.reserve, max(plan.reserve - 1, 0),
                             graphs) as state:
        outputs = Outputs(len(prompts), plan.stop_ids, plan.max_new_tokens, stream,
                          StopStrings(tokenizer, stop, prompts) if stop else None)
        batch = Batch(state, prompts, outputs, replay=graphs)
        prefill(model, batch.rows, prompts, plan.prefill_layers, plan.sampling, generator,
                state.cpu_steps)
        batch.emit([[t] for t in batch.rows.tokens.tolist()])
        prefill_s = time.perf_counter() - start
        before = (state.graphs.capture_s, state.graphs.replays, state.graphs.evictions)
        if plan.strategy == "self_speculative":
            policy = plan.policy(model, len(prompts))
            stats = decode_self_speculative(model, batch, plan.sampling, generator, policy,
                                            plan.confidence)
            plan.remember(model, len(prompts), policy)
        else:
            decode_autoregressive(model, batch, plan.sampling, generator, plan.decode_layers)
            stats = {}
        stats.update(_graph_stats(model, state, before, graphs, plan.temperature,
                                  plan.confidence))
    elapsed = time.perf_counter() - start
    tokens = outputs.tokens
    new_tokens = sum(len(t) for t in tokens)
    # Prefill gives each row its first token; the rest come from decoding, which alone
    # (less any graph capture it paid for) is what a longer output pays per token.
    decode_s = elapsed - prefill_s - stats["capture_s"]
    stats.update(strategy=plan.strategy, new_tokens=new_tokens, time_s=elapsed,
                 prefill_s=prefill_s, tokens_per_s=new_tokens / elapsed,
                 decode_tokens_per_s=(new_tokens - len(prompts)) / decode_s
                 if new_tokens > len(prompts) else None)
    if plan.strategy == "self_speculative":
        stats.update(acceptance_rate=stats["accepted"] / max(stats["drafted"], 1),
                     tokens_per_round=(stats["accepted"] + stats["row_rounds"])
                     / max(stats["row_rounds"], 1))
    stats.update(plan.stats())
    texts = None if tokenizer is None else [cut_at_stop(new_text(tokenizer, p, t), stop)
                                            for p, t in zip(prompts, tokens)]
    return GenerationResult(tokens, stats, texts)


def _generator(model, device, plan):
    """The call's random generator: seeded with the plan's seed; when sampling without one,
    under tensor parallelism with rank 0's (ranks must draw alike), else a fresh seed."""
    seed = plan.seed
    if seed is None and plan.temperature > 0 and hasattr(model, "shared_seed"):
        seed = model.shared_seed()
    generator = torch.Generator(device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    return generator


def _graph_stats(model, state, before, graphs, temperature, confidence):
    """Which path ran: "cuda_graphs" is True when steps of this call replayed from CUDA graphs;
    capture_s and graph_evictions are this call's (a key evicted, state.MAX_GRAPHS, is
    captured again on its next use). before: the state's capture seconds, replay and eviction
    counts when the call's decoding began."""
    g = state.graphs
    replayed = g.replays > before[1]
    on_cpu = model.embed_tokens.weight.device.type == "cpu"
    if state.cpu_steps is not None and state.cpu_steps.calls:
        note = "cpu: one C++ call per greedy step or round"
    elif on_cpu and not replayable(state.tokens.device):
        why = cpu_steps_refusal(model) or (
            "sampling: Python steps over the C++ layers (whole C++ steps are greedy)"
            if temperature > 0
            else "no decode step ran")
        note = f"eager: {why}"
    elif not graphs:
        note = ("eager: not on a CUDA device" if not replayable(state.tokens.device)
                else "eager: cuda_graphs=False")
    elif temperature > 0:
        note = "eager: sampling runs eagerly (a seed stays reproducible)"
    elif confidence is not None:
        note = "eager: an adaptive draft length decides on the host"
    elif g.notes:
        note = "eager: capture failed: " + "; ".join(g.notes)
    else:
        note = "cuda graphs"
    return {"cuda_graphs": replayed and note == "cuda graphs", "path": note,
            "capture_s": g.capture_s - before[0], "graph_evictions": g.evictions - before[2]}
