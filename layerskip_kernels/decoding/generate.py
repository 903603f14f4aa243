"""`generate`: the one entry point of every decoding strategy, with its argument checks."""
import contextlib
import time
from dataclasses import dataclass, field

import torch

from ..ops._checks import as_float, as_int, fail
from .autoregressive import Batch, Outputs, decode_autoregressive, prefill
from .cpu import cpu_steps_refusal, torch_threads_idle
from .layer_skip import kept_layers
from .policy import AdaptivePolicy, FixedPolicy, candidate_exits, candidate_ks
from .self_speculative import ExitDraft, SkipDraft, decode_self_speculative
from .state import held_state, replayable
from .stop import StopStrings, check_stop, cut_at_stop, new_text

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
    texts: list[str] | None = None  # with a tokenizer: each row's new text, cut before a stop


def _is_array(value):
    """A tensor or a numpy array (anything with a dtype and a shape)."""
    return torch.is_tensor(value) or (hasattr(value, "dtype") and hasattr(value, "shape"))


def _as_tensor(arg, value, expected):
    """value as a tensor (a numpy array or nested lists become one), or a ValueError."""
    if torch.is_tensor(value):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):  # e.g. an array of Python objects
        fail(arg, expected, value)


def _integer_tensor(arg, value, dims):
    """A tensor (a numpy array becomes one) of integer ids with `dims` dims: no floats, whose
    ids would be truncated, and no bools, which would count as ids 0 and 1."""
    expected = ("a 2-D integer tensor (batch, length) or a list of id lists" if dims == 2
                else "a list, 1-D tensor or array of integer ids")
    t = _as_tensor(arg, value, expected)
    if t.dim() != dims or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        fail(arg, expected, f"{t.dtype} {tuple(t.shape)}")
    return t


def _ids(arg, row):
    """Token ids as a list of ints: a list or tuple of integers (numpy and torch integer
    scalars too), or a 1-D integer tensor or array."""
    if _is_array(row):
        return _integer_tensor(arg, row, 1).tolist()
    if not isinstance(row, (list, tuple)):
        fail(arg, "a list of token ids", row)
    if all(type(i) is int for i in row):  # the usual case, fast: a bool's type is bool
        return list(row)
    return [as_int(arg, i) for i in row]


def _prompt_lists(prompts, attention_mask):
    """Token-id lists from a list of id lists, or from a 2-D tensor (or array) of ids and its
    attention mask (1 = token, 0 = padding, on either side), as transformers' generate takes
    them."""
    if not _is_array(prompts):
        if attention_mask is not None:
            fail("attention_mask", "None when prompts are lists of ids", "a mask")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            fail("prompts", "a non-empty list of token-id lists", prompts)
        return [_ids(f"prompts[{i}]", row) for i, row in enumerate(prompts)]
    prompts = _integer_tensor("prompts", prompts, 2)
    if attention_mask is None:
        return prompts.tolist()
    mask = _as_tensor("attention_mask", attention_mask, "a tensor of 0s and 1s").cpu()
    if mask.shape != prompts.shape:
        fail("attention_mask", f"shape {tuple(prompts.shape)} (as prompts)", tuple(mask.shape))
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        fail("attention_mask", "only 0 (padding) and 1 (token)",
             f"values {sorted(set(mask.flatten().tolist()) - {0, 1})[:4]}")
    keep = mask.bool()
    # A row's tokens are one run: padding on either side, never between tokens.
    before = keep.int().cumsum(1)  # tokens up to each position
    holes = (~keep & (before > 0) & (before < keep.sum(1, keepdim=True))).nonzero()
    if len(holes):
        row, col = holes[0].tolist()
        fail(f"attention_mask[{row}]", "one run of 1s (padding on either side, never between "
             "tokens)", f"a 0 at position {col} between 1s")
    return [ids[k].tolist() for ids, k in zip(prompts.cpu(), keep)]


def _check_prompts(config, prompts, max_new_tokens, reserve):
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            fail(f"prompts[{i}]", "at least one token (BOS)", "an empty prompt")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            fail(f"prompts[{i}]", f"token ids in [0, {config.vocab_size})",
                  f"ids from {min(prompt)} to {max(prompt)}")
        if len(prompt) > config.max_seq_len:
            fail(f"prompts[{i}]", f"at most max_seq_len={config.max_seq_len} tokens",
                  f"{len(prompt)} tokens")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens + reserve > config.max_seq_len:
        fail("max_new_tokens", f"longest prompt ({longest}) + max_new_tokens + {reserve} "
              f"draft slots <= max_seq_len={config.max_seq_len}", max_new_tokens)


