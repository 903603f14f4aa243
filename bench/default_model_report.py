"""The embedded default model's report: its training curve, per-exit quality on held-out code,
and the (E, k) sweep that chose its recommendation.

    python bench/default_model_report.py --model layerskip_kernels/assets/default_model \
        --history runs/default_model/history.json --sweep runs/sweep/sweep.json \
        --command "python bench/train_default_model.py ..." --output bench/results/default_model

--history: the trainer's per-step records (Trainer.history: step, loss, exits {layer index:
CE}, exit E being index E - 1) as a JSON list (train_default_model.py writes history.json); --sweep: `layerskip sweep`'s sweep.json. Writes report.md, report.json,
exits.png and training_curve.png to --output.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import layerskip_kernels as lsk
from layerskip_kernels.sweep import best_pair, sweep_rows
from layerskip_kernels.training import evaluate_exits, format_table, plot_exits

sys.path.insert(0, str(Path(__file__).parent))
from train_default_model import stdlib_files, token_stream  # noqa: E402


def smoothed(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curve(history, path, window=50):
    from matplotlib.figure import Figure
    steps = [r["step"] for r in history]
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.plot(steps, smoothed([r["loss"] for r in history], window), label="training loss (weighted exits)",
            color="black")
    for layer in sorted({int(k) for r in history for k in r["exits"]}):
        ax.plot(steps, smoothed([r["exits"].get(str(layer), float("nan")) for r in history],
                                window), label=f"exit {layer + 1} CE")
    for before, after in zip(history, history[1:]):
        if before.get("stage") != after.get("stage"):  # a new stage continues the checkpoint
            ax.axvline(after["step"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"cross-entropy (mean of {window} steps)")
    ax.set_title("Default model: training curve (train batches, layer dropout on)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def curve_table(history, every):
    layers = sorted({int(k) for r in history for k in r["exits"]})
    lines = ["| steps | loss | " + " | ".join(f"exit {e + 1} CE" for e in layers) + " |",
             "| ---: | ---: | " + " | ".join("---:" for _ in layers) + " |"]
    for i in range(every - 1, len(history), every):
        window = history[max(0, i - 49):i + 1]
        mean = lambda key: sum(key(r) for r in window) / len(window)  # noqa: E731
        lines.append(f"| {history[i]['step'] + 1} | {mean(lambda r: r['loss']):.3f} | " + " | ".join(
            f"{mean(lambda r: r['exits'][str(e)]):.3f}" for e in layers) + " |")
    return lines


def sweep_table(report):
    rows = sorted(sweep_rows(report).items(), key=lambda item: (item[0][0], str(item[0][1])))
    lines = ["| E | k | acceptance | tokens/round | tokens/s | speedup (min-max) | "
             "if all accepted | same tokens |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for (e, k), r in rows:
        ceiling = r.get("speedup_if_all_accepted")
        lines.append(f"| {e} | {k} | {100 * r['acceptance_rate']:.1f}% | "
                     f"{r['tokens_per_round']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_ours_autoregressive']:.2f}x "
                     f"({r['speedup_vs_ours_autoregressive_min']:.2f}-"
                     f"{r['speedup_vs_ours_autoregressive_max']:.2f}) | "
                     f"{f'{ceiling:.2f}x' if ceiling else ''} | "
                     f"{'yes' if r['same_tokens_as_autoregressive'] else 'NO'} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--history", required=True)
    p.add_argument("--sweep", required=True)
    p.add_argument("--command", required=True, action="append",
                   help="a training command, for the record (repeat for stages, in order)")
    p.add_argument("--sweep-command", required=True, help="the sweep command, for the record")
    p.add_argument("--output", required=True)
    p.add_argument("--eval-windows", type=int, default=64)
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model = lsk.load_model(args.model)
    tokenizer = lsk.load_tokenizer(Path(args.model) / "tokenizer.json")
    _, heldout_files, root = stdlib_files(20)
    exits = evaluate_exits(model, token_stream(tokenizer, heldout_files), seq_len=256,
                           max_windows=args.eval_windows)
    history = json.loads(Path(args.history).read_text())
    sweep = json.loads(Path(args.sweep).read_text())
    best = best_pair(sweep)
    ar = sweep["results"][0]
    c = model.config
    weights = {t.data_ptr(): t for t in model.parameters()}.values()
    parameters = sum(t.numel() for t in weights)
    size = (Path(args.model) / "model.safetensors").stat().st_size
    plot_exits({"default model": exits}, out / "exits.png")
    plot_curve(history, out / "training_curve.png")
    report = {"commands": args.command, "sweep_command": args.sweep_command,
              "parameters": parameters, "weights_bytes": size,
              "config": {"n_layers": c.n_layers, "dim": c.dim, "n_heads": c.n_heads,
                         "n_kv_heads": c.n_kv_heads, "hidden_dim": c.hidden_dim,
                         "vocab_size": c.vocab_size},
              "recommended": {"exit_layer": best["exit_layer"],
                              "num_speculations": best["num_speculations"]},
              "exits": exits, "sweep": sweep, "history": history}
    (out / "report.json").write_text(json.dumps(report, separators=(",", ":")) + "\n")
    settings = sweep["settings"]
    lines = [
        "# The default model: a 12-layer code Llama trained with the LayerSkip recipe", "",
        f"{c.n_layers} layers, dim {c.dim}, {c.n_heads} query / {c.n_kv_heads} KV heads, "
        f"MLP {c.hidden_dim}, a {c.vocab_size}-token byte-level BPE; {parameters} parameters, "
        f"{size / 1e6:.1f} MB (float32). Trained from scratch on the Python source of the "
        f"CPython standard library ({root}), every 20th module held out, on 2 CPU cores, in "
        f"{len(args.command)} stage{'s' if len(args.command) > 1 else ''}:", "",
        *(f"    {command}" for command in args.command), "",
        "Recipe: layer dropout (exponential in depth; an exponential time curriculum from "
        "scratch, constant when continuing; p_max as each command says) and the early-exit "
        "loss through the shared head, on exit 3 (a quarter of the depth: the draft), exit 2 "
        "and the last layer, the later stages weighting exit 3 up. Raising layer dropout to "
        "p_max 0.5 in the last stage moved exit 3's agreement with the last layer most.", "",
        "## Training curve", "",
        "![training curve](training_curve.png)", "",
        *curve_table(history, 500), "",
        "(train batches, means of the last 50 steps; layer dropout is on, so these run above "
        "the held-out numbers below; the dotted lines in the plot are where a stage continues "
        "the previous one's checkpoint)", "",
        "## Per exit, on held-out code", "",
        format_table(exits, "Held-out stdlib modules (never trained on)"), "",
        "![per-exit quality](exits.png)", "",
        "## The (E, k) sweep", "",
        f"    {args.sweep_command}", "",
        f"Greedy self-speculative decoding of {settings['prompts']} held-out prompts (the "
        f"first 64 tokens of held-out modules), each decoded alone, "
        f"{settings['max_new_tokens']} new tokens, "
        f"--threads {sweep['threads']} (the C++ kernels' team of "
        f"{sweep.get('kernel_threads')}; torch on one while it decodes), "
        f"median of {settings['repeats_done']} interleaved repeats; speedup over our "
        f"autoregressive ({ar['tokens_per_s']:.1f} tokens/s) in the same process, prefill "
        "included. \"if all accepted\": the speedup had every round accepted all k drafts.", "",
        *sweep_table(sweep), "",
        f"Recommended (written into config.json, \"layerskip\"): exit_layer "
        f"{best['exit_layer']}, num_speculations {best['num_speculations']}: "
        f"{best['speedup_vs_ours_autoregressive']:.2f}x at acceptance "
        f"{100 * best['acceptance_rate']:.1f}%, the fastest exact pair.", ""]
    (out / "report.md").write_text("\n".join(lines))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
