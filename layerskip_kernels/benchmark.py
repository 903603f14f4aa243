"""End-to-end benchmark: every decoding strategy, ours and transformers', on the same weights,
prompts and settings, in one process. Configurations are interleaved across repeats so that
drift in machine speed hits them all alike; we report median and spread of tokens/s."""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from .cli_args import UsageError, float_in, parse_ints
from .cli_checks import (check_exit_layers, check_fits, load_tokenizer_and_model,
                         require_file)
from .decoding import generate
from .decoding.generate import (AUTO_DRAFT_CAP, DEFAULT_NUM_SPECULATIONS, STRATEGIES,
                                default_exit_layer)
from .files import check_output_file, write_text
from .model import save_hf_directory
from .ops.llama_layer import _cpu


def machine_info():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "commit": commit or None, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def dtype_name(dtype):
    """"float32", not "torch.float32": how reports and JSON name a dtype."""
    return str(dtype).removeprefix("torch.")


def _ours(model, prompts, max_new_tokens, batch_size=None, **kwargs):
    """A run of generate() over the prompts, in batches of batch_size (None: all at once):
    (tokens, stats) with the batches' round counts summed."""
    size = batch_size or len(prompts)

    def run():
        tokens, stats = [], {}
        for first in range(0, len(prompts), size):
            result = generate(model, prompts[first:first + size],
                              max_new_tokens=max_new_tokens, **kwargs)
            tokens += result.tokens
            for key, value in result.stats.items():
                summed = key in SUMMED and key in stats
                if key == "choices" and key in stats:  # the adaptive policy's, per batch
                    value = dict(Counter(stats[key]) + Counter(value))
                stats[key] = stats[key] + value if summed else value
        if "drafted" in stats:
            stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
            stats["tokens_per_round"] = ((stats["accepted"] + stats["row_rounds"])
                                         / max(stats["row_rounds"], 1))
        return tokens, stats
    return run


SUMMED = ("rounds", "row_rounds", "drafted", "accepted", "new_tokens", "time_s", "prefill_s",
          "capture_s", "fallback_rounds", "policy_s")


def _transformers(hf_model, prompts, max_new_tokens, **kwargs):
    """transformers' generate, one prompt at a time (its assistant_early_exit is batch-1)."""
    def run():
        tokens = []
        for prompt in prompts:
            ids = torch.tensor([prompt], device=hf_model.device)
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    pad_token_id=0, **kwargs)
            tokens.append(out[0, len(prompt):].tolist())
        return tokens, {}
    return run


def _load_transformers(model, dtype):
    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_directory(model, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype)
    return hf.to(model.embed_tokens.weight.device).eval()


def configurations(model, prompts, max_new_tokens, exit_layers, draft_lengths, speedups,
                   with_transformers, cuda_graphs=None, batch_size=None, strategies=STRATEGIES,
                   adaptive=False):
    """(name, settings, callable) for every configuration of `strategies` to time: ours
    autoregressive first, always (every speedup and exactness check is against it); early_exit
    at each exit layer; self_speculative at each (E, k), at each E with k="auto", and, when
    layer_skip is chosen too, drafted by each speedup's layer subset at each k; layer_skip at
    each speedup; with_transformers, transformers' generate and, when self_speculative is
    chosen, its assistant_early_exit at each E; adaptive (with self_speculative), our
    self_speculative with exit_layer="auto". exit_layers None: every layer in [1, L).
    cuda_graphs goes to each of our generate() calls (False: eager even on CUDA)."""
    L = model.config.n_layers
    exit_layers = exit_layers or range(1, L)
    chosen = set(strategies)
    speculative = "self_speculative" in chosen
    configs = [("ours autoregressive", {"strategy": "autoregressive"})]
    if "early_exit" in chosen:
        configs += [(f"ours early_exit E={e}", {"strategy": "early_exit", "exit_layer": e})
                    for e in exit_layers]
    if speculative:
        configs += [(f"ours self_speculative E={e} k={k}",
                     {"strategy": "self_speculative", "exit_layer": e, "num_speculations": k})
                    for e in exit_layers for k in draft_lengths]
        configs += [(f"ours self_speculative E={e} k=auto",
                     {"strategy": "self_speculative", "exit_layer": e, "num_speculations": "auto"})
                    for e in exit_layers]
        if adaptive:
            configs.append(("ours self_speculative E=auto",
                            {"strategy": "self_speculative", "exit_layer": "auto"}))
    if "layer_skip" in chosen:
        configs += [(f"ours layer_skip speedup={s}", {"strategy": "layer_skip", "speedup": s})
                    for s in speedups]
        configs += [(f"ours self_speculative draft=layer_skip speedup={s} k={k}",
                     {"strategy": "self_speculative", "draft": "layer_skip", "speedup": s,
                      "num_speculations": k})
                    for s in speedups for k in (draft_lengths if speculative else ())]
    timed = [(name, settings,
              _ours(model, prompts, max_new_tokens, batch_size, cuda_graphs=cuda_graphs,
                    **settings))
             for name, settings in configs]
    if with_transformers:
        hf = _load_transformers(model, model.embed_tokens.weight.dtype)
        timed.append(("transformers generate", {"strategy": "autoregressive"},
                      _transformers(hf, prompts, max_new_tokens)))
        timed += [(f"transformers assistant_early_exit E={e}",
                   {"strategy": "assistant_early_exit", "exit_layer": e},
                   _transformers(hf, prompts, max_new_tokens, assistant_early_exit=e))
                  for e in (exit_layers if speculative else ())]
    return timed