# The seeds torch.Generator.manual_seed takes, each its own state: it also takes [-2**63, 0),
# but maps a negative s to 2**64 + s, so -1 would silently be the seed 2**64 - 1.
SEED_RANGE = (0, 2**64 - 1)


def check_seed(seed):
    """None, or the seed as an int in SEED_RANGE."""
    return None if seed is None else as_int("seed", seed, *SEED_RANGE)


def check_sampling(temperature, top_k, top_p, seed):
    """(temperature, top_k, top_p, seed) as a finite float >= 0, an int >= 0, a float in (0, 1]
    and None or an int in SEED_RANGE."""
    return (as_float("temperature", temperature, "a finite number >= 0", lambda t: t >= 0),
            as_int("top_k", top_k, low=0),
            as_float("top_p", top_p, "a number in (0, 1]", lambda p: 0 < p <= 1),
            check_seed(seed))


def check_applicable(strategy, draft, temperature, given, name=lambda arg: arg):
    """An argument the decoding does not use is an error, not silently ignored; speedup is
    required where it is used. The one rule of generate() and of the CLI.

    given: {argument: value} for draft, exit_layer, num_speculations, speedup, top_k, top_p and
    seed, None where the caller left one unset. name(argument): how the caller spells an
    argument (the CLI: its flag)."""
    speculative = strategy == "self_speculative"
    drafted = (draft or "early_exit") if speculative else None
    context = f"{name('strategy')} {strategy}" + (f" {name('draft')} {drafted}"
                                                  if speculative else "")
    sampling = (temperature > 0, f"sampling ({name('temperature')} > 0)",
                f"greedy decoding ({name('temperature')} 0)")
    rules = {  # argument: (used, where it applies, what this call is)
        "draft": (speculative, f"{name('strategy')} self_speculative", context),
        "exit_layer": (strategy == "early_exit" or drafted == "early_exit",
                       f"{name('strategy')} early_exit, or self_speculative with "
                       f"{name('draft')} early_exit", context),
        "num_speculations": (speculative, f"{name('strategy')} self_speculative", context),
        "speedup": (strategy == "layer_skip" or drafted == "layer_skip",
                    f"{name('strategy')} layer_skip, or self_speculative with "
                    f"{name('draft')} layer_skip", context),
        "top_k": sampling, "top_p": sampling, "seed": sampling}
    for arg, value in given.items():
        used, where, actual = rules[arg]
        if value is not None and not used:
            raise ValueError(f"{name(arg)}: expected only with {where}, got {value!r} with "
                             f"{actual}")
    if rules["speedup"][0] and given.get("speedup") is None:
        raise ValueError(f"{name('speedup')}: expected a number >= 1 (required with {context}), "
                         "got None")


