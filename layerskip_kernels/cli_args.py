"""The command line's shared argument pieces: the usage error, the argument types, the flags
that library argument names stand for, and the options and subparsers every `layerskip`
command builds alike. cli.py and the command modules (benchmark, sweep, task_eval,
training/cli) import from here; this module imports no command module."""
import argparse
import math
import re

import torch

from .decoding.generate import SEED_RANGE, check_seed
from .ops.kernels import PREFERENCES
from .ops.llama_layer import MAX_THREADS, check_num_threads


class UsageError(ValueError):
    """A bad command line: exit status 2."""


# Library errors name Python arguments; on the command line they are these flags.
FLAGS = {"strategy": "--strategy", "draft": "--draft", "exit_layer": "--exit-layer",
         "num_speculations": "--num-speculations", "speedup": "--speedup",
         "max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
         "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed",
         "eos_token_id": "--eos-token-id", "dtype": "--dtype", "device": "--device",
         "backend": "--backend", "tp": "--tp"}


def as_flag(message):
    """'exit_layer: expected ...' -> '--exit-layer: expected ...', or None."""
    match = re.match(r"(\w+): ", message)
    if match and match.group(1) in FLAGS:
        return FLAGS[match.group(1)] + message[match.end(1):]
    return None


# -- argument types ---------------------------------------------------------------------------

def int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def exit_layer_arg(text):
    """--exit-layer: an integer >= 1, or 'auto' (self_speculative: a policy chooses per round)."""
    return text if text == "auto" else int_at_least(1)(text)


def threads_arg(text):
    """--threads: an integer in [1, the machine's logical CPUs] (llama_layer's bound)."""
    try:
        return check_num_threads(int(text), "--threads")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_THREADS}] (this "
                                         f"machine's logical CPUs), got {text!r}") from None


def float_in(low, high=float("inf"), low_open=False, what=None):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = (math.isfinite(value) and (low < value if low_open else low <= value)
              and value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what or f'a number >= {low}'}, "
                                             f"got {text!r}")
        return value
    return parse


def speculations(text):
    """A draft length k >= 1, or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")
    return value


# Names --dtype accepts; "auto" keeps the checkpoint's dtype (the loader resolves it).
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16", "auto": "auto"}


def dtype_arg(text):
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DTYPES)}, got {text!r}")
    return DTYPES[text.lower()]


def device_arg(text):
    """cpu, cuda or cuda:N, where this torch can use it (checked before anything loads)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"expected cpu: this torch ({torch.__version__}) has no usable CUDA device, "
                f"got {text!r}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1}, got {text!r}")
    return text


def seed_arg(text):
    """An integer seed in the range generate() takes (checked before anything loads)."""
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in {list(SEED_RANGE)}, "
                                         f"got {text!r}") from None


def eos_arg(text):
    """'none', or token ids separated by commas."""
    if text.strip().lower() == "none":
        return []
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected token ids >= 0 (comma list, repeatable) or "
                                         f"'none', got {text!r}")
    return ids


def stop_arg(text):
    """A stop string, with Python's backslash escapes read (--stop "\\n\\n": a blank line)."""
    try:
        stop = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected text with valid backslash escapes, got "
                                         f"{text!r} ({error.reason})") from None
    if not stop:
        raise argparse.ArgumentTypeError("expected a non-empty stop string, got ''")
    return stop


def parse_ints(text, arg):
    """A comma list of integers >= 1 (the exit layers and draft lengths of bench and sweep),
    else a UsageError naming `arg`."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{arg}: expected a comma list of integers >= 1, got {text!r}")
    return values


# -- options and subparsers the commands share ------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default, except where there is none or the text says it."""

    def _get_help_string(self, action):
        if (action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def add_model_args(p, backend=True):
    p.add_argument("--model", metavar="PATH", help="HF Llama directory or llama2.c .bin file "
                   "(default: the embedded LayerSkip-trained code model)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json, HF directory or llama2.c tokenizer .bin "
                   "(default: tokenizer.json beside the model, if any)")
    p.add_argument("--dtype", metavar="NAME", default="float32", type=dtype_arg,
                   help=f"weights dtype: {', '.join(DTYPES)} (auto: the checkpoint's)")
    p.add_argument("--device", metavar="DEVICE",
                   default="cpu", type=device_arg, help="cpu, cuda or cuda:N")
    if backend:
        p.add_argument("--backend", default="auto", choices=list(PREFERENCES),
                       help="kernel backend preference")


def add_debug(p):
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, print the traceback too")


def subparser(sub, name, help, description=None):
    """A `layerskip` subcommand: defaults shown in --help, --debug first."""
    p = sub.add_parser(name, help=help, description=description or help,
                       formatter_class=HelpFormatter)
    add_debug(p)
    return p