def time_interleaved(timed, repeats, warmup, progress=None, on_repeat=None):
    """Run every (name, settings, callable) warmup + repeats times, round-robin; return the
    result rows (see summarize) and the last run's outputs per name. progress(done, total,
    name) is called after each run; on_repeat(rows, repeats_done) after each measured
    repetition, with the rows of the repetitions so far (to keep them if the run stops)."""
    times = {name: [] for name, _, _ in timed}
    outputs, stats = {}, {}
    total = (warmup + repeats) * len(timed)
    for rep in range(warmup + repeats):
        for i, (name, _, run) in enumerate(timed):
            start = time.perf_counter()
            outputs[name], stats[name] = run()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
            if progress:
                progress(rep * len(timed) + i + 1, total, name)
        if on_repeat and rep >= warmup:
            on_repeat(summarize(timed, times, outputs, stats), rep + 1 - warmup)
    return summarize(timed, times, outputs, stats), outputs


def summarize(timed, times, outputs, stats):
    """One row per configuration: its settings, median / min / max tokens/s over the timed
    repeats, the speedup over the first entry (ratio of medians, and the min-max of the
    per-repeat ratios, each repeat's runs being back to back), exactness against the first
    entry, and what generate() reported (acceptance, tokens per round, the exit layer and k
    it used and which of them were defaults, whether CUDA graphs ran)."""
    base_name = timed[0][0]
    base_rates = _rates(outputs[base_name], times[base_name])
    results = []
    for name, settings, _ in timed:
        rates = _rates(outputs[name], times[name])
        ratios = sorted(r / b for r, b in zip(rates, base_rates))
        ordered = sorted(rates)
        row = {"name": name, **settings, "tokens_per_s": statistics.median(ordered),
               "tokens_per_s_min": ordered[0], "tokens_per_s_max": ordered[-1],
               "same_tokens_as_autoregressive": outputs[name] == outputs[base_name],
               "speedup_vs_ours_autoregressive": statistics.median(ordered)
               / statistics.median(base_rates),
               "speedup_vs_ours_autoregressive_min": ratios[0],
               "speedup_vs_ours_autoregressive_max": ratios[-1]}
        s = stats[name]
        row.update({key: s[key] for key in ("acceptance_rate", "tokens_per_round", "rounds",
                                            "drafted", "cuda_graphs", "path", "choices",
                                            "fallback_rounds", "policy_s", "exit_acceptance")
                    if key in s})
        if s.get("strategy") == "self_speculative":
            for key in ("exit_layer", "num_speculations"):  # what ran, where settings left None
                if row.get(key) is None and s.get(key) is not None:
                    row[key] = s[key]
            if s.get("defaulted"):
                row["defaulted"] = s["defaulted"]
        k = row.get("num_speculations")
        if isinstance(k, int) and row.get("tokens_per_round"):
            row["speedup_if_all_accepted"] = speedup_if_all_accepted(
                row["speedup_vs_ours_autoregressive"], k, row["tokens_per_round"])
        results.append(row)
    return results


