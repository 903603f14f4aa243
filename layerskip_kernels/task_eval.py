"""`layerskip eval`: what a lossy speedup costs on a task. Every decoding configuration
(autoregressive, early exit at each E, layer skip at each speedup, self-speculative) generates
a continuation of each prompt of a JSON-lines file; the continuations are scored against the
references with ROUGE-1/2/L (rouge-score), BLEU (sacrebleu) and exact match, and timed as
`bench` times: configurations interleaved over repeats, in one process. Greedy decoding only:
self-speculative decoding is then lossless, and its scores must equal autoregressive ones.

The metric libraries are the `[eval]` extra: pip install 'layerskip-kernels[eval]'."""
import json
import sys
from pathlib import Path

import torch

from .benchmark import Progress, _kept, _ours, dtype_name, machine_info, time_interleaved
from .cli_args import (add_model_args, eos_arg, float_in, int_at_least, stop_arg, subparser,
                       threads_arg)
from .cli_checks import (check_exit_layer, check_exit_layers, check_fits,
                         load_tokenizer_and_model, reading, require_file, stop_tokens)
from .decoding.generate import DEFAULT_NUM_SPECULATIONS, default_exit_layer
from .decoding.stop import cut_at_stop, new_text
from .files import atomic_path, check_output_file, write_text
from .ops.llama_layer import _cpu

METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "exact_match")
METRIC_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu": "BLEU",
                "exact_match": "exact match"}
DEFAULT_SPEEDUPS = (1.25, 1.5, 2.0)
HOW_SCORED = ("percent; ROUGE-1/2/L: rouge-score's F-measure with its default tokenizer "
              "(lowercased runs of letters and digits, no stemming), averaged over the "
              "examples; BLEU: sacrebleu's corpus BLEU (13a tokenizer); exact match: the share "
              "of outputs equal to their reference, both stripped of surrounding whitespace")


def _metric_libraries():
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise ImportError(f"layerskip eval: {error.name} is not installed (pip install "
                          "'layerskip-kernels[eval]', or rouge-score sacrebleu)") from None
    return rouge_scorer, sacrebleu


