"""Experiment A: continual pretraining of stories260K with the LayerSkip recipe.

stories260K (llama2.c, 5 layers) continues training on TinyStories validation text, the last
10% of its lines held out, with layer dropout (exp depth schedule, constant in time, as the
paper does for continual pretraining) and the early-exit loss. Before and after: per-exit
perplexity and top-1 agreement with the final layer on the held-out text, greedy
self-speculative acceptance and tokens/s against autoregressive decoding (lsk.generate).

    python bench/continual_pretraining.py --output bench/results/continual_pretraining --threads 2

The defaults are the best of seven runs (bench/results/README.md): the text is small (about
344K training tokens, 42 steps an epoch), so longer runs overfit and the final layer's
perplexity worsens by more than 5%.

Writes OUTPUT.json and OUTPUT.md (and OUTPUT.png with matplotlib); --save-model DIR keeps
the trained weights (derived from stories260K: do not commit them).
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import layerskip_kernels as lsk
from layerskip_kernels.benchmark import machine_info
from layerskip_kernels.model import save_hf_directory
from layerskip_kernels.training import (TrainConfig, Trainer, evaluate_exits, format_table,
                                        plot_exits, tokenize_text)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def best_of_runs(model, prompts, max_new_tokens, repeats=3, **settings):
    """Greedy decoding of each prompt alone, keeping the fastest of `repeats` runs (for a
    shared CPU); total tokens/s and acceptance over all prompts, and the tokens."""
    tokens, new, elapsed, accepted, drafted = [], 0, 0.0, 0, 0
    for prompt in prompts:
        runs = [lsk.generate(model, [prompt], max_new_tokens=max_new_tokens, **settings)
                for _ in range(repeats)]
        res = min(runs, key=lambda r: r.stats["time_s"])
        tokens.append(res.tokens[0])
        new, elapsed = new + res.stats["new_tokens"], elapsed + res.stats["time_s"]
        accepted += res.stats.get("accepted", 0)
        drafted += res.stats.get("drafted", 0)
    return {"tokens_per_s": new / elapsed, "acceptance": accepted / max(drafted, 1),
            "tokens": tokens}


def measure_decoding(model, prompts, max_new_tokens, exit_layers, k):
    """Autoregressive, then self-speculative at each exit layer: greedy, one prompt at a time."""
    def run(**kw):
        result = best_of_runs(model, prompts, max_new_tokens, repeats=2, **kw)
        return result, result.pop("tokens")

    run(strategy="autoregressive")  # warm up
    base, base_tokens = run()
    rows = {"autoregressive": base}
    for e in exit_layers:
        r, tokens = run(strategy="self_speculative", exit_layer=e, num_speculations=k)
        r.update(speedup=r["tokens_per_s"] / base["tokens_per_s"], same_tokens=tokens == base_tokens)
        rows[f"self_speculative E={e} k={k}"] = r
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DATA / "stories260K.bin"))
    p.add_argument("--tokenizer", default=str(DATA / "tok512.bin"))
    p.add_argument("--data", default=str(DATA / "tinystories_val.txt"))
    p.add_argument("--output", default="bench/results/continual_pretraining")
    p.add_argument("--save-model", help="also write the trained model here (HF layout)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--p-max", type=float, default=0.2)
    p.add_argument("--exit-scale", default="sum")
    p.add_argument("--exit-curriculum", default="none")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-speculations", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()

    tokenizer = lsk.load_tokenizer(args.tokenizer)
    lines = [line for line in Path(args.data).read_text().splitlines() if line.strip()]
    split = int(len(lines) * (1 - args.heldout_fraction))
    train_tokens = tokenize_text(tokenizer, "\n".join(lines[:split]))
    eval_tokens = tokenize_text(tokenizer, "\n".join(lines[split:]))
    prompts = [tokenizer.encode(line)[:args.prompt_tokens] for line in lines[split:]
               if len(tokenizer.encode(line)) > args.prompt_tokens][:args.prompts]
    print(f"{len(train_tokens)} train tokens, {len(eval_tokens)} held out, "
          f"{time.time() - started:.0f} s", file=sys.stderr)

    model = lsk.load_model(args.model)
    exit_layers = range(1, model.config.n_layers)

    def snapshot():
        model.eval().requires_grad_(False)
        return {"exits": evaluate_exits(model, eval_tokens, args.seq_len,
                                        max_windows=args.eval_windows),
                "decoding": measure_decoding(model, prompts, args.max_new_tokens, exit_layers,
                                             args.num_speculations)}

    before = snapshot()
    config = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                         lr=args.lr, warmup_steps=args.warmup, seed=args.seed, p_max=args.p_max,
                         dropout_depth="exp", dropout_time="constant", exit_scale=args.exit_scale,
                         exit_curriculum=args.exit_curriculum, threads=args.threads)
    trainer = Trainer(model, train_tokens, config)
    with torch.enable_grad():
        train_start = time.time()
        trainer.train()
        train_s = time.time() - train_start
    after = snapshot()
    if args.save_model:
        save_hf_directory(model, args.save_model)

    ppl = [s["exits"]["exits"][-1]["perplexity"] for s in (before, after)]
    report = {
        "experiment": "A: LayerSkip continual pretraining of stories260K on TinyStories",
        "command": " ".join([sys.executable, *sys.argv]), "commit": machine_info()["commit"],
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "args": vars(args), "train_tokens": len(train_tokens), "heldout_tokens": len(eval_tokens),
        "training": {"steps": trainer.step, "seconds": train_s, "steps_per_s": trainer.step / train_s,
                     "first_loss": trainer.history[0]["loss"], "last_loss": trainer.history[-1]["loss"]},
        "before": before, "after": after,
        "final_perplexity_change": ppl[1] / ppl[0] - 1, "total_seconds": time.time() - started,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = ["# Experiment A: LayerSkip continual pretraining of stories260K", "",
          f"`{report['command']}`", "",
          f"{trainer.step} steps of {args.batch_size}x{args.seq_len} tokens in {train_s:.0f} s "
          f"({trainer.step / train_s:.2f} steps/s); final-layer perplexity {ppl[0]:.3f} -> "
          f"{ppl[1]:.3f} ({100 * report['final_perplexity_change']:+.2f}%)", "",
          "| exit layer | ppl before | ppl after | agreement before | agreement after |",
          "| ---: | ---: | ---: | ---: | ---: |"]
    for b, a in zip(before["exits"]["exits"], after["exits"]["exits"]):
        md.append(f"| {b['exit_layer']} | {b['perplexity']:.2f} | {a['perplexity']:.2f} | "
                  f"{100 * b['agreement']:.1f}% | {100 * a['agreement']:.1f}% |")
    md += ["", "| decoding (greedy) | acceptance before | after | tokens/s before | after | "
           "speedup before | after | same tokens |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for name, b in before["decoding"].items():
        a = after["decoding"][name]
        md.append(f"| {name} | {100 * b['acceptance']:.1f}% | {100 * a['acceptance']:.1f}% | "
                  f"{b['tokens_per_s']:.0f} | {a['tokens_per_s']:.0f} | "
                  f"{b.get('speedup', 1):.2f}x | {a.get('speedup', 1):.2f}x | "
                  f"{a.get('same_tokens', True)} |")
    md += ["", format_table(before["exits"], "before (held-out 10%)"), "",
           format_table(after["exits"], "after"), ""]
    out.with_suffix(".md").write_text("\n".join(md))
    try:
        plot_exits({"before": before["exits"], "after": after["exits"]}, out.with_suffix(".png"))
    except RuntimeError as error:
        print(f"no plot: {error}", file=sys.stderr)
    print("\n".join(md))



if __name__ == "__main__":
    main()
