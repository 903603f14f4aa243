"""The `layerskip` command (also `python -m layerskip_kernels`)."""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .benchmark import compare
from .decoding import generate
from .decoding.generate import STRATEGIES
from .model import load_model, load_tokenizer
from .model.checkpoint import DEFAULT_MODEL, SUPPORTED_DTYPES


def _find_tokenizer(args):
    """--tokenizer, else a tokenizer.json in the model's directory, else none."""
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    model = Path(args.model or DEFAULT_MODEL)
    model_dir = model if model.is_dir() else model.parent
    if (model_dir / "tokenizer.json").exists():
        return load_tokenizer(model_dir / "tokenizer.json")
    return None


def new_text(tokenizer, prompt, tokens):
    """The text the new tokens add after the prompt (decoding them alone can lose context,
    such as the leading space a llama2.c tokenizer drops after BOS)."""
    return tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)):]


def _speculations(value):
    return value if value in (None, "auto") else int(value)


def _add_model_args(p):
    p.add_argument("--model", help="HF Llama directory or llama2.c .bin file "
                   "(default: the embedded LayerSkip-trained code model)")
    p.add_argument("--tokenizer", help="tokenizer.json, HF directory or llama2.c tokenizer .bin")
    p.add_argument("--dtype", default="float32", choices=list(SUPPORTED_DTYPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])


