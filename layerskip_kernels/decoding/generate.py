"""`generate`: the one entry point of every decoding strategy, with its argument checks."""
import contextlib
import time
from dataclasses import dataclass, field

import torch

from ..ops._checks import fail
from .autoregressive import Batch, Outputs, decode_autoregressive, prefill
from .cpu import cpu_steps_refusal, torch_threads_idle
from .layer_skip import kept_layers
from .self_speculative import ExitDraft, SkipDraft, decode_self_speculative
from .state import held_state, replayable

STRATEGIES = ("autoregressive", "early_exit", "self_speculative", "layer_skip")
DRAFTS = ("early_exit", "layer_skip")
AUTO_DRAFT_CAP = 8  # num_speculations="auto": the longest a round may draft
AUTO_CONFIDENCE = 0.5  # ... and it stops once no row's draft is this sure of its token
DEFAULT_NUM_SPECULATIONS = 4  # self_speculative on a model that recommends no k


def default_exit_layer(n_layers):
    """self_speculative's exit layer on a model that recommends none: a quarter of the depth."""
    return max(1, n_layers // 4)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each prompt
    stats: dict = field(default_factory=dict)


def _prompt_lists(prompts, attention_mask):
    """Token-id lists from a list of lists, or from a 2-D tensor of ids and its attention mask
    (1 = token, 0 = padding, on either side), as transformers' generate takes them."""
    if not torch.is_tensor(prompts):
        if attention_mask is not None:
            fail("attention_mask", "None when prompts are lists of ids", "a mask")
        return prompts
    if prompts.dim() != 2 or prompts.dtype not in (torch.int32, torch.int64):
        fail("prompts", "a 2-D integer tensor (batch, length) or a list of id lists",
             f"{prompts.dtype} {tuple(prompts.shape)}")
    if attention_mask is None:
        return prompts.tolist()
    if attention_mask.shape != prompts.shape:
        fail("attention_mask", f"shape {tuple(prompts.shape)} (as prompts)",
             tuple(attention_mask.shape))
    return [row[keep].tolist() for row, keep in zip(prompts.cpu(), attention_mask.cpu().bool())]


def _check_prompts(config, prompts, max_new_tokens, reserve):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        fail("prompts", "a non-empty list of token-id lists", prompts)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            fail(f"prompts[{i}]", "at least one token (BOS)", "an empty prompt")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            fail(f"prompts[{i}]", f"token ids in [0, {config.vocab_size})",
                  f"ids from {min(prompt)} to {max(prompt)}")
        if len(prompt) > config.max_seq_len:
            fail(f"prompts[{i}]", f"at most max_seq_len={config.max_seq_len} tokens",
                  f"{len(prompt)} tokens")
    if max_new_tokens < 1:
        fail("max_new_tokens", ">= 1", max_new_tokens)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens + reserve > config.max_seq_len:
        fail("max_new_tokens", f"longest prompt ({longest}) + max_new_tokens + {reserve} "
              f"draft slots <= max_seq_len={config.max_seq_len}", max_new_tokens)


def _check_sampling(temperature, top_k, top_p):
    if temperature < 0:
        fail("temperature", ">= 0", temperature)
    if top_k < 0:
        fail("top_k", ">= 0 (0 = off)", top_k)
    if not 0 < top_p <= 1:
        fail("top_p", "a value in (0, 1]", top_p)


def _check_exit_layer(config, exit_layer):
    if not isinstance(exit_layer, int) or not 1 <= exit_layer <= config.n_layers - 1:
        fail("exit_layer", f"an integer in [1, {config.n_layers - 1}]", exit_layer)


def _check_speedup(speedup):
    if not isinstance(speedup, (int, float)) or speedup < 1:
        fail("speedup", "a number >= 1", speedup)


def _check_applicable(strategy, draft, exit_layer, num_speculations, speedup):
    """An argument the strategy does not use is an error, not silently ignored."""
    uses_exit = strategy == "early_exit" or (strategy == "self_speculative"
                                            and draft == "early_exit")
    uses_speedup = strategy == "layer_skip" or (strategy == "self_speculative"
                                               and draft == "layer_skip")
    for name, value, used in (("exit_layer", exit_layer, uses_exit),
                              ("num_speculations", num_speculations,
                               strategy == "self_speculative"),
                              ("speedup", speedup, uses_speedup)):
        if value is not None and not used:
            fail(name, f"None with strategy={strategy!r}"
                 + (f" and draft={draft!r}" if strategy == "self_speculative" else ""), value)


def _stop_ids(model, eos_token_id):
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=128, strategy="autoregressive", exit_layer=None,
             num_speculations=None, speedup=None, temperature=0.0, top_k=0, top_p=1.0,
             seed=None, eos_token_id=None, draft="early_exit", stream=None, cuda_graphs=None,
             attention_mask=None):
    """Generate up to max_new_tokens for each prompt: a ragged batch of token-id lists, or a
    2-D tensor of ids with an optional attention_mask (1 = token, 0 = padding).

    strategy:
      "autoregressive"    all layers, one token per step;
      "early_exit"        layers [0, exit_layer), then the shared head (lossy);
      "layer_skip"        Unified Layer Skipping for a target `speedup` >= 1: the prompt
                          runs every layer, decoding a fixed, evenly spread subset (lossy);
      "self_speculative"  draft num_speculations tokens (an int, or "auto": stop a round's
                          drafting when the draft is unsure, at most 8) with layers
                          [0, exit_layer) (draft="early_exit") or the layer-skip subset for
                          `speedup` (draft="layer_skip"), verify them with all layers in one
                          pass; lossless: the output is that of "autoregressive".
    exit_layer and num_speculations default to the model's recommendation (config); for
    self_speculative on a model without one, to a quarter of the depth and k = 4 (stats list
    what was defaulted). An argument the strategy does not use is a ValueError.
    temperature 0 is greedy; otherwise top_k (0 = off) and top_p filter the distribution.
    A row stops after a token of eos_token_id (int or list; default: the model config's),
    which is kept in its output. stream(row, tokens), if given, is called with each row's
    tokens as they are accepted. cuda_graphs: None replays captured steps on CUDA, eagerly
    elsewhere; False always runs eagerly (stats["cuda_graphs"] says which ran).
    """
    c = model.config
    if strategy not in STRATEGIES:
        fail("strategy", f"one of {STRATEGIES}", strategy)
    if strategy == "self_speculative" and draft not in DRAFTS:
        fail("draft", f"one of {DRAFTS}", draft)
    _check_applicable(strategy, draft, exit_layer, num_speculations, speedup)
    _check_sampling(temperature, top_k, top_p)
    if cuda_graphs not in (None, True, False):
        fail("cuda_graphs", "None, True or False", cuda_graphs)
    prompts = _prompt_lists(prompts, attention_mask)
    all_layers = range(c.n_layers)
    confidence, reserve, defaulted = None, 0, []
    if strategy == "self_speculative":
        if num_speculations is None:
            num_speculations = c.num_speculations
        if num_speculations is None:
            num_speculations = DEFAULT_NUM_SPECULATIONS
            defaulted.append("num_speculations")
        if num_speculations == "auto":
            num_speculations, confidence = AUTO_DRAFT_CAP, AUTO_CONFIDENCE
        if not isinstance(num_speculations, int) or num_speculations < 1:
            fail("num_speculations", "an integer >= 1 or 'auto'", num_speculations)
        reserve = num_speculations + 1
    if strategy == "early_exit" or (strategy == "self_speculative" and draft == "early_exit"):
        exit_layer = c.exit_layer if exit_layer is None else exit_layer
        if exit_layer is None and strategy == "self_speculative" and c.n_layers > 1:
            exit_layer = default_exit_layer(c.n_layers)
            defaulted.append("exit_layer")
        _check_exit_layer(c, exit_layer)
    if strategy == "layer_skip" or (strategy == "self_speculative" and draft == "layer_skip"):
        _check_speedup(speedup)
    _check_prompts(c, prompts, max_new_tokens, reserve)

    device = model.embed_tokens.weight.device
    if seed is None and temperature > 0 and hasattr(model, "shared_seed"):
        seed = model.shared_seed()  # tensor-parallel ranks must draw alike: rank 0's seed
    generator = torch.Generator(device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    sampling = (temperature, top_k, top_p)
    graphs = cuda_graphs is not False and replayable(device)
    prefill_layers = range(exit_layer) if strategy == "early_exit" else all_layers
    decode_layers = kept_layers(c.n_layers, speedup) if strategy == "layer_skip" else prefill_layers
    start = time.perf_counter()
    # Greedy decoding on a CPU is C++ calls end to end; sampling interleaves torch ops.
    threads = torch_threads_idle(model) if temperature == 0 else contextlib.nullcontext()
    with threads, held_state(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens
                             + reserve, max(reserve - 1, 0), graphs) as state:
        outputs = Outputs(len(prompts), _stop_ids(model, eos_token_id), max_new_tokens, stream)
        batch = Batch(state, prompts, outputs, replay=graphs)
        prefill(model, batch.rows, prompts, prefill_layers, sampling, generator, state.cpu_steps)
        batch.emit([[t] for t in batch.rows.tokens.tolist()])
        prefill_s = time.perf_counter() - start
        before = (state.graphs.capture_s, state.graphs.replays)
        if strategy == "self_speculative":
            drafter = (ExitDraft(model, exit_layer) if draft == "early_exit"
                       else SkipDraft(model, kept_layers(c.n_layers, speedup)))
            stats = decode_self_speculative(model, batch, sampling, generator, drafter,
                                            num_speculations, confidence)
        else:
            stats = decode_autoregressive(model, batch, sampling, generator, decode_layers)
        stats.update(_graph_stats(model, state, before, graphs, temperature, confidence))
    elapsed = time.perf_counter() - start
    tokens = outputs.tokens
    new_tokens = sum(len(t) for t in tokens)
    # Prefill gives each row its first token; the rest come from decoding, which alone
    # (less any graph capture it paid for) is what a longer output pays per token.
    decode_s = elapsed - prefill_s - stats["capture_s"]
    stats.update(strategy=strategy, new_tokens=new_tokens, time_s=elapsed, prefill_s=prefill_s,
                 tokens_per_s=new_tokens / elapsed,
                 decode_tokens_per_s=(new_tokens - len(prompts)) / decode_s
                 if new_tokens > len(prompts) else None)
    if strategy == "self_speculative":
        stats.update(acceptance_rate=stats["accepted"] / max(stats["drafted"], 1),
                     tokens_per_round=(stats["accepted"] + stats["row_rounds"])
                     / max(stats["row_rounds"], 1),
                     exit_layer=exit_layer if draft == "early_exit" else None,
                     num_speculations="auto" if confidence else num_speculations,
                     defaulted=defaulted)
    return GenerationResult(tokens, stats)


def _graph_stats(model, state, before, graphs, temperature, confidence):
    """Which path ran: "cuda_graphs" is True when steps of this call replayed from CUDA graphs
    (before: the state's capture seconds and replay count when the call's decoding began)."""
    g = state.graphs
    replayed = g.replays > before[1]
    on_cpu = model.embed_tokens.weight.device.type == "cpu"
    if state.cpu_steps is not None and state.cpu_steps.calls:
        note = "cpu: one C++ call per greedy step or round"
    elif on_cpu:
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
        note = "eager: capture failed: " + "; ".join(g.notes.values())
    else:
        note = "cuda graphs"
    return {"cuda_graphs": replayed and note == "cuda graphs", "path": note,
            "capture_s": g.capture_s - before[0]}
