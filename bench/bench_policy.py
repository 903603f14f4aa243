"""exit_layer="auto" (the adaptive policy) against fixed (E, k) and autoregressive decoding,
in one process, each prompt alone, its configurations back to back in every repeat (the
machine's speed drifts: on a shared 2-core machine by several times within a minute).

    python bench/bench_policy.py --model ../shared/data/stories260K.bin --fixed 1:4,4:1
    python bench/bench_policy.py --prompts bench/results/default_model/heldout_prompts.json \
        --fixed 3:3,3:2,4:1 --output DIR --plot DIR/choices.png
    python bench/bench_policy.py --text ../shared/data/tinystories_val.txt --fixed 3:3
    python bench/bench_policy.py --replot DIR/results.json --plot choices.png

--prompts: a JSON list of token-id lists, or --text FILE: its first --count non-empty lines
(200 characters each) through --tokenizer (default: the default model's); else BOS alone.
--fixed E:K,...: the fixed self-speculative pairs beside autoregressive and auto. --batch:
the prompts as one ragged batch. --cold: every auto call starts as the model's first would
(its exploration paid in every call), where by default it recalls what the model's last auto
call of the same shape learned. Prints one line per configuration: median tokens/s, the
ratio to autoregressive (median of the repeats' ratios, and min-max), exactness, acceptance
and, for auto, its rounds per choice (last repeat). Each prompt alone with fixed pairs, it
also prints auto / the best fixed pair per prompt and over every 4-prompt subset (see
subset_ratios).

--output DIR writes DIR/results.json (rewritten after every repeat, "complete": false until
the end): the machine and its load averages, the command line, the commit, the settings and,
per configuration, prompt (or batch) and repeat: seconds, tokens, exactness, acceptance and
tokens per round, and auto's choices and stints (its choices over time); then the summary
and the subset statistics. --plot FILE.png draws auto's choices over time in the last repeat,
one band per prompt; --replot RESULTS.json redraws it from a results.json without running.
An existing output is refused unless --overwrite, before any work (layerskip_kernels/files.py).
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import nullcontext
from itertools import combinations
from pathlib import Path

import layerskip_kernels as lsk
from layerskip_kernels.benchmark import machine_info
from layerskip_kernels.decoding.estimates import without_memory
from layerskip_kernels.files import (OutputPathError, atomic_path, check_output_dir,
                                     check_output_file, write_text)

AUTO, BASE = "auto", "autoregressive"
SUBSET = 4  # the target: auto >= 0.97x the best fixed pair on any 4-prompt subset
# What an auto run keeps of generate()'s stats, where present (shadow_rounds: the policy's
# agreement estimator, when it has one).
POLICY_STATS = ("choices", "stints", "fallback_rounds", "policy_s", "exit_acceptance",
                "shadow_rounds", "recalled")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="default: the embedded default model")
    p.add_argument("--prompts", help="JSON list of token-id lists (default: BOS alone)")
    p.add_argument("--text", help="a text file: its first --count lines are the prompts")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--tokenizer", help="for --text (default: the default model's)")
    p.add_argument("--fixed", default="", help="E:K,... fixed self-speculative pairs")
    p.add_argument("--batch", action="store_true",
                   help="the prompts as one ragged batch (default: each alone)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", metavar="DIR", help="write DIR/results.json")
    p.add_argument("--plot", metavar="FILE.png", help="auto's choices over time (last repeat)")
    p.add_argument("--replot", metavar="RESULTS.json",
                   help="draw --plot from a results.json, without running anything")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--cold", action="store_true",
                   help="every auto call starts as the model's first (explores; by default a "
                        "call recalls what the model's last auto call of its shape learned)")
    args = p.parse_args(argv)
    try:
        args.pairs = [tuple(map(int, pair.split(":"))) for pair in args.fixed.split(",") if pair]
    except ValueError:
        args.pairs = None
    if args.pairs is None or any(len(pair) != 2 for pair in args.pairs):
        p.error(f"--fixed: expected E:K,... (e.g. 3:3,4:1), got {args.fixed!r}")
    if args.replot and not args.plot:
        p.error("--replot: needs --plot FILE.png (where to draw it)")
    if args.replot and not Path(args.replot).is_file():
        p.error(f"--replot {args.replot}: expected a results.json file")
    if args.repeats < 1:
        p.error(f"--repeats: expected an integer >= 1, got {args.repeats}")
    try:  # before any work: an existing output, a directory that takes no files
        if args.output:
            check_output_dir(args.output, "--output", ["results.json"], args.overwrite)
        if args.plot:
            check_output_file(args.plot, "--plot", args.overwrite)
            import matplotlib  # noqa: F401 (refused now, not after the run)
    except OutputPathError as error:
        p.error(str(error))
    except ImportError:
        p.error("--plot: needs matplotlib (pip install matplotlib)")
    return args


def load_prompts(args, model):
    if args.text:
        tok = lsk.load_tokenizer(args.tokenizer)
        lines = [line for line in open(args.text).read().splitlines() if line.strip()]
        return [tok.encode(line[:200]) for line in lines[:args.count]]
    bos = model.config.bos_token_id
    return json.load(open(args.prompts)) if args.prompts else [[bos or 0]]


def configurations(pairs):
    """(name, generate() arguments): autoregressive first (the baseline), the fixed pairs,
    auto last."""
    return [(BASE, {})] + [
        (f"E{e} k{k}", {"strategy": "self_speculative", "exit_layer": e, "num_speculations": k})
        for e, k in pairs] + [(AUTO, {"strategy": "self_speculative", "exit_layer": "auto"})]


def run_record(name, seconds, result, base_tokens):
    """What results.json keeps of one generate() call."""
    stats = result.stats
    record = {"seconds": seconds, "tokens": sum(map(len, result.tokens)),
              "exact": result.tokens == base_tokens}
    if "drafted" in stats:
        record.update(accepted=stats["accepted"], drafted=stats["drafted"],
                      acceptance=stats.get("acceptance_rate"),
                      tokens_per_round=stats.get("tokens_per_round"))
    if name == AUTO:
        record.update({key: stats[key] for key in POLICY_STATS if key in stats})
    return record


def measure(model, groups, configs, args, on_repeat=None):
    """runs[name][group][repeat] (warm-up repeats dropped): each group's configurations back
    to back in every repeat, so that the machine's drift hits them alike. on_repeat(runs,
    done) after each measured repeat."""
    runs = {name: [[] for _ in groups] for name, _ in configs}
    for rep in range(args.warmup + args.repeats):
        for g, group in enumerate(groups):
            for name, kw in configs:
                cold = without_memory(model) if name == AUTO and args.cold else nullcontext()
                with cold:
                    start = time.perf_counter()
                    res = lsk.generate(model, group, args.max_new_tokens, eos_token_id=[], **kw)
                    seconds = time.perf_counter() - start
                if name == BASE:
                    base_tokens = res.tokens
                if rep >= args.warmup:
                    runs[name][g].append(run_record(name, seconds, res, base_tokens))
        if on_repeat and rep >= args.warmup:
            on_repeat(runs, rep + 1 - args.warmup)
    return runs


def summary(runs):
    """Per configuration, over the repeats (each summed over the groups): median tokens/s,
    the ratio to autoregressive (time of autoregressive / its time: median, min, max),
    exactness in every run, and the last repeat's acceptance and auto's choices."""
    repeats = len(runs[BASE][0])

    def total(name, key, rep):
        return sum(group[rep][key] for group in runs[name])
    out = {}
    for name in runs:
        ratios = sorted(total(BASE, "seconds", r) / total(name, "seconds", r)
                        for r in range(repeats))
        rates = [total(name, "tokens", r) / total(name, "seconds", r) for r in range(repeats)]
        row = {"tokens_per_s": statistics.median(rates),
               "ratio": statistics.median(ratios), "ratio_min": ratios[0],
               "ratio_max": ratios[-1],
               "exact": all(run["exact"] for group in runs[name] for run in group)}
        last = [group[-1] for group in runs[name]]
        if sum(run.get("drafted", 0) for run in last):
            row["acceptance"] = (sum(run["accepted"] for run in last)
                                 / sum(run["drafted"] for run in last))
        if name == AUTO:
            row["choices"] = dict(sum((Counter(run["choices"]) for run in last), Counter())
                                  .most_common())
        out[name] = row
    return out


def subset_ratios(tokens, seconds, auto, fixed, size):
    """auto / the best fixed configuration on every subset of `size` prompts (all
    combinations, in order). tokens[name][prompt][repeat] and seconds likewise: each prompt
    alone. A configuration's speed on a subset in one repeat is its total tokens / total
    seconds over the subset's prompts; the best fixed is the one of `fixed` with the highest
    median speed over the repeats (the first on a tie); the ratio is the median over repeats
    of auto's speed / the best's in that repeat. Returns [{"prompts", "ratio", "best_fixed"}]."""
    repeats = len(seconds[auto][0])

    def speeds(name, subset):
        return [sum(tokens[name][p][r] for p in subset) / sum(seconds[name][p][r] for p in subset)
                for r in range(repeats)]
    rows = []
    for subset in combinations(range(len(seconds[auto])), size):
        fixed_speeds = {name: speeds(name, subset) for name in fixed}
        best = max(fixed, key=lambda name: statistics.median(fixed_speeds[name]))
        ratio = statistics.median(a / b for a, b in zip(speeds(auto, subset), fixed_speeds[best]))
        rows.append({"prompts": list(subset), "ratio": ratio, "best_fixed": best})
    return rows


def subset_summary(rows, size):
    """The minimum and median ratio of subset_ratios' rows, and the worst subset."""
    ratios = [row["ratio"] for row in rows]
    return {"size": size, "count": len(rows), "min": min(ratios),
            "median": statistics.median(ratios), "worst": min(rows, key=lambda r: r["ratio"])}


