"""`layerskip sweep`: self-speculative decoding over a grid of exit layers E and draft lengths k.

Every configuration is timed by benchmark.run_benchmark (same process, interleaved repeats,
median and spread), which also times plain early exit and k="auto" at each E, and the
adaptive policy (exit_layer="auto"); we keep them as extra rows, an "auto" column and a line
beside the best pair. Writes DIR/sweep.csv and DIR/sweep.json (the full report),
both rewritten atomically after every repetition so that an interrupted sweep keeps what it
measured, then DIR/sweep_heatmap.png (speedup over our autoregressive decoding; needs
matplotlib), and prints the best (E, k) among the fixed k: a model records a fixed k as its
recommendation, so k=auto is shown, not compared.
"""
import csv
import io
import json
import sys
from pathlib import Path

from .benchmark import Progress, _kept, load_prompts, run_benchmark
from .cli_args import UsageError, parse_ints
from .cli_checks import check_exit_layers, check_fits, load_tokenizer_and_model, require_file
from .decoding.generate import AUTO_DRAFT_CAP
from .files import atomic_path, check_output_dir, write_text

OUTPUTS = ("sweep.csv", "sweep.json", "sweep_heatmap.png")

CSV_FIELDS = ("name", "strategy", "exit_layer", "num_speculations", "tokens_per_s",
              "tokens_per_s_min", "tokens_per_s_max", "speedup_vs_ours_autoregressive",
              "acceptance_rate", "tokens_per_round", "speedup_if_all_accepted",
              "same_tokens_as_autoregressive")


def sweep_rows(report):
    """The report's rows that are self-speculative with an early-exit draft at a fixed exit
    layer, by (E, k)."""
    return {(r["exit_layer"], r["num_speculations"]): r for r in report["results"]
            if r.get("strategy") == "self_speculative" and "exit_layer" in r
            and r["exit_layer"] != "auto"}


def adaptive_row(report):
    """The row of exit_layer="auto" (the adaptive policy), or None."""
    return next((r for r in report["results"] if r.get("exit_layer") == "auto"), None)


def best_pair(report):
    """The fixed-k configuration with the highest median speedup whose tokens are exact."""
    rows = [r for (e, k), r in sweep_rows(report).items()
            if k != "auto" and r["same_tokens_as_autoregressive"]]
    return max(rows, key=lambda r: r["speedup_vs_ours_autoregressive"], default=None)


def write_csv(report, path):
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in report["results"]:
        writer.writerow(row)
    write_text(path, text.getvalue())