def score(predictions, references):
    """{metric: score} over the (prediction, reference) pairs, as HOW_SCORED says."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"predictions: expected one per reference ({len(references)}), got "
                         f"{len(predictions)}")
    rouge_scorer, sacrebleu = _metric_libraries()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    pairs = [scorer.score(r, p) for p, r in zip(predictions, references)]
    n = len(pairs)
    scores = {key: 100 * sum(s[key].fmeasure for s in pairs) / n
              for key in ("rouge1", "rouge2", "rougeL")}
    scores["bleu"] = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    scores["exact_match"] = 100 * sum(p.strip() == r.strip()
                                      for p, r in zip(predictions, references)) / n
    return scores


def load_examples(path, limit=None):
    """(prompts, references) from a JSON-lines file of {"prompt": str, "reference": str}
    (other keys ignored; blank lines skipped); the first `limit` examples when given. Errors
    name the file and line."""
    prompts, references = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {n}: expected a JSON object, got invalid JSON "
                             f"({error.msg})") from None
        if not (isinstance(item, dict) and isinstance(item.get("prompt"), str)
                and isinstance(item.get("reference"), str)):
            raise ValueError(f'{path} line {n}: expected {{"prompt": str, "reference": str}}, '
                             f"got {line[:80]!r}")
        prompts.append(item["prompt"])
        references.append(item["reference"])
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise ValueError(f"{path}: expected at least one example, got none")
    return prompts, references


def configurations(n_layers, exit_layers=None, speedups=DEFAULT_SPEEDUPS, exit_layer=None,
                   num_speculations=None):
    """(name, generate() settings) of every configuration, autoregressive first (the
    baseline of speed and of exactness); self-speculative last, with the model's
    recommended exit layer and k unless given."""
    configs = [("autoregressive", {"strategy": "autoregressive"})]
    configs += [(f"early_exit E={e}", {"strategy": "early_exit", "exit_layer": e})
                for e in (exit_layers or range(1, n_layers))]
    configs += [(f"layer_skip speedup={s:g}", {"strategy": "layer_skip", "speedup": s})
                for s in speedups]
    speculative = {"strategy": "self_speculative", "exit_layer": exit_layer,
                   "num_speculations": num_speculations}
    name = "self_speculative" + "".join(f" {k}={v}" for k, v in (("E", exit_layer),
                                                                   ("k", num_speculations))
                                        if v is not None)
    return configs + [(name, speculative)]


def run_eval(model, tokenizer, prompts, references, max_new_tokens, configs, stop=None,
             eos_token_id=None, repeats=3, warmup=1, batch_size=1, progress=None,
             on_repeat=None):
    """Generate, time and score every (name, settings) of configs; the report (see
    format_table). on_repeat(report), if given, gets the report of the repetitions so far
    after each one ("complete": false)."""
    ids = [tokenizer.encode(p) for p in prompts]
    last, texts = {}, {}  # each configuration's tokens (greedy: every run's), and their text

    def kept(name, run):
        def call():
            last[name], stats = run()
            return last[name], stats
        return call

    timed = [(name, settings,
              kept(name, _ours(model, ids, max_new_tokens, batch_size, stop=stop,
                               tokenizer=tokenizer, eos_token_id=eos_token_id, **settings)))
             for name, settings in configs]
    settings = {"examples": len(prompts), "max_new_tokens": max_new_tokens, "stop": stop,
                "eos_token_id": eos_token_id, "repeats": repeats, "warmup": warmup,
                "batch_size": batch_size, "greedy": True,
                "dtype": dtype_name(next(iter(model.parameters())).dtype)}
    machine, scores = machine_info(), {}

    def report(rows, done):
        base = configs[0][0]
        new_tokens = {name: sum(len(t) for t in last[name]) for name, _ in configs}
        for row in rows:
            name = row["name"]
            if name not in scores:  # decoded and scored once, outside the timed runs
                texts[name] = [cut_at_stop(new_text(tokenizer, p, t), stop)
                               for p, t in zip(ids, last[name])]
                scores[name] = score(texts[name], references)
            row.update(scores[name])
            _time_speedup(row, new_tokens[name], new_tokens[base])
            row["same_text_as_autoregressive"] = texts[name] == texts[base]
            row["same_scores_as_autoregressive"] = scores[name] == scores[base]
        return {"machine": machine, "threads": torch.get_num_threads(),
                "kernel_threads": _cpu.num_threads() if _cpu is not None else None,
                "settings": {**settings, "repeats_done": done}, "complete": done == repeats,
                "metrics": HOW_SCORED,
                "results": rows,
                "examples": [{"prompt": p, "reference": r, "outputs": {n: texts[n][i]
                                                                       for n, _ in configs}}
                             for i, (p, r) in enumerate(zip(prompts, references))]}

    checkpoint = (lambda rows, done: on_repeat(report(rows, done))) if on_repeat else None
    rows, _ = time_interleaved(timed, repeats, warmup, progress, checkpoint)
    return report(rows, repeats)


def _time_speedup(row, new_tokens, base_tokens):
    """The speedup in wall time over the same examples, beside bench's speedup in tokens/s:
    with stop strings a lossy configuration may write more or fewer tokens than
    autoregressive decoding does, and tokens/s then favours the one that writes more (its
    prompts' cost is shared by more tokens). Greedy runs write the same tokens every repeat,
    so a run's time is its tokens over its tokens/s, and the ratios of times are the ratios
    of tokens/s scaled by the token counts (every example keeps at least one token)."""
    scale = base_tokens / new_tokens
    row["new_tokens"] = new_tokens
    row["time_s"] = new_tokens / row["tokens_per_s"]
    for suffix in ("", "_min", "_max"):
        row["speedup_in_time" + suffix] = row["speedup_vs_ours_autoregressive" + suffix] * scale


def format_table(report):
    """The result rows as a table: new tokens, tokens/s, the speedup over autoregressive in
    tokens/s and in wall time, each metric, and whether the text is the autoregressive
    text."""
    lines = [f"{'configuration':<26} {'tokens':>6} {'tok/s':>7} {'x tok/s':>7} {'x time':>6} "
             + " ".join(f"{METRIC_NAMES[m]:>{max(7, len(METRIC_NAMES[m]))}}" for m in METRICS)
             + f" {'same as AR':>10}"]
    for r in report["results"]:
        lines.append(f"{r['name']:<26} {r['new_tokens']:6d} {r['tokens_per_s']:7.1f} "
                     f"{r['speedup_vs_ours_autoregressive']:6.2f}x "
                     f"{r['speedup_in_time']:5.2f}x "
                     + " ".join(f"{r[m]:{max(7, len(METRIC_NAMES[m]))}.2f}" for m in METRICS)
                     + f" {'yes' if r['same_text_as_autoregressive'] else 'no':>10}")
    return "\n".join(lines)


def plot(report, path, metric="rougeL", title=None):
    """A PNG (or the format path's suffix names) of `metric` against the speedup in wall time
    over autoregressive decoding on the same examples (see _time_speedup), one labelled
    point per configuration (bars: the min-max of the per-repeat speedups). Written
    atomically. Needs matplotlib."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("plot: matplotlib is not installed (pip install matplotlib)") from error
    colors = {"autoregressive": "black", "early_exit": "tab:blue", "layer_skip": "tab:orange",
              "self_speculative": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for strategy, color in colors.items():
        rows = [r for r in report["results"] if r["strategy"] == strategy]
        if not rows:
            continue
        x = [r["speedup_in_time"] for r in rows]
        spread = [[s - r["speedup_in_time_min"] for s, r in zip(x, rows)],
                  [r["speedup_in_time_max"] - s for s, r in zip(x, rows)]]
        ax.errorbar(x, [r[metric] for r in rows], xerr=spread, fmt="o", color=color,
                    label=strategy.replace("_", " "), capsize=2)
        for r, xi in zip(rows, x):
            label = r["name"].removeprefix(strategy).strip() or strategy
            if strategy == "layer_skip":  # its setting is a target, not what was measured
                label = f"target {r['speedup']:g}x"
            ax.annotate(label, (xi, r[metric]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set(xlabel="speedup over autoregressive: its time / this configuration's time on the "
                  "same examples", xscale="log",
           ylabel=f"{METRIC_NAMES[metric]} (%)")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    s = report["settings"]
    ax.set_title(title or f"{METRIC_NAMES[metric]} against speedup: {s['examples']} examples, "
                 f"{s['max_new_tokens']} new tokens at most", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path, "--plot") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


def main_eval(args):
    """`layerskip eval`: arguments, the data and the output paths are checked before the
    model loads; the JSON report is rewritten (atomically) after every repetition, so an
    interrupted run keeps the repetitions that finished ("complete": false); the table and
    the plot come at the end."""
    _metric_libraries()
    output = Path(args.output)
    check_output_file(output, "--output", args.overwrite)
    if args.plot:
        check_output_file(args.plot, "--plot", args.overwrite)
    require_file(args.data, "--data")
    with reading("--data", args.data, flags=False):
        prompts, references = load_examples(args.data, args.limit)
    model, tokenizer, tokenizer_path = load_tokenizer_and_model(
        args, "--tokenizer: eval needs a tokenizer (none beside the model)")
    L = model.config.n_layers
    if args.exit_layers:
        check_exit_layers(args.exit_layers, L)
    check_exit_layer(model, args.exit_layer)
    # self-speculation's E and k as generate() would default them, named in the report
    E = args.exit_layer or model.config.exit_layer or default_exit_layer(L)
    k = args.num_speculations or model.config.num_speculations or DEFAULT_NUM_SPECULATIONS
    configs = configurations(L, args.exit_layers, args.speedups or DEFAULT_SPEEDUPS, E, k)
    eos = stop_tokens(args, model, tokenizer)
    ids = [tokenizer.encode(p) for p in prompts]
    check_fits(model, tokenizer, tokenizer_path, ids,
               [f"--data {args.data} example {n}" for n in range(1, len(ids) + 1)],
               args.max_new_tokens, reserve=k + 1, eos_token_id=eos)
    done = []

    def keep(report):
        report["settings"].update(model=args.model, data=str(args.data))
        write_text(output, json.dumps(report, indent=1) + "\n", "--output")
        done.append(report["settings"]["repeats_done"])

    try:
        with Progress(args.quiet) as progress:
            report = run_eval(model, tokenizer, prompts, references, args.max_new_tokens,
                              configs, stop=args.stop, eos_token_id=eos, repeats=args.repeats,
                              warmup=args.warmup, batch_size=args.batch_size,
                              progress=progress, on_repeat=keep)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_kept(output, done, args.repeats)) from None
    print(format_table(report))
    speculative = report["results"][-1]
    same = speculative["same_scores_as_autoregressive"]
    print(f"self-speculative scores {'equal' if same else 'DIFFER FROM'} the autoregressive "
          "scores", file=sys.stderr)
    if args.plot:
        plot(report, args.plot, args.metric)
        print(f"wrote {args.plot}", file=sys.stderr)
    print(f"wrote {output}", file=sys.stderr)
    return report


def add_eval_command(sub):
    """The `eval` subcommand, added by cli.build_parser."""
    p = subparser(sub, "eval", "score generations against references: quality vs speedup",
                  "Each decoding configuration (autoregressive, early exit at each E, layer "
                  "skip at each speedup, self-speculative) continues every prompt of --data "
                  "(JSON lines of {\"prompt\": ..., \"reference\": ...}), greedily; the "
                  "continuations are scored with ROUGE-1/2/L, BLEU and exact match and timed "
                  "as `bench` times (interleaved repeats). The JSON report (rewritten "
                  "atomically after every repetition) holds every configuration's scores, "
                  "speed and outputs; a table is printed and --plot draws quality against "
                  "speedup. Needs pip install 'layerskip-kernels[eval]'.")
    add_model_args(p)
    p.add_argument("--data", metavar="FILE.jsonl", required=True,
                   help='JSON lines of {"prompt": str, "reference": str}')
    p.add_argument("--limit", metavar="N", type=int_at_least(1), help="the first N examples")
    p.add_argument("--max-new-tokens", metavar="N", type=int_at_least(1), default=64,
                   help="new tokens per prompt, at most")
    p.add_argument("--stop", metavar="TEXT", action="append", type=stop_arg,
                   help="end a continuation before TEXT (repeatable; backslash escapes read, "
                   "e.g. '\\n\\n')")
    p.add_argument("--eos-token-id", metavar="IDS", action="append", type=eos_arg,
                   help="stop a row after this token: ids (comma list, repeatable) or 'none' "
                   "(default: the model config's EOS, else the tokenizer's)")
    p.add_argument("--exit-layers", metavar="E,...", type=comma_list(int_at_least(1)),
                   help="early exit at each E (default: every E from 1 to L-1)")
    p.add_argument("--speedups", metavar="R,...", type=comma_list(float_in(1)),
                   help="layer skip at each target speedup (default: "
                   f"{','.join(map(str, DEFAULT_SPEEDUPS))})")
    p.add_argument("--exit-layer", metavar="E", type=int_at_least(1),
                   help="self-speculative exit layer (default: the model's recommendation, "
                   "else L // 4)")
    p.add_argument("--num-speculations", metavar="K", type=int_at_least(1),
                   help="self-speculative draft length (default: the model's "
                   "recommendation, else 4)")
    p.add_argument("--batch-size", metavar="N", type=int_at_least(1), default=1,
                   help="decode the prompts in batches of N (1: each alone, as a single user "
                   "would)")
    p.add_argument("--repeats", metavar="N", type=int_at_least(1), default=3,
                   help="timed runs of each configuration")
    p.add_argument("--warmup", metavar="N", type=int_at_least(0), default=1,
                   help="untimed runs first")
    p.add_argument("--threads", metavar="N", type=threads_arg,
                   help="CPU threads of torch and of the C++ kernels (default: as bench)")
    p.add_argument("--output", metavar="FILE.json", required=True,
                   help="where to write the JSON report (rewritten after every repetition)")
    p.add_argument("--plot", metavar="FILE.png", help="quality against speedup, one point "
                   "per configuration")
    p.add_argument("--metric", choices=METRICS, default="rougeL", help="--plot's quality axis")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output / --plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=main_eval)
    return p


def comma_list(parse):
    """A comma list, each item parsed by `parse`."""
    def parse_list(text):
        return [parse(x) for x in text.split(",") if x.strip()]
    return parse_list
