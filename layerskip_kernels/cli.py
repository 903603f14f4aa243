"""The `layerskip` command (also `python -m layerskip_kernels`).

Errors are one line on stderr, `error: <what>`, naming the argument or file and what was
expected. Exit status: 0 done, 1 the run failed (an unreadable model or data file, an error
while running), 2 a bad command line (a value out of range, a flag the command cannot use, an
existing output file, a prompt the model cannot take), 130 interrupted. Arguments and output
paths are checked before the model loads where the model is not needed to check them, and
right after it loads otherwise. --debug prints the traceback as well.
"""
import argparse
import dataclasses
import json
import os
import sys
import traceback

import torch

from . import __version__
from .benchmark import compare, dtype_name
from .cli_args import (FLAGS, HelpFormatter, UsageError, add_model_args, as_flag, eos_arg,
                       exit_layer_arg, float_in, int_at_least, seed_arg, speculations, stop_arg,
                       subparser, threads_arg)
from .cli_checks import (check_decodes, check_exit_layer, check_fits, describe, draft_slots,
                         find_tokenizer, load_model_arg, stop_tokens)
from .decoding import generate
from .decoding.generate import DEFAULT_NUM_SPECULATIONS, STRATEGIES, check_applicable
from .files import OutputPathError
from .decoding.stop import new_text
from .ops.llama_layer import set_num_threads
from .model.parallel import is_first_rank

USAGE, FAILURE, INTERRUPTED = 2, 1, 130


# -- argument parsing -------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (the caller prints them) instead of usage + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


class _TopHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`layerskip --help`: the module docstring keeps its paragraphs."""


def _cuda_graphs(args):
    return False if args.no_cuda_graphs else None


# -- commands ---------------------------------------------------------------------------------

def _check_applicable(args):
    """A flag the chosen decoding does not use is an error (checked before anything loads):
    generate()'s rule, in flags."""
    try:
        check_applicable(args.strategy, args.draft, args.temperature, {
            "draft": args.draft, "exit_layer": args.exit_layer,
            "num_speculations": args.num_speculations, "speedup": args.speedup,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed},
            name=FLAGS.__getitem__)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.stream and args.json:
        raise UsageError("--stream: cannot be combined with --json (pick one output)")


def _prompts(args, tokenizer):
    """(prompts, labels): --prompt texts (tokenized), then --prompt-ids lists."""
    if args.prompt and tokenizer is None:
        raise UsageError("--prompt: needs a tokenizer: pass --tokenizer (or use --prompt-ids)")
    prompts, labels = [], []
    for n, text in enumerate(args.prompt or [], 1):
        prompts.append(tokenizer.encode(text))
        labels.append(f"--prompt {n}" if len(args.prompt) > 1 else "--prompt")
    for n, text in enumerate(args.prompt_ids or [], 1):
        label = f"--prompt-ids {n}" if len(args.prompt_ids) > 1 else "--prompt-ids"
        try:
            ids = [int(i) for i in text.replace(",", " ").split()]
        except ValueError:
            ids = []
        if not ids:
            raise UsageError(f"{label}: expected token ids separated by spaces, got {text!r}")
        prompts.append(ids)
        labels.append(label)
    for prompt, label in zip(prompts, labels):
        if not prompt:
            raise UsageError(f"{label}: encodes to no tokens (this tokenizer adds no BOS)")
    return prompts, labels