def versus_best_fixed(runs):
    """Per prompt and over every SUBSET-prompt subset (where there are that many): auto / the
    best fixed pair, from runs with each prompt alone."""
    fixed = [name for name in runs if name not in (BASE, AUTO)]
    tokens = {name: [[run["tokens"] for run in group] for group in runs[name]] for name in runs}
    seconds = {name: [[run["seconds"] for run in group] for group in runs[name]]
               for name in runs}
    out = {"per_prompt": subset_ratios(tokens, seconds, AUTO, fixed, 1)}
    if len(runs[AUTO]) >= SUBSET:
        out["subsets"] = subset_summary(subset_ratios(tokens, seconds, AUTO, fixed, SUBSET),
                                        SUBSET)
    return out


def commit():
    """(git rev-parse HEAD, whether the work tree differs from it), or (None, None)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head, bool(dirty.strip())


def print_report(report):
    s, machine = report["settings"], report["machine"]
    print(f"load average before: {tuple(machine['load_average_before'])}, after: "
          f"{tuple(machine['load_average_after'])}; {s['prompts']} prompts, "
          f"{'one batch' if s['batch'] else 'each alone'}, {s['max_new_tokens']} new tokens, "
          f"{s['warmup']} warm-up + {s['repeats']} repeats; ratio to autoregressive: median "
          "of the repeats' ratios (min-max)")
    for name, row in report["summary"].items():
        print(f"{name:<16} {row['tokens_per_s']:9.1f} tok/s  "
              f"{row['ratio']:.2f}x AR ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})  exact "
              f"{'yes' if row['exact'] else 'NO'}"
              + (f"  acceptance {row['acceptance']:.2f}" if "acceptance" in row else "")
              + (f"  {row['choices']}" if name == AUTO else ""))
    stints = report["runs"][AUTO][-1][-1]["stints"]
    print("auto, the last prompt's choices over time (choice, rounds): "
          + ", ".join(f"{name} x{n}" for name, n in stints))
    if "per_prompt" in report:
        print("auto / the best fixed pair, per prompt (median of the repeats' ratios): "
              + ", ".join(f"{row['prompts'][0]}: {row['ratio']:.2f} ({row['best_fixed']})"
                          for row in report["per_prompt"]))
    if "subsets" in report:
        sub = report["subsets"]
        worst = sub["worst"]
        print(f"auto / the best fixed pair over all {sub['count']} {sub['size']}-prompt "
              f"subsets: min {sub['min']:.3f}, median {sub['median']:.3f}; worst: prompts "
              f"{','.join(map(str, worst['prompts']))} ({worst['ratio']:.3f} of "
              f"{worst['best_fixed']})")


def stint_colours(names):
    """{choice name: colour}: autoregressive grey, each "E k" a colour of tab10 in (E, k)
    order."""
    from matplotlib import colormaps
    def natural(name):  # E2 k4 before E10 k1
        return [(0, int(part), "") if part.isdigit() else (1, 0, part)
                for part in re.findall(r"\d+|\D+", name)]
    options = sorted((n for n in names if n != BASE), key=natural)
    colours = {name: colormaps["tab10"](i % 10) for i, name in enumerate(options)}
    return {BASE: "0.75", **colours} if BASE in names else colours


def plot_choices(report, path):
    """Draw choices_figure(report) to path (--plot)."""
    with atomic_path(path, "--plot") as tmp:
        choices_figure(report).savefig(tmp, dpi=120)


def choices_figure(report):
    """Auto's choices over time in the last repeat of a results.json's report: one band per
    prompt (or the batch), its rounds along x, each stint coloured by its choice."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.patches import Patch
    bands = [group[-1]["stints"] for group in report["runs"][AUTO]]
    colours = stint_colours({name for stints in bands for name, _ in stints})
    fig = Figure(figsize=(8, 1.4 + 0.3 * len(bands)))
    ax = fig.add_subplot()
    for y, stints in enumerate(bands):
        start = 0
        for name, rounds in stints:
            ax.broken_barh([(start, rounds)], (y - 0.4, 0.8), color=colours[name])
            start += rounds
    s = report["settings"]
    ax.set_yticks(range(len(bands)),
                  ["batch"] if s["batch"] else [str(i) for i in range(len(bands))])
    ax.invert_yaxis()
    ax.set(xlabel="round", ylabel="batch" if s["batch"] else "prompt")
    ax.legend(handles=[Patch(color=c, label=n) for n, c in colours.items()], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1), title="choice")
    model = Path(s["model"]).name if s.get("model") else "default model"
    ax.set_title(f'exit_layer="auto": the choice of each round (last repeat)\n{model}, '
                 f"{s['prompts']} prompts, {s['max_new_tokens']} new tokens", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        plot_choices(json.loads(Path(args.replot).read_text()), args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
        return
    model = lsk.load_model(args.model)
    lsk.set_num_threads(args.threads)
    prompts = load_prompts(args, model)
    configs = configurations(args.pairs)
    head, dirty = commit()
    machine = {**machine_info(), "load_average_before": os.getloadavg()}
    machine.pop("commit")  # its short hash: ours is the full one
    report = {"command": shlex.join([sys.executable, *sys.argv] if argv is None
                                    else ["bench/bench_policy.py", *argv]),
              "commit": head, "commit_dirty": dirty, "machine": machine,
              "settings": {"model": args.model, "prompts_file": args.prompts or args.text,
                           "prompts": len(prompts), "batch": args.batch,
                           "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                           "warmup": args.warmup, "threads": args.threads, "cold": args.cold,
                           "fixed": [list(pair) for pair in args.pairs]}}

    def keep(runs, done, complete=False):
        machine["load_average_after"] = os.getloadavg()
        report.update(complete=complete, repeats_done=done, runs=runs)
        if args.output:
            write_text(Path(args.output) / "results.json", json.dumps(report, indent=1) + "\n",
                       "--output")
    groups = [prompts] if args.batch else [[p] for p in prompts]
    runs = measure(model, groups, configs, args, keep)
    report["summary"] = summary(runs)
    if not args.batch and args.pairs:
        report.update(versus_best_fixed(runs))
    keep(runs, args.repeats, complete=True)
    print_report(report)
    if args.plot:
        plot_choices(report, args.plot)
    wrote = [str(Path(args.output) / "results.json")] if args.output else []
    if wrote or args.plot:
        print("wrote " + ", ".join(wrote + ([args.plot] if args.plot else [])), file=sys.stderr)


if __name__ == "__main__":
    main()