def cmd_generate(args):
    tokenizer = _find_tokenizer(args)
    prompts = _prompts(args, tokenizer)
    if not prompts:
        sys.exit("error: give at least one --prompt or --prompt-ids")
    model = load_model(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    stream = _printer(tokenizer, prompts) if args.stream and not args.json else None
    result = generate(model, prompts, max_new_tokens=args.max_new_tokens, stream=stream,
                      strategy=args.strategy, exit_layer=args.exit_layer,
                      num_speculations=_speculations(args.num_speculations),
                      speedup=args.speedup, draft=args.draft, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    texts = [new_text(tokenizer, p, t) if tokenizer else None
             for p, t in zip(prompts, result.tokens)]
    if stream:
        print()
        _print_stats(result.stats)
        return
    if args.json:
        outputs = [{"tokens": t, "text": s} for t, s in zip(result.tokens, texts)]
        print(json.dumps({"outputs": outputs, "stats": result.stats}))
        return
    for prompt, tokens, text in zip(prompts, result.tokens, texts):
        print(tokenizer.decode(prompt) + text if tokenizer else " ".join(map(str, tokens)))
    _print_stats(result.stats)


def _print_stats(stats):
    extra = (f", acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_round']:.2f} "
             "tokens/round" if "acceptance_rate" in stats else "")
    print(f"[{stats['strategy']}: {stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} "
          f"tokens/s{extra}]", file=sys.stderr)


def _printer(tokenizer, prompts):
    """A stream callback printing each row's text as it is accepted (rows tagged when > 1)."""
    seen = [list(p) for p in prompts]

    def show(row, tokens):
        before = tokenizer.decode(seen[row]) if tokenizer else ""
        seen[row] += tokens
        text = (tokenizer.decode(seen[row])[len(before):] if tokenizer
                else " " + " ".join(map(str, tokens)))
        print(f"\n[{row}] {text}" if len(prompts) > 1 else text, end="", flush=True)
    if len(prompts) == 1:
        print(tokenizer.decode(prompts[0]) if tokenizer else "", end="", flush=True)
    return show


def _prompts(args, tokenizer):
    if args.prompt and tokenizer is None:
        raise ValueError("--prompt needs a tokenizer: pass --tokenizer (or use --prompt-ids)")
    prompts = [tokenizer.encode(text) for text in args.prompt or []]
    return prompts + [[int(i) for i in ids.split()] for ids in args.prompt_ids or []]


def cmd_compare(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = _find_tokenizer(args)
    prompts = _prompts(args, tokenizer) or [tokenizer.encode("def fib(n):") if tokenizer else [1]]
    model = load_model(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    results, outputs = compare(model, prompts, args.max_new_tokens, args.repeats,
                               exit_layer=args.exit_layer,
                               num_speculations=_speculations(args.num_speculations))
    for row in results:
        print(f"== {row['name']} ==")
        for prompt, tokens in zip(prompts, outputs[row["name"]]):
            print(tokenizer.decode(prompt) + new_text(tokenizer, prompt, tokens) if tokenizer
                  else " ".join(map(str, tokens)))
    ar, spec = results
    c = model.config
    print(f"identical outputs: {'yes' if spec['same_tokens_as_autoregressive'] else 'NO'}")
    print(f"autoregressive {ar['tokens_per_s']:.1f} tokens/s, self_speculative "
          f"{spec['tokens_per_s']:.1f} tokens/s (exit layer "
          f"{args.exit_layer or c.exit_layer}, k {args.num_speculations or c.num_speculations}, "
          f"acceptance {spec['acceptance_rate']:.2f}): speedup {spec['speedup_vs_ours_autoregressive']:.2f}x "
          f"(median of {args.repeats}, tokens/s range {spec['tokens_per_s_min']:.0f}-"
          f"{spec['tokens_per_s_max']:.0f})")


def cmd_info(args):
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    weights = {p.data_ptr(): p for p in model.parameters()}.values()  # tied weights once
    info = {"config": dataclasses.asdict(model.config),
            "parameters": sum(p.numel() for p in weights),
            "bytes": sum(p.numel() * p.element_size() for p in weights),
            "dtype": args.dtype}
    print(json.dumps(info, indent=2))


def build_parser():
    parser = argparse.ArgumentParser(prog="layerskip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text with a decoding strategy")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", help='token ids, e.g. "1 2 3" (repeatable)')
    p.add_argument("--strategy", default="autoregressive", choices=STRATEGIES)
    p.add_argument("--exit-layer", type=int)
    p.add_argument("--num-speculations", help="draft length k, or 'auto'")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stream", action="store_true", help="print text as it is accepted")
    p.add_argument("--draft", default="early_exit", choices=["early_exit", "layer_skip"],
                   help="self_speculative's draft: layers [0, E), or the layer-skip subset")
    p.add_argument("--speedup", type=float, help="layer_skip's target speedup (>= 1)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("compare", help="autoregressive vs self-speculative: outputs and speedup")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", help='prompt text (default: "def fib(n):")')
    p.add_argument("--prompt-ids", action="append", help='token ids, e.g. "1 2 3" (repeatable)')
    p.add_argument("--exit-layer", type=int, help="default: the model's recommendation")
    p.add_argument("--num-speculations", help="k or 'auto' (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("bench", help="time every strategy, ours and transformers'")
    _add_model_args(p)
    p.add_argument("--prompts", help="a text file, one prompt per line (default: BOS only)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' runs")
    p.add_argument("--output", required=True, help="where to write the JSON report")
    p.set_defaults(run=lambda args: __import__(
        "layerskip_kernels.benchmark", fromlist=["main_bench"]).main_bench(args))

    p = sub.add_parser("sweep", help="self-speculative decoding over an (exit layer, k) grid")
    _add_model_args(p)
    p.add_argument("--prompts", help="a text file, one prompt per line (needs --tokenizer)")
    p.add_argument("--exit-layers", default="1,2,3", help="comma list of exit layers E")
    p.add_argument("--draft-lengths", default="1,2,4,8", help="comma list of draft lengths k")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", required=True, help="directory for sweep.csv/.json/_heatmap.png")
    p.set_defaults(run=lambda args: __import__(
        "layerskip_kernels.sweep", fromlist=["main_sweep"]).main_sweep(args))

    p = sub.add_parser("info", help="print a model's config, parameter count and bytes")
    _add_model_args(p)
    p.set_defaults(run=cmd_info)

    from .training.cli import add_training_commands
    add_training_commands(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with torch.inference_mode():
            args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