def cmd_generate(args):
    _check_applicable(args)
    if not (args.prompt or args.prompt_ids):
        raise UsageError("--prompt: give at least one --prompt or --prompt-ids")
    tokenizer, tokenizer_path = find_tokenizer(args)
    if args.stop and tokenizer is None:
        raise UsageError("--stop: needs a tokenizer to match stop strings: pass --tokenizer")
    prompts, labels = _prompts(args, tokenizer)
    model = load_model_arg(args)
    if args.strategy == "early_exit" and args.exit_layer is None and not model.config.exit_layer:
        raise UsageError(f"--exit-layer: required with --strategy early_exit (the model "
                         f"recommends none); expected an integer in [1, "
                         f"{model.config.n_layers - 1}]")
    check_exit_layer(model, args.exit_layer)
    check_decodes(model, tokenizer, tokenizer_path)
    eos = stop_tokens(args, model, tokenizer)
    check_fits(model, tokenizer, tokenizer_path, prompts, labels, args.max_new_tokens,
               draft_slots(model, args.strategy, args.num_speculations, args.exit_layer),
               eos)
    printing = is_first_rank()  # under --tp, every rank decodes and rank 0 prints
    stream = _Printer(tokenizer, prompts) if args.stream and printing else None
    result = generate(model, prompts, max_new_tokens=args.max_new_tokens, stream=stream,
                      strategy=args.strategy, exit_layer=args.exit_layer,
                      num_speculations=args.num_speculations, speedup=args.speedup,
                      temperature=args.temperature, top_k=args.top_k or 0,
                      top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed,
                      eos_token_id=eos, cuda_graphs=_cuda_graphs(args), stop=args.stop,
                      tokenizer=tokenizer, **({"draft": args.draft} if args.draft else {}))
    if not printing:
        return
    texts = result.texts or [None] * len(prompts)
    if stream:
        stream.close()
    elif args.json:
        outputs = [{"prompt": tokenizer.decode(p) if tokenizer else None, "prompt_tokens": p,
                    "tokens": t, "text": s} for p, t, s in zip(prompts, result.tokens, texts)]
        print(json.dumps({"outputs": outputs, "stats": result.stats}))
    else:
        for prompt, tokens, text in zip(prompts, result.tokens, texts):
            print(tokenizer.decode(prompt) + text if tokenizer else " ".join(map(str, tokens)))
    _print_stats(result.stats)


def _draft_settings(stats):
    """'exit layer E, k K' of a self-speculative run, saying which were defaults."""
    defaulted = stats.get("defaulted") or []
    parts = [] if stats.get("exit_layer") is None else [
        f"exit layer {stats['exit_layer']}" + (" (default)" if "exit_layer" in defaulted else "")]
    parts.append(f"k {stats['num_speculations']}"
                 + (" (default)" if "num_speculations" in defaulted else ""))
    text = ", ".join(parts)
    if defaulted:
        flags = " / ".join(FLAGS[name] for name in defaulted)
        text += f"; the model recommends none: choose with {flags}"
    return text


# Drafts accepted less often than this are "almost never" (draft_note).
NEAR_ZERO_ACCEPTANCE = 0.05


def draft_note(stats):
    """One line when a self-speculative run did not pay for its drafts, else None: the
    policy fell back to autoregressive steps in most rounds, or a fixed exit's drafts were
    almost never accepted (a model not trained for early exit at that layer)."""
    if stats.get("exit_layer") == "auto":
        if 2 * stats["fallback_rounds"] <= stats["rounds"]:
            return None
        return (f"note: the policy fell back to autoregressive steps in "
                f"{stats['fallback_rounds']} of {stats['rounds']} rounds: no exit's drafts "
                f"paid for their work (estimated acceptance per exit "
                f"{stats['exit_acceptance']})")
    if not stats["drafted"] or stats["acceptance_rate"] >= NEAR_ZERO_ACCEPTANCE:
        return None
    where = (f"exit layer {stats['exit_layer']}" if stats.get("exit_layer") is not None
             else "this draft")
    return (f"note: acceptance {stats['acceptance_rate']:.2f}: the model is not "
            f"LayerSkip-trained for {where}, so self-speculation only adds work; try "
            "--exit-layer auto, which falls back to autoregressive steps")


def _print_stats(stats):
    draft = (f" ({_draft_settings(stats)})" if stats["strategy"] == "self_speculative" else "")
    extra = (f", acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_round']:.2f} "
             "tokens/round" if "acceptance_rate" in stats else "")
    extra += f", per round: {_choices(stats)}" if "choices" in stats else ""
    decode = stats.get("decode_tokens_per_s")
    decode = "" if decode is None else f" ({decode:.1f} decoding alone)"
    print(f"[{stats['strategy']}{draft}: {stats['new_tokens']} tokens, "
          f"{stats['tokens_per_s']:.1f} tokens/s with prefill{decode}{extra}, {_path(stats)}]",
          file=sys.stderr)
    if stats["strategy"] == "self_speculative" and (note := draft_note(stats)) is not None:
        print(note, file=sys.stderr)


