"""generate()'s arguments checked one by one, each error a ValueError naming the argument:
prompts (lists, tensors or arrays of ids, with an attention mask), sampling, seed, stop ids,
and the rule that an argument the decoding does not use is an error."""
import torch

from ..ops._checks import as_float, as_int, fail


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


def prompt_lists(prompts, attention_mask):
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


def check_prompts(config, prompts, max_new_tokens, reserve):
    """Each prompt has tokens, all in the vocabulary, within max_seq_len, and the longest
    leaves room for max_new_tokens and `reserve` draft slots."""
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