def _rates(outputs, times):
    n_tokens = sum(len(t) for t in outputs)
    return [n_tokens / t for t in times]


def speedup_if_all_accepted(speedup, num_speculations, tokens_per_round):
    """A measured self-speculative speedup scaled to rounds that accept every draft (k + 1
    tokens each): the most a better-trained exit could give at this (E, k), as a round's
    cost barely depends on how many drafts it accepts."""
    return speedup * (num_speculations + 1) / tokens_per_round


DRAFT_LENGTHS = (1, 2, 4, 8)  # run_benchmark's default k grid
SPEEDUPS = (1.25, 1.5)  # ... and layer_skip speedups


def run_benchmark(model, prompts, max_new_tokens=200, repeats=5, warmup=1, exit_layers=None,
                  draft_lengths=DRAFT_LENGTHS, speedups=SPEEDUPS, with_transformers=True,
                  progress=None, cuda_graphs=None, on_repeat=None, batch_size=None,
                  strategies=STRATEGIES, adaptive=False):
    """Time every configuration of `strategies` (see configurations); the report: machine,
    threads, settings (the grid among them), "complete" and the result rows. on_repeat(report),
    if given, gets the report of the repetitions done so far after each one ("complete":
    false, settings["repeats_done"])."""
    timed = configurations(model, prompts, max_new_tokens, exit_layers, draft_lengths,
                           speedups, with_transformers, cuda_graphs, batch_size, strategies,
                           adaptive)
    machine = machine_info()
    settings = {"strategies": [s for s in STRATEGIES if s in strategies],
                "exit_layers": list(exit_layers or range(1, model.config.n_layers)),
                "draft_lengths": list(draft_lengths), "speedups": list(speedups),
                "prompts": len(prompts), "max_new_tokens": max_new_tokens, "repeats": repeats,
                "warmup": warmup, "greedy": True,
                "dtype": dtype_name(next(iter(model.parameters())).dtype),
                "cuda_graphs": cuda_graphs, "batch_size": batch_size or len(prompts)}

    def report(results, done):
        hf_base = next((r["tokens_per_s"] for r in results
                        if r["name"] == "transformers generate"), None)
        for row in results:
            row["speedup_vs_transformers_generate"] = (row["tokens_per_s"] / hf_base
                                                       if hf_base else None)
        return {"machine": machine, "threads": torch.get_num_threads(),
                "kernel_threads": _cpu.num_threads() if _cpu is not None else None,
                "settings": {**settings, "repeats_done": done}, "complete": done == repeats,
                "results": results}

    checkpoint = (lambda rows, done: on_repeat(report(rows, done))) if on_repeat else None
    results, _ = time_interleaved(timed, repeats, warmup, progress, checkpoint)
    return report(results, repeats)


def compare(model, prompts, max_new_tokens, repeats=3, warmup=1, cuda_graphs=None,
            eos_token_id=None, progress=None, batch_size=None, **speculative):
    """Greedy autoregressive against self-speculative decoding, interleaved: result rows
    and the outputs of each. cuda_graphs, eos_token_id and batch_size go to both."""
    common = {"cuda_graphs": cuda_graphs, "eos_token_id": eos_token_id}
    timed = [("autoregressive", {}, _ours(model, prompts, max_new_tokens, batch_size, **common)),
             ("self_speculative", speculative,
              _ours(model, prompts, max_new_tokens, batch_size, strategy="self_speculative",
                    **common, **speculative))]
    return time_interleaved(timed, repeats, warmup, progress)


def format_table(report):
    lines = [f"{'configuration':<55} {'tok/s':>8} {'(min-max)':>15} {'vs AR':>6} "
             f"{'vs HF':>6} {'accept':>6} {'exact':>5}"]
    for r in report["results"]:
        hf = r.get("speedup_vs_transformers_generate")
        accept = r.get("acceptance_rate")
        lines.append(
            f"{r['name']:<55} {r['tokens_per_s']:8.1f} "
            f"{'(%.0f-%.0f)' % (r['tokens_per_s_min'], r['tokens_per_s_max']):>15} "
            f"{r['speedup_vs_ours_autoregressive']:6.2f} {'-' if hf is None else round(hf, 2):>6} "
            f"{'' if accept is None else round(accept, 3):>6} "
            f"{'yes' if r['same_tokens_as_autoregressive'] else 'no':>5}")
    return "\n".join(lines)