def _choices(stats):
    """The adaptive policy's rounds per choice, e.g. 'E3 k3 x40, autoregressive x2'."""
    return ", ".join(f"{name} x{n}" for name, n in stats["choices"].items())


def _path(stats):
    """How the steps ran: in a word or three, or eager with generate()'s why."""
    if stats.get("cuda_graphs"):
        return "CUDA graphs"
    path = str(stats.get("path", ""))
    return "C++ steps" if path.startswith("cpu") else path or "eager"


class _Printer:
    """--stream: each row's text as it is accepted (the stream callback of generate()). One
    prompt: its text, then the new text as it comes. Several: whole lines, each labelled
    "[row] ", so that rows never interleave mid-line or mid-word; a row's first line starts
    with its prompt, a line is printed once complete, a line longer than WRAP characters is
    broken at a space (so a row of prose shows before its end), and close() prints what
    each row has left. Without a tokenizer the ids print, not the prompt."""

    WRAP = 100

    def __init__(self, tokenizer, prompts):
        self.tokenizer, self.seen = tokenizer, [list(p) for p in prompts]
        self.many = len(prompts) > 1
        echo = [tokenizer.decode(p) if tokenizer else "" for p in prompts]
        self.pending = echo if self.many else [""]
        if self.many:
            for row in range(len(prompts)):
                self._lines(row)
        else:
            print(echo[0], end="", flush=True)

    def __call__(self, row, tokens):
        if self.tokenizer:
            before = self.tokenizer.decode(self.seen[row])
            self.seen[row] += tokens
            text = self.tokenizer.decode(self.seen[row])[len(before):]
        else:
            text = " ".join(map(str, tokens))
            text = " " + text if self.pending[row] or not self.many else text
        if not self.many:
            print(text, end="", flush=True)
            return
        self.pending[row] += text
        self._lines(row)

    def _lines(self, row):
        """Print the row's complete lines, and its long line up to its last space."""
        *lines, rest = self.pending[row].split("\n")
        while len(rest) > self.WRAP and (cut := rest.rfind(" ", 1, self.WRAP + 1)) > 0:
            lines.append(rest[:cut])
            rest = rest[cut + 1:]
        for line in lines:
            print(f"[{row}] {line}")
        self.pending[row] = rest
        sys.stdout.flush()

    def close(self):
        if not self.many:
            print()
            return
        for row, rest in enumerate(self.pending):
            if rest:
                print(f"[{row}] {rest}")


def cmd_compare(args):
    tokenizer, tokenizer_path = find_tokenizer(args)
    prompts, labels = _prompts(args, tokenizer)
    if args.threads:
        set_num_threads(args.threads)
    model = load_model_arg(args)
    if not prompts:
        bos = model.config.bos_token_id
        prompts = [tokenizer.encode("def fib(n):") if tokenizer else [bos or 0]]
        labels = ["the default prompt"]
    check_exit_layer(model, args.exit_layer)
    check_decodes(model, tokenizer, tokenizer_path)
    eos = stop_tokens(args, model, tokenizer)
    check_fits(model, tokenizer, tokenizer_path, prompts, labels, args.max_new_tokens,
               draft_slots(model, "self_speculative", args.num_speculations,
                           args.exit_layer), eos)
    from .benchmark import Progress
    with Progress(args.quiet) as progress:
        results, outputs = compare(model, prompts, args.max_new_tokens, args.repeats,
                                   args.warmup, cuda_graphs=_cuda_graphs(args),
                                   eos_token_id=eos, progress=progress,
                                   batch_size=args.batch_size, exit_layer=args.exit_layer,
                                   num_speculations=args.num_speculations)
    for row in results:
        print(f"== {row['name']} ==")
        for prompt, tokens in zip(prompts, outputs[row["name"]]):
            print(tokenizer.decode(prompt) + new_text(tokenizer, prompt, tokens) if tokenizer
                  else " ".join(map(str, tokens)))
    ar, spec = results
    print(f"identical outputs: {'yes' if spec['same_tokens_as_autoregressive'] else 'NO'}")
    print(f"self_speculative: {_draft_settings(spec)}, acceptance {spec['acceptance_rate']:.2f}, "
          f"{spec['tokens_per_round']:.2f} tokens/round" + (
              f"; per round: {_choices(spec)}" if "choices" in spec else ""))
    if (note := draft_note(spec)) is not None:
        print(note)
    print(f"autoregressive {ar['tokens_per_s']:.1f} tokens/s, self_speculative "
          f"{spec['tokens_per_s']:.1f} tokens/s: speedup "
          f"{spec['speedup_vs_ours_autoregressive']:.2f}x (ratio of medians over {args.repeats} "
          f"repeats; per-repeat {spec['speedup_vs_ours_autoregressive_min']:.2f}-"
          f"{spec['speedup_vs_ours_autoregressive_max']:.2f}x; "
          f"{_path(spec)})")


