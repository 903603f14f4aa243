"""`layerskip train` and `layerskip eval-exits`, added to the parser by cli.build_parser."""
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import torch

from ..cli_args import (DTYPES, HelpFormatter, UsageError, add_debug, device_arg, dtype_arg,
                        int_at_least, threads_arg)
from ..cli_checks import load_model_arg, reading, require_file


def add_training_commands(sub):
    """Add the training subcommands to `layerskip`'s subparsers."""
    p = sub.add_parser("train", help="train with layer dropout + early-exit loss (LayerSkip)",
                       description="Train with layer dropout and the early-exit loss. "
                       "--output (or the config's output) is a checkpoint directory: one "
                       "holding a trainer state is resumed; a file is refused, and so is a "
                       "non-empty directory without one unless --overwrite.",
                       formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   required=True, help="a .json or .toml TrainConfig file (every key, "
                   "commented: bench/train_example.toml in the repository)")
    p.add_argument("--steps", metavar="N",
                   type=int_at_least(1), help="override the config's steps")
    p.add_argument("--output", metavar="DIR", help="override the config's output directory "
                   "(created if missing; files in it must be regular files)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output that holds no trainer state")
    p.add_argument("--threads", metavar="N", type=threads_arg,
                   help="torch CPU threads (at most the machine's logical CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)
    add_debug(p)

    p = sub.add_parser("eval-exits", help="perplexity and agreement with the final layer of "
                       "every exit, on held-out text", formatter_class=HelpFormatter)
    p.add_argument("--model", metavar="PATH",
                   required=True, help="HF Llama directory or llama2.c .bin file")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json, HF directory or llama2.c tokenizer .bin"
                   " (default: the model directory's tokenizer.json)")
    p.add_argument("--data", metavar="FILE", required=True, help="a held-out text file")
    p.add_argument("--seq-len", metavar="N", type=int_at_least(1), default=256,
                   help="tokens per window (at most the model's max_seq_len)")
    p.add_argument("--batch-size", metavar="N",
                   type=int_at_least(1), default=8, help="windows per batch")
    p.add_argument("--max-windows", metavar="N", type=int_at_least(1),
                   help="evaluate at most this many windows (default: all)")
    p.add_argument("--dtype", metavar="NAME", default="float32", type=dtype_arg,
                   help=f"weights dtype: {', '.join(DTYPES)}")
    p.add_argument("--device", metavar="DEVICE",
                   default="cpu", type=device_arg, help="cpu, cuda or cuda:N")
    p.add_argument("--plot", metavar="FILE",
                   help="write a plot here (PNG, or another format by suffix; needs "
                   "matplotlib; missing directories are created; an existing path must be a "
                   "regular file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_eval_exits)
    add_debug(p)


def cmd_train(args):
    from ..files import check_output_dir
    from .trainer import CHECKPOINT_FILES, STATE_JSON, load_config, run_training
    require_file(args.config, "--config")
    with reading("--config", args.config, flags=False):
        config = load_config(args.config, steps=args.steps, output=args.output,
                             threads=args.threads)
    output = Path(config.output)
    check_output_dir(output, "--output", CHECKPOINT_FILES, overwrite=True)
    if (output.is_dir() and any(output.iterdir()) and not (output / STATE_JSON).exists()
            and not args.overwrite):
        raise UsageError(f"--output {output}: a non-empty directory with no {STATE_JSON} to "
                         "resume (pass --overwrite to write into it)")
    for key in ("data", "tokenizer"):
        value = getattr(config, key)
        if value and not Path(value).exists():
            raise UsageError(f"--config {args.config}: {key} {value} does not exist")
    require_file(config.data, f"--config {args.config}: data")  # a FIFO would block the read
    # `layerskip` runs commands under inference_mode; training needs autograd back.
    with torch.inference_mode(False), torch.enable_grad():
        trainer = run_training(config, progress=not args.quiet)
    last = trainer.history[-1] if trainer.history else None
    print(f"saved {config.output} at step {trainer.step}"
          + (f", last loss {last['loss']:.4f}" if last else ""), file=sys.stderr)
    print(recommendation_note(output, trainer.model.config, config), file=sys.stderr)


def recommendation_note(output, model_config, config):
    """How to give a trained model its recommended (exit layer, k). train does not time a
    sweep itself: which (E, k) is fastest depends on the machine and prompts that will serve
    the model, rarely the training machine, and a short sweep measures noise (five full sweeps
    of the default model on one machine ranged 1.42-1.71x: bench/results/README.md), while the
    full grid costs minutes."""
    from ..decoding.generate import DEFAULT_NUM_SPECULATIONS, default_exit_layer
    c = model_config
    L = c.n_layers
    tokenizer = ("" if (output / "tokenizer.json").exists()
                 else f" --tokenizer {shlex.quote(str(config.tokenizer))}")
    sweep = (f"layerskip sweep --model {shlex.quote(str(output))}{tokenizer} --prompts "
             f"PROMPTS.txt --exit-layers {','.join(map(str, range(1, L)))} --output "
             f"{shlex.quote(str(output / 'sweep'))}")
    if c.exit_layer is None:
        now = (f"{output}/config.json recommends no (exit layer, k): self_speculative uses "
               f"E = {default_exit_layer(L)} (a quarter of the depth) and k = "
               f"{DEFAULT_NUM_SPECULATIONS}")
    else:
        now = (f"{output}/config.json keeps the (exit layer, k) = ({c.exit_layer}, "
               f"{c.num_speculations}) that the model training started from recommended")
    return (f"{now}.\nTo choose them, time them where the model will run, on prompts like "
            f"yours (PROMPTS.txt, one per line):\n  {sweep}\nthen set \"layerskip\": "
            f"{{\"exit_layer\": E, \"num_speculations\": k}} in {output}/config.json to "
            "the best E and k it prints.")


def cmd_eval_exits(args):
    from ..files import check_output_file
    from ..model import load_tokenizer
    from .evaluate import evaluate_exits, format_table, plot_exits
    from .trainer import tokenize_text
    require_file(args.data, "--data")
    if args.plot:
        check_output_file(args.plot, "--plot", args.overwrite)
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot: needs matplotlib (pip install matplotlib)")
    tokenizer_path = args.tokenizer or _model_tokenizer(args.model)
    if tokenizer_path is None:
        raise UsageError("--tokenizer: the model directory has no tokenizer.json; pass one")
    with reading("--tokenizer", tokenizer_path):
        tokenizer = load_tokenizer(tokenizer_path)
    model = load_model_arg(args)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"--tokenizer {tokenizer_path}: its vocabulary ({tokenizer.vocab_size} "
                         f"tokens) is larger than the model's ({model.config.vocab_size}); "
                         "expected the model's own tokenizer")
    with reading("--data", args.data):
        tokens = tokenize_text(tokenizer, Path(args.data).read_text())
    if len(tokens) < 2:
        raise UsageError(f"--data {args.data}: expected at least 2 tokens of text, "
                         f"got {len(tokens)}")
    result = evaluate_exits(model, tokens, args.seq_len, args.batch_size, args.max_windows,
                            progress=not args.quiet)
    if args.plot:
        name = Path(args.model).name
        plot_exits({name: result}, args.plot,
                   title=f"Early exits of {name} on {Path(args.data).name} "
                   f"({result['tokens']} tokens)")
        print(f"wrote {args.plot}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_table(result))


def _model_tokenizer(model):
    directory = Path(model) if Path(model).is_dir() else Path(model).parent
    return directory / "tokenizer.json" if (directory / "tokenizer.json").exists() else None
