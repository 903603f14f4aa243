"""What the `layerskip` commands check and load after parsing, alike: files named on the
command line, the tokenizer and the model, and what the loaded model rules out. Errors are
UsageErrors (exit status 2) or name the flag and file they are about. cli.py and the command
modules (benchmark, sweep, task_eval, training/cli) and the lm-eval adapter import from here;
this module imports no command module."""
from contextlib import contextmanager
from pathlib import Path

from .cli_args import UsageError, as_flag
from .decoding.generate import stop_ids
from .decoding.plan import draft_lengths
from .model import load_model, load_tokenizer
from .model.checkpoint import DEFAULT_MODEL, local_path, regular_file
from .model.tokenizer import Llama2cTokenizer
from .ops.llama_layer import set_num_threads


def require_file(path, flag):
    """A file named on the command line, to be read: a regular file (after symlinks), checked
    before it is opened, as a FIFO or a device would block the read or never end it."""
    try:
        regular_file(Path(path), flag)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None


@contextmanager
def reading(flag, path, flags=True):
    """An error while reading a file named on the command line names the flag and the file
    (flags: a library error naming a Python argument is about that argument's flag)."""
    try:
        yield
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as error:
        message = describe(error)
        if flags and isinstance(error, ValueError) and (flagged := as_flag(message)):
            raise UsageError(flagged) from error  # e.g. the loader's "dtype: expected ..."
        prefix = f"{flag}:" if str(path) in message else f"{flag} {path}:"
        raise RuntimeError(f"{prefix} {message}") from error


def describe(error):
    """One line: the message, with the exception's type where the message alone is unclear."""
    message = " ".join(str(error).split())
    if isinstance(error, KeyError):
        return f"missing key {message}"
    if isinstance(error, (ValueError, OSError, RuntimeError)) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def find_tokenizer(args):
    """(tokenizer, its path): --tokenizer, else a tokenizer.json in the model's directory (for
    a model id, its snapshot in the local HF cache), else (None, None)."""
    path = args.tokenizer
    if path is None:
        try:
            model = local_path(args.model or DEFAULT_MODEL)
        except (FileNotFoundError, ValueError):  # loading the model says what is wrong
            return None, None
        candidate = (model if model.is_dir() else model.parent) / "tokenizer.json"
        path = candidate if candidate.exists() else None
    if path is None:
        return None, None
    with reading("--tokenizer", path):
        return load_tokenizer(path), path


def load_model_arg(args):
    """load_model(--model, --dtype, --device, --backend), errors naming --model; with --tp N
    > 1, this rank's shard (the process group comes from torchrun's environment)."""
    with reading("--model", args.model or DEFAULT_MODEL):
        if getattr(args, "tp", 1) > 1:
            return load_model(args.model, dtype=args.dtype, device=args.device,
                              backend=args.backend, tp=args.tp)
        return load_model(args.model, dtype=args.dtype, device=args.device,
                          **({"backend": args.backend} if hasattr(args, "backend") else {}))


def load_tokenizer_and_model(args, missing_tokenizer=None):
    """The preamble of bench, sweep and eval, once their own arguments and files are checked:
    the tokenizer (unless missing_tokenizer is None; it is the error when none is found),
    then --threads, then the model. Returns (model, tokenizer, tokenizer_path)."""
    tokenizer, tokenizer_path = None, None
    if missing_tokenizer is not None:
        tokenizer, tokenizer_path = find_tokenizer(args)
        if tokenizer is None:
            raise UsageError(missing_tokenizer)
    if args.threads:
        set_num_threads(args.threads)
    return load_model_arg(args), tokenizer, tokenizer_path