def cmd_info(args):
    model = load_model_arg(args)
    weights = {p.data_ptr(): p for p in model.parameters()}.values()  # tied weights once
    info = {"config": dataclasses.asdict(model.config),
            "parameters": sum(p.numel() for p in weights),
            "bytes": sum(p.numel() * p.element_size() for p in weights),
            "dtype": dtype_name(model.embed_tokens.weight.dtype),
            "device": str(model.embed_tokens.weight.device)}
    print(json.dumps(info, indent=2))


def cmd_bench(args):
    from .benchmark import main_bench
    return main_bench(args)


def cmd_lm_eval(args):
    from .integrations.lm_eval_model import main as lm_eval_main
    lm_eval_main([a for a in args.harness_args if a != "--debug"])


def cmd_sweep(args):
    from .sweep import main_sweep
    return main_sweep(args)


# -- the parser -------------------------------------------------------------------------------

def _add_decoding_args(p):
    p.add_argument("--prompt", metavar="TEXT",
                   action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", metavar="IDS", action="append",
                   help='token ids, e.g. "1 2 3" (repeatable)')
    p.add_argument("--max-new-tokens", metavar="N", type=int_at_least(1), default=128,
                   help="new tokens per prompt, at most")
    p.add_argument("--eos-token-id", metavar="IDS", action="append", type=eos_arg,
                   help="stop a row after this token: ids (comma list, repeatable) or 'none' "
                   "(default: the model config's EOS, else the tokenizer's)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every step eagerly (default: replay captured steps on CUDA)")


def _add_timing_args(p, repeats):
    """--repeats, --warmup, --threads, --batch-size: how compare, bench and sweep time their
    runs."""
    p.add_argument("--batch-size", metavar="N", type=int_at_least(1),
                   help="decode the prompts in batches of N (default: all in one batch; 1: "
                   "each prompt alone, as a single user would)")
    p.add_argument("--repeats", metavar="N",
                   type=int_at_least(1), default=repeats, help="timed runs of each")
    p.add_argument("--warmup", metavar="N",
                   type=int_at_least(0), default=1, help="untimed runs first")
    p.add_argument("--threads", metavar="N", type=threads_arg,
                   help="CPU threads of torch and of the C++ kernels (default: torch's choice, "
                   "one for the kernels; torch keeps one while the kernels' team decodes)")