def load_prompts(model, prompts_path, tokenizer):
    """(prompts, labels): one prompt per non-empty line of prompts_path (needs a tokenizer);
    a .json file instead holds a list of prompts, each a string (needs a tokenizer; may span
    lines, as code does) or a list of token ids; no file: BOS alone. The labels name each
    prompt's source for error messages."""
    if not prompts_path:
        bos = model.config.bos_token_id
        return [[bos if bos is not None else 0]], ["the default prompt (BOS)"]
    if str(prompts_path).endswith(".json"):
        return _json_prompts(prompts_path, tokenizer)
    if tokenizer is None:
        raise ValueError("--prompts: a prompts file needs --tokenizer")
    if isinstance(tokenizer, (str, Path)):
        from .model import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    lines = Path(prompts_path).read_text().splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    return ([tokenizer.encode(line) for _, line in numbered],
            [f"--prompts {prompts_path} line {n}" for n, _ in numbered])


def _json_prompts(path, tokenizer):
    try:
        items = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--prompts {path}: expected a JSON list of prompts, got invalid "
                         f"JSON ({error})") from None
    ok = isinstance(items, list) and items and all(
        isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(i, int) for i in p))
        for p in items)
    if not ok:
        raise ValueError(f"--prompts {path}: expected a non-empty JSON list of strings or of "
                         "non-empty token-id lists")
    if any(isinstance(p, str) for p in items) and tokenizer is None:
        raise ValueError("--prompts: text prompts need --tokenizer")
    if isinstance(tokenizer, (str, Path)):
        from .model import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in items]
    return prompts, [f"--prompts {path} item {n}" for n in range(len(items))]


class Progress:
    """A tqdm bar on stderr over time_interleaved's runs (tqdm handles a non-terminal stderr
    and the ETA), showing the configuration that just ran; quiet: nothing. A context
    manager, so that the bar is closed before an error is printed."""

    def __init__(self, quiet=False):
        self.quiet, self.bar = quiet, None

    def __call__(self, done, total, name):
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(name[:50], refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


BENCH_STRATEGIES = ("autoregressive", "early_exit", "self_speculative")  # `bench`'s default


def parse_strategies(text, arg="--strategies"):
    """A comma list of generate()'s strategies, in STRATEGIES' order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or set(names) - set(STRATEGIES):
        raise UsageError(f"{arg}: expected a comma list of {', '.join(STRATEGIES)}, "
                         f"got {text!r}")
    return tuple(s for s in STRATEGIES if s in names)


def parse_speedups(text, arg="--speedups"):
    """A comma list of layer_skip target speedups, each >= 1."""
    try:
        values = [float_in(1)(x) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise UsageError(f"{arg}: expected a comma list of numbers >= 1, got {text!r}")
    return values


def parse_exit_layers(text, arg="--exit-layers"):
    """`bench`'s --exit-layers: a comma list of exit layers >= 1 and "auto" (the adaptive
    policy, exit_layer="auto"): (the layers, None where auto is alone; whether auto is in)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    layers = [name for name in names if name != "auto"]
    if names and not layers:
        return None, True
    try:
        return parse_ints(",".join(layers), arg), len(layers) < len(names)
    except UsageError:
        raise UsageError(f"{arg}: expected a comma list of integers >= 1 and auto, got "
                         f"{text!r}") from None