def write_heatmap(report, exit_layers, draft_lengths, path):
    """Speedup over autoregressive: rows E, columns k and "auto", 1.0 at the colormap's centre.
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure  # no pyplot: no global backend state
    except ImportError:
        return False
    rows = sweep_rows(report)
    columns = list(draft_lengths) + ["auto"]
    grid = [[rows[(e, k)]["speedup_vs_ours_autoregressive"] for k in columns] for e in exit_layers]
    values = [v for line in grid for v in line]
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(min(values), 0.99), vmax=max(max(values), 1.01))
    fig = Figure(figsize=(max(4.8, 1.2 + 0.9 * len(columns)), 1.4 + 0.6 * len(exit_layers)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            exact = rows[(exit_layers[i], columns[j])]["same_tokens_as_autoregressive"]
            ink = "white" if abs(norm(value) - 0.5) > 0.3 else "black"
            ax.text(j, i, f"{value:.2f}" + ("" if exact else "*"), ha="center", va="center",
                    fontsize=8, color=ink)
    ax.set_xticks(range(len(columns)), [str(k) for k in columns])
    ax.set_yticks(range(len(exit_layers)), [str(e) for e in exit_layers])
    ax.set_ylabel("exit layer E")
    settings = report["settings"]
    model = Path(settings["model"]).name if settings.get("model") else "default model"
    ax.set_title(f"self-speculative speedup over autoregressive\n{model}, "
                 f"{settings['max_new_tokens']} new tokens, {settings['dtype']}, median of "
                 f"{settings['repeats_done']}", fontsize=9)
    ax.set_xlabel("draft length k" + ("   (* output differs)" if any(
        not r["same_tokens_as_autoregressive"] for r in rows.values()) else ""))
    fig.colorbar(image, ax=ax, label="speedup")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    return True


def main_sweep(args):
    """`layerskip sweep`: the grid, the other arguments and DIR are checked before the model
    loads, and the exit layers against the model right after."""
    exit_layers = parse_ints(args.exit_layers, "--exit-layers")
    draft_lengths = parse_ints(args.draft_lengths, "--draft-lengths")
    out = Path(args.output)
    check_output_dir(out, "--output", OUTPUTS, getattr(args, "overwrite", False))
    if args.prompts:
        require_file(args.prompts, "--prompts")
    model, tokenizer, tokenizer_path = load_tokenizer_and_model(
        args, "--prompts: a prompts file needs --tokenizer" if args.prompts else None)
    check_exit_layers(exit_layers, model.config.n_layers)
    prompts, labels = load_prompts(model, args.prompts, tokenizer)
    if not prompts:
        raise UsageError(f"--prompts {args.prompts}: expected at least one non-empty line")
    check_fits(model, tokenizer, tokenizer_path, prompts, labels, args.max_new_tokens,
               reserve=max(*draft_lengths, AUTO_DRAFT_CAP) + 1)
    done = []

    def keep(report):
        report["settings"]["model"] = args.model
        write_text(out / "sweep.json", json.dumps(report, indent=1) + "\n", "--output")
        write_csv(report, out / "sweep.csv")
        done.append(report["settings"]["repeats_done"])

    try:
        with Progress(getattr(args, "quiet", False)) as progress:
            report = run_benchmark(model, prompts, args.max_new_tokens, args.repeats,
                                   args.warmup, exit_layers=exit_layers,
                                   draft_lengths=draft_lengths, speedups=(),
                                   with_transformers=False, progress=progress,
                                   cuda_graphs=False if getattr(args, "no_cuda_graphs", False)
                                   else None, on_repeat=keep,
                                   batch_size=getattr(args, "batch_size", None),
                                   adaptive=True)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_kept(out / "sweep.json", done, args.repeats)) from None
    report["settings"]["model"] = args.model
    wrote = [out / "sweep.csv", out / "sweep.json"]
    if write_heatmap(report, exit_layers, draft_lengths, out / "sweep_heatmap.png"):
        wrote.append(out / "sweep_heatmap.png")
    else:
        print("matplotlib is not installed: no heatmap (pip install matplotlib)", file=sys.stderr)
    best = best_pair(report)
    if best is None:
        print("no fixed-k configuration reproduced autoregressive decoding exactly")
    else:
        print(f"best of the fixed k (k=auto not compared; sweep.csv has it): "
              f"E={best['exit_layer']} k={best['num_speculations']}: "
              f"{best['tokens_per_s']:.1f} tokens/s "
              f"({best['tokens_per_s_min']:.1f}-{best['tokens_per_s_max']:.1f}), "
              f"x{best['speedup_vs_ours_autoregressive']:.2f} over autoregressive, "
              f"acceptance {best['acceptance_rate']:.2f} (x{best['speedup_if_all_accepted']:.2f} "
              "if every draft were accepted)")
    auto = adaptive_row(report)
    print(f"adaptive (exit layer auto): x{auto['speedup_vs_ours_autoregressive']:.2f} over "
          "autoregressive" + (f", x{auto['tokens_per_s'] / best['tokens_per_s']:.2f} the best "
                              "fixed" if best else "")
          + f"; rounds per choice (last run): {auto['choices']}")
    print("wrote " + ", ".join(map(str, wrote)), file=sys.stderr)
    return report