def build_parser():
    parser = _Parser(prog="layerskip", description=__doc__, formatter_class=_TopHelpFormatter)
    parser.add_argument("--version", action="version", version=f"layerskip {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = subparser(sub, "generate", "generate text with a decoding strategy")
    add_model_args(p)
    _add_decoding_args(p)
    p.add_argument("--strategy", default="autoregressive", choices=STRATEGIES,
                   help="decoding strategy")
    p.add_argument("--exit-layer", metavar="E", type=exit_layer_arg,
                   help="early_exit / self_speculative exit layer E, or 'auto' "
                   "(self_speculative: a policy chooses E, k unless given, and whether to "
                   "draft, per round; default: the model's recommendation, else L // 4 for "
                   "self_speculative)")
    p.add_argument("--num-speculations", metavar="K", type=speculations,
                   help="self_speculative draft length k, or 'auto' (default: the model's "
                   f"recommendation, else {DEFAULT_NUM_SPECULATIONS})")
    p.add_argument("--draft", choices=["early_exit", "layer_skip"],
                   help="self_speculative's draft: layers [0, E), or the layer-skip subset "
                   "(default: early_exit)")
    p.add_argument("--speedup", metavar="R",
                   type=float_in(1), help="layer_skip's target speedup (>= 1)")
    p.add_argument("--temperature", metavar="T", type=float_in(0), default=0.0,
                   help="0 is greedy; > 0 samples")
    p.add_argument("--top-k", metavar="K", type=int_at_least(0),
                   help="sampling only: keep the k likeliest tokens (default: 0 = off)")
    p.add_argument("--top-p", metavar="P",
                   type=float_in(0, 1, low_open=True, what="a number in (0, 1]"),
                   help="sampling only: nucleus mass (default: 1.0 = off)")
    p.add_argument("--seed", metavar="S", type=seed_arg, help="sampling only: random seed")
    p.add_argument("--stop", metavar="TEXT", action="append", type=stop_arg,
                   help="stop a row once its new text holds TEXT (repeatable; backslash "
                   "escapes read, e.g. '\\n\\n'); its text ends before TEXT; needs a tokenizer")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stream", action="store_true", help="print text as it is accepted")
    p.add_argument("--tp", metavar="N", type=int_at_least(1), default=1,
                   help="tensor-parallel ranks; N > 1 runs under torchrun --nproc-per-node N "
                   "(nccl with --device cuda, gloo on a CPU), and only rank 0 prints")
    p.set_defaults(run=cmd_generate)

    p = subparser(sub, "compare", "autoregressive vs self-speculative: outputs and speedup",
                   "Greedy autoregressive and self-speculative decoding of the same prompts, "
                   "interleaved over repeats: both outputs, whether they are identical, the "
                   "draft settings (and whether they are defaults), acceptance, tokens per "
                   "round, and the speedup (ratio of median tokens/s, with the min-max of the "
                   "per-repeat ratios).")
    add_model_args(p)
    _add_decoding_args(p)
    p.add_argument("--exit-layer", metavar="E", type=exit_layer_arg,
                   help="E or 'auto' (a policy chooses per round; default: the model's "
                   "recommendation, else L // 4)")
    p.add_argument("--num-speculations", metavar="K", type=speculations,
                   help="k or 'auto' (default: the model's recommendation, else "
                   f"{DEFAULT_NUM_SPECULATIONS})")
    _add_timing_args(p, repeats=3)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_compare)

    p = subparser(sub, "bench", "time decoding strategies, ours and transformers'",
                   "Time decoding strategies (ours, and transformers' on the same weights) "
                   "in one process, interleaved over repeats: by default autoregressive, "
                   "early exit and self-speculative decoding at the model's recommended (E, "
                   "k) (and k=auto), transformers' generate and its assistant_early_exit at "
                   "E; --strategies, --exit-layers, --draft-lengths and --speedups choose "
                   "others (`sweep` for a whole (E, k) grid). The JSON report is rewritten "
                   "atomically after every repetition, so an interrupted run keeps the "
                   'repetitions that finished ("complete": false). Runs generate exactly '
                   "--max-new-tokens tokens unless the model config has an EOS.")
    add_model_args(p)
    p.add_argument("--prompts", metavar="FILE",
                   help="a text file, one prompt per line, or a .json list of prompts (strings "
                   "or token-id lists) (default: BOS only)")
    p.add_argument("--max-new-tokens", metavar="N", type=int_at_least(1), default=200,
                   help="new tokens per prompt")
    p.add_argument("--strategies", metavar="S,...",
                   help=f"comma list of our strategies to time, of {', '.join(STRATEGIES)} "
                   "(default: autoregressive,early_exit,self_speculative); ours "
                   "autoregressive always runs, as every speedup's baseline")
    p.add_argument("--exit-layers", metavar="E|auto,...",
                   help="comma list of exit layers of early_exit, self_speculative and "
                   "transformers' assistant_early_exit (default: the model's recommendation, "
                   "else L // 4); auto adds self_speculative with the adaptive policy "
                   "(exit_layer auto) beside them")
    p.add_argument("--draft-lengths", metavar="K,...",
                   help="comma list of self_speculative draft lengths k, each E also run with "
                   f"k=auto (default: the model's recommendation, else {DEFAULT_NUM_SPECULATIONS})")
    p.add_argument("--speedups", metavar="R,...",
                   help="comma list of layer_skip target speedups (>= 1), also self_speculative "
                   "drafts when both are chosen (default: 1.25,1.5)")
    _add_timing_args(p, repeats=5)
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' runs")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="our runs step eagerly (default: replay captured steps on CUDA)")
    p.add_argument("--output", metavar="FILE.json", required=True,
                   help="where to write the JSON report (rewritten after every repetition; "
                   "missing directories are created; an existing path must be a regular file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_bench)

    p = subparser(sub, "sweep", "self-speculative decoding over an (exit layer, k) grid",
                   "Self-speculative decoding over a grid of exit layers E and draft lengths "
                   "k (plus k=auto and plain early exit at each E, and the adaptive policy, "
                   "--exit-layer auto), timed as `bench` times. "
                   "DIR/sweep.json and DIR/sweep.csv are rewritten atomically after every "
                   "repetition, so an interrupted sweep keeps the repetitions that finished "
                   '("complete": false); DIR/sweep_heatmap.png comes at the end.')
    add_model_args(p)
    p.add_argument("--prompts", metavar="FILE",
                   help="a text file, one prompt per line, or a .json list of prompts (strings "
                   "or token-id lists)")
    p.add_argument("--exit-layers", metavar="E,...",
                   default="1,2,3", help="comma list of exit layers E")
    p.add_argument("--draft-lengths", metavar="K,...",
                   default="1,2,4,8", help="comma list of draft lengths k")
    p.add_argument("--max-new-tokens", metavar="N", type=int_at_least(1), default=200,
                   help="new tokens per prompt")
    _add_timing_args(p, repeats=5)
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="step eagerly (default: replay captured steps on CUDA)")
    p.add_argument("--output", metavar="DIR", required=True,
                   help="directory for sweep.csv, sweep.json and sweep_heatmap.png (created if "
                   "missing; existing ones must be regular files)")
    p.add_argument("--overwrite", action="store_true", help="replace existing sweep files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_sweep)

    p = subparser(sub, "info", "print a model's config, parameter count and bytes")
    add_model_args(p, backend=False)
    p.set_defaults(run=cmd_info)

    from .task_eval import add_eval_command
    add_eval_command(sub)
    # Every argument after `lm-eval` is lm-eval's: '+' as the prefix keeps argparse off them.
    p = sub.add_parser("lm-eval", prefix_chars="+", add_help=False,
                       help="lm-evaluation-harness's command line with the `layerskip` model "
                       "registered (layerskip lm-eval --model layerskip --model_args "
                       "pretrained=DIR ... --tasks ...; needs the [eval] extra)")
    p.add_argument("harness_args", nargs=argparse.REMAINDER)
    p.set_defaults(run=cmd_lm_eval)

    from .training.cli import add_training_commands
    add_training_commands(sub)
    return parser


def main(argv=None):
    """Run `layerskip`; returns 0, or raises SystemExit with 1, 2 or 130 after printing one
    `error: ...` line on stderr. With no arguments, prints the help and returns 0."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = "--debug" in argv
    try:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        with torch.inference_mode():
            args.run(args)
        return 0
    except KeyboardInterrupt as error:
        _fail(INTERRUPTED, str(error) or "interrupted", error, debug)
    except (UsageError, OutputPathError) as error:
        _fail(USAGE, " ".join(str(error).split()), error, debug)
    except BrokenPipeError:  # stdout closed early (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(FAILURE) from None
    except Exception as error:
        message = describe(error)
        flagged = as_flag(message) if isinstance(error, ValueError) else None
        _fail(USAGE if flagged else FAILURE, flagged or message, error, debug)


def _fail(code, message, error, debug):
    if is_first_rank():  # under torchrun every rank fails alike: one of them says so
        if debug:
            traceback.print_exception(error)
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code) from None

if __name__ == "__main__":
    main()