def bench_grid(args):
    """`bench`'s selection, checked before the model loads: (strategies, exit layers, draft
    lengths, speedups, adaptive); exit layers and draft lengths are None where not given (the
    model's recommendation is their default); adaptive: --exit-layers holds auto. A list that
    no chosen strategy uses is an error."""
    strategies = parse_strategies(getattr(args, "strategies", None)
                                  or ",".join(BENCH_STRATEGIES))
    lists = {}
    for flag, parse, users in (("--exit-layers", parse_exit_layers,
                                ("early_exit", "self_speculative")),
                               ("--draft-lengths", parse_ints, ("self_speculative",)),
                               ("--speedups", parse_speedups, ("layer_skip",))):
        text = getattr(args, flag[2:].replace("-", "_"), None)
        if text is not None and not set(users) & set(strategies):
            raise UsageError(f"{flag}: applies only when --strategies includes "
                             f"{' or '.join(users)}, got --strategies {','.join(strategies)}")
        lists[flag] = None if text is None else parse(text, flag)
    exit_layers, adaptive = lists["--exit-layers"] or (None, False)
    if adaptive and "self_speculative" not in strategies:
        raise UsageError("--exit-layers: auto (the adaptive policy) applies only when "
                         f"--strategies includes self_speculative, got --strategies "
                         f"{','.join(strategies)}")
    speedups = lists["--speedups"] or (list(SPEEDUPS) if "layer_skip" in strategies else [])
    return strategies, exit_layers, lists["--draft-lengths"], speedups, adaptive


def model_grid(model, strategies, exit_layers, draft_lengths):
    """The exit layers and draft lengths `bench` times on this model: as given, else its
    recommended (E, k), else the defaults generate() uses (E = L // 4, k = 4); the exit
    layers are checked against its depth where a chosen strategy uses them."""
    c = model.config
    exit_layers = exit_layers or [c.exit_layer or default_exit_layer(c.n_layers)]
    if {"early_exit", "self_speculative"} & set(strategies):
        check_exit_layers(exit_layers, c.n_layers)
    return exit_layers, draft_lengths or [c.num_speculations or DEFAULT_NUM_SPECULATIONS]


def main_bench(args):
    """`layerskip bench`: arguments and the output path are checked before the model loads;
    the JSON report is rewritten (atomically) after every repetition, so an interrupted run
    keeps the repetitions that finished ("complete": false)."""
    from .sweep import adaptive_row
    output = Path(args.output)
    check_output_file(output, "--output", getattr(args, "overwrite", False))
    strategies, exit_layers, draft_lengths, speedups, adaptive = bench_grid(args)
    if args.prompts:
        require_file(args.prompts, "--prompts")
    if not args.no_transformers and importlib.util.find_spec("transformers") is None:
        raise UsageError("--no-transformers: transformers is not installed; pass "
                         "--no-transformers or pip install transformers")
    model, tokenizer, tokenizer_path = load_tokenizer_and_model(
        args, "--prompts: a prompts file needs --tokenizer" if args.prompts else None)
    prompts, labels = load_prompts(model, args.prompts, tokenizer)
    if not prompts:
        raise UsageError(f"--prompts {args.prompts}: expected at least one non-empty line")
    exit_layers, draft_lengths = model_grid(model, strategies, exit_layers, draft_lengths)
    check_fits(model, tokenizer, tokenizer_path, prompts, labels, args.max_new_tokens,
               reserve=max(*draft_lengths, AUTO_DRAFT_CAP) + 1
               if "self_speculative" in strategies else 0)
    cuda_graphs = False if getattr(args, "no_cuda_graphs", False) else None
    done = []

    def keep(report):
        report["settings"]["model"] = args.model
        write_text(output, json.dumps(report, indent=1) + "\n", "--output")
        done.append(report["settings"]["repeats_done"])

    try:
        with Progress(getattr(args, "quiet", False)) as progress:
            report = run_benchmark(model, prompts, args.max_new_tokens, args.repeats,
                                   args.warmup, with_transformers=not args.no_transformers,
                                   progress=progress, cuda_graphs=cuda_graphs, on_repeat=keep,
                                   batch_size=getattr(args, "batch_size", None),
                                   exit_layers=exit_layers, draft_lengths=draft_lengths,
                                   speedups=speedups, strategies=strategies,
                                   adaptive=adaptive)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_kept(output, done, args.repeats)) from None
    report["settings"]["model"] = args.model
    print(format_table(report))
    auto = adaptive_row(report)
    if auto:
        print(f"adaptive (exit layer auto): rounds per choice (last run): {auto['choices']}")
    print(f"wrote {output}", file=sys.stderr)
    return report


def _kept(output, done, repeats):
    if not done:
        return "interrupted before the first repetition finished: nothing written"
    return (f"interrupted: {output} keeps the {done[-1]} of {repeats} repetitions that "
            "finished (\"complete\": false)")