def check_fits(model, tokenizer, tokenizer_path, prompts, labels, max_new_tokens, reserve=0,
               eos_token_id=None):
    """What the model alone can rule out, checked right after it loads and before any work:
    the tokenizer's vocabulary, every prompt's ids and length, room for max_new_tokens (and
    `reserve` draft slots) within max_seq_len, and the stop tokens."""
    c = model.config
    if tokenizer is not None and tokenizer.vocab_size > c.vocab_size:
        raise UsageError(f"--tokenizer {tokenizer_path}: its vocabulary ({tokenizer.vocab_size} "
                         f"tokens) is larger than the model's ({c.vocab_size}); expected the "
                         "model's own tokenizer")
    for prompt, label in zip(prompts, labels):
        bad = [i for i in prompt if not 0 <= i < c.vocab_size]
        if bad:
            raise UsageError(f"{label}: expected token ids in [0, {c.vocab_size}) for this "
                             f"model, got {bad[0]}")
        if len(prompt) > c.max_seq_len:
            raise UsageError(f"{label}: {len(prompt)} tokens, expected at most the model's "
                             f"max_seq_len ({c.max_seq_len})")
    longest, label = max((len(p), label) for p, label in zip(prompts, labels))
    room = c.max_seq_len - longest - reserve
    if room < 1:
        raise UsageError(f"{label}: {longest} tokens leave no room for new tokens within the "
                         f"model's max_seq_len ({c.max_seq_len}"
                         + (f", with {reserve} draft slots)" if reserve else ")"))
    if max_new_tokens > room:
        raise UsageError(f"--max-new-tokens: expected at most {room} (max_seq_len "
                         f"{c.max_seq_len} - {longest} tokens of {label}"
                         + (f" - {reserve} draft slots" if reserve else "")
                         + f"), got {max_new_tokens}")
    if eos_token_id is not None:
        stop_ids(c, eos_token_id)  # a ValueError naming eos_token_id: --eos-token-id


def check_decodes(model, tokenizer, tokenizer_path):
    """Commands that print text: the tokenizer can decode every id the model can emit (a
    smaller vocabulary would fail only after decoding), checked right after the model loads."""
    if tokenizer is not None and tokenizer.vocab_size < model.config.vocab_size:
        raise UsageError(f"--tokenizer {tokenizer_path}: its vocabulary ({tokenizer.vocab_size} "
                         f"tokens) is smaller than the model's ({model.config.vocab_size}), so "
                         "it cannot decode every token the model can emit; expected the "
                         "model's own tokenizer")


def check_exit_layer(model, exit_layer):
    L = model.config.n_layers
    if exit_layer not in (None, "auto") and not 1 <= exit_layer <= L - 1:
        raise UsageError(f"--exit-layer: expected an integer in [1, {L - 1}] for this "
                         f"{L}-layer model, got {exit_layer}")


def check_exit_layers(exit_layers, n_layers):
    """Every exit layer leaves at least one layer to verify: in [1, n_layers - 1]."""
    if max(exit_layers) >= n_layers:
        raise UsageError(f"--exit-layers: expected layers in [1, {n_layers - 1}], got "
                         f"{exit_layers}")


def stop_tokens(args, model, tokenizer):
    """--eos-token-id (flattened; [] = none), else the config's EOS (None: generate() reads
    it), else the tokenizer's EOS; a llama2.c tokenizer's BOS too, since llama2.c models mark
    the end of a text with the next text's BOS (run.c stops on it) and never emit EOS."""
    if args.eos_token_id is not None:
        if [] in args.eos_token_id and len(args.eos_token_id) > 1:
            raise UsageError("--eos-token-id: 'none' cannot be combined with token ids")
        return [i for ids in args.eos_token_id for i in ids]
    if model.config.eos_token_id:
        return None
    ids = [getattr(tokenizer, "eos_id", None)]
    if isinstance(tokenizer, Llama2cTokenizer):
        ids.append(tokenizer.bos_id)
    return [i for i in ids if i is not None] or None


def draft_slots(model, strategy, num_speculations, exit_layer=None):
    """The cache slots a self-speculative round reserves past the output: k + 1, k the
    longest draft generate() resolves (with --exit-layer auto and no k, the policy's)."""
    if strategy != "self_speculative":
        return 0
    return draft_lengths(model.config, num_speculations, exit_layer == "auto")[1] + 1
