"""`layerskip train` and `layerskip eval-exits`, added to the parser by cli.build_parser."""
import json
import sys
from pathlib import Path

import torch


def add_training_commands(sub):
    """Add the training subcommands to `layerskip`'s subparsers."""
    p = sub.add_parser("train", help="train with layer dropout + early-exit loss (LayerSkip)")
    p.add_argument("--config", required=True, help="a .json or .toml TrainConfig file")
    p.add_argument("--steps", type=int, help="override the config's steps")
    p.add_argument("--output", help="override the config's output directory")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval-exits", help="perplexity and agreement with the final layer of "
                       "every exit, on held-out text")
    p.add_argument("--model", required=True, help="HF Llama directory or llama2.c .bin file")
    p.add_argument("--tokenizer", help="tokenizer.json, HF directory or llama2.c tokenizer .bin"
                   " (default: the model directory's tokenizer.json)")
    p.add_argument("--data", required=True, help="a held-out text file")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_eval_exits)


def cmd_train(args):
    from .trainer import load_config, run_training
    config = load_config(args.config, steps=args.steps, output=args.output, threads=args.threads)
    # `layerskip` runs commands under inference_mode; training needs autograd back.
    with torch.inference_mode(False), torch.enable_grad():
        trainer = run_training(config, progress=not args.quiet)
    last = trainer.history[-1] if trainer.history else None
    print(f"saved {config.output} at step {trainer.step}"
          + (f", last loss {last['loss']:.4f}" if last else ""), file=sys.stderr)


def cmd_eval_exits(args):
    from ..model import load_model, load_tokenizer
    from .evaluate import evaluate_exits, format_table, plot_exits
    from .trainer import tokenize_text
    tokenizer_path = args.tokenizer or _model_tokenizer(args.model)
    if tokenizer_path is None:
        sys.exit("error: --tokenizer: the model directory has no tokenizer.json; pass one")
    tokenizer = load_tokenizer(tokenizer_path)
    model = load_model(args.model, device=args.device)
    tokens = tokenize_text(tokenizer, Path(args.data).read_text())
    result = evaluate_exits(model, tokens, args.seq_len, args.batch_size, args.max_windows)
    if args.plot:
        plot_exits({Path(args.model).name: result}, args.plot)
    print(json.dumps(result, indent=2) if args.json else format_table(result))


def _model_tokenizer(model):
    directory = Path(model) if Path(model).is_dir() else Path(model).parent
    return directory / "tokenizer.json" if (directory / "tokenizer.json").exists() else None