def stop_ids(config, eos_token_id):
    """The stop tokens as a set of ints: eos_token_id (an int; a list, tuple, tensor or array
    of them; [] for none), each in [0, vocab_size); the config's when None."""
    if eos_token_id is None:
        return set(config.eos_token_id)
    if _is_array(eos_token_id) and len(eos_token_id.shape) == 0:
        ids = [as_int("eos_token_id", eos_token_id)]
    elif _is_array(eos_token_id) or isinstance(eos_token_id, (list, tuple)):
        ids = _ids("eos_token_id", eos_token_id)
    else:
        ids = [as_int("eos_token_id", eos_token_id)]
    bad = [i for i in ids if not 0 <= i < config.vocab_size]
    if bad:
        fail("eos_token_id", f"token ids in [0, vocab_size={config.vocab_size})", bad[0])
    return set(ids)


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
    one autoregressive step), from the tokens per second the call's rounds measured; it
    starts at the model's recommendation. With it, num_speculations None lets the policy
    choose k per round too; an int fixes k; "auto" keeps its meaning (each round stops
    drafting when unsure, at most 8). stats["choices"] counts the rounds per choice,
    stats["stints"] lists them in order ((choice, rounds) pairs), stats["fallback_rounds"]
    counts the autoregressive ones, stats["policy_s"] the policy's time. Its choices follow
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
    c = model.config
    if strategy not in STRATEGIES:
        fail("strategy", f"one of {STRATEGIES}", strategy)
    if draft is not None and draft not in DRAFTS:
        fail("draft", f"None or one of {DRAFTS}", draft)
    temperature, top_k, top_p, seed = check_sampling(temperature, top_k, top_p, seed)
    check_applicable(strategy, draft, temperature, {
        "draft": draft, "exit_layer": exit_layer, "num_speculations": num_speculations,
        "speedup": speedup, "top_k": top_k or None, "top_p": None if top_p == 1 else top_p,
        "seed": seed})
    draft = draft or "early_exit"
    max_new_tokens = as_int("max_new_tokens", max_new_tokens, low=1)
    if stream is not None and not callable(stream):
        fail("stream", "None or a callable stream(row, tokens)", stream)
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        fail("cuda_graphs", "None, True or False", cuda_graphs)
    prompts = _prompt_lists(prompts, attention_mask)
    stop = check_stop(stop, tokenizer)
    stops = stop_ids(c, eos_token_id)
    all_layers = range(c.n_layers)
    confidence, reserve, defaulted, ks = None, 0, [], None
    adaptive = (strategy == "self_speculative" and isinstance(exit_layer, str)
                and exit_layer == "auto")
    if adaptive and num_speculations is None:  # the policy chooses k per round
        ks = candidate_ks(c.num_speculations, AUTO_DRAFT_CAP)
        num_speculations = max(ks)
    elif strategy == "self_speculative":
        if num_speculations is None:
            num_speculations = c.num_speculations
        if num_speculations is None:
            num_speculations = DEFAULT_NUM_SPECULATIONS
            defaulted.append("num_speculations")
        if isinstance(num_speculations, str) and num_speculations == "auto":
            num_speculations, confidence = AUTO_DRAFT_CAP, AUTO_CONFIDENCE
        try:
            num_speculations = as_int("num_speculations", num_speculations, low=1)
        except ValueError:
            fail("num_speculations", "an integer >= 1 or 'auto'", num_speculations)
        ks = [num_speculations]
    if strategy == "self_speculative":
        reserve = num_speculations + 1
    if not adaptive and (strategy == "early_exit"
                         or (strategy == "self_speculative" and draft == "early_exit")):
        exit_layer = c.exit_layer if exit_layer is None else exit_layer
        if exit_layer is None and strategy == "self_speculative" and c.n_layers > 1:
            exit_layer = default_exit_layer(c.n_layers)
            defaulted.append("exit_layer")
        exit_layer = as_int("exit_layer", exit_layer, 1, c.n_layers - 1)
    if strategy == "layer_skip" or (strategy == "self_speculative" and draft == "layer_skip"):
        speedup = as_float("speedup", speedup, "a finite number >= 1", lambda r: r >= 1)
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
        outputs = Outputs(len(prompts), stops, max_new_tokens, stream,
                          StopStrings(tokenizer, stop, prompts) if stop else None)
        batch = Batch(state, prompts, outputs, replay=graphs)
        prefill(model, batch.rows, prompts, prefill_layers, sampling, generator, state.cpu_steps)
        batch.emit([[t] for t in batch.rows.tokens.tolist()])
        prefill_s = time.perf_counter() - start
        before = (state.graphs.capture_s, state.graphs.replays)
        if strategy == "self_speculative":
            if adaptive:
                recommended = c.exit_layer and (
                    c.exit_layer, c.num_speculations if c.num_speculations in ks else max(ks))
                policy = AdaptivePolicy(lambda e: ExitDraft(model, e), c.n_layers,
                                        candidate_exits(c.n_layers, c.exit_layer), ks,
                                        recommended, confidence)
            else:
                policy = FixedPolicy(ExitDraft(model, exit_layer) if draft == "early_exit"
                                     else SkipDraft(model, kept_layers(c.n_layers, speedup)),
                                     num_speculations)
            stats = decode_self_speculative(model, batch, sampling, generator, policy,
                                            confidence)
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
                     exit_layer="auto" if adaptive else (
                         exit_layer if draft == "early_exit" else None),
                     num_speculations="auto" if confidence else (
                         "per round" if adaptive and len(ks) > 1 else num_speculations),
                     defaulted=defaulted)
    texts = None if tokenizer is None else [cut_at_stop(new_text(tokenizer, p, t), stop)
                                            for p, t in zip(prompts, tokens)]
    return GenerationResult(tokens, stats, texts)


def _graph_stats(model, state, before, graphs, temperature, confidence):
    """Which path ran: "cuda_graphs" is True when steps of this call replayed from CUDA graphs
    (before: the state's capture seconds and replay count when the call's decoding began)."""
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
        note = "eager: capture failed: " + "; ".join(g.notes.values())
    else:
        note = "cuda graphs"
    return {"cuda_graphs": replayed and note == "cuda graphs", "path": note,
            "capture_s": g.capture_s - before[0]}
