"""End-to-end benchmark: every decoding strategy, ours and transformers', on the same weights,
prompts and settings, in one process. Configurations are interleaved across repeats so that
drift in machine speed hits them all alike; we report median and spread of tokens/s."""
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .decoding import generate
from .model import load_model, save_hf_directory


def machine_info():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "commit": commit or None, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _ours(model, prompts, max_new_tokens, **kwargs):
    def run():
        result = generate(model, prompts, max_new_tokens=max_new_tokens, **kwargs)
        return result.tokens, result.stats
    return run


def best_of_runs(model, prompts, max_new_tokens, repeats=3, **settings):
    """Greedy decoding of each prompt alone, keeping the fastest of `repeats` runs (for a
    shared CPU); total tokens/s and acceptance over all prompts, and the tokens."""
    tokens, new, elapsed, accepted, drafted = [], 0, 0.0, 0, 0
    for prompt in prompts:
        runs = [generate(model, [prompt], max_new_tokens=max_new_tokens, **settings)
                for _ in range(repeats)]
        res = min(runs, key=lambda r: r.stats["time_s"])
        tokens.append(res.tokens[0])
        new, elapsed = new + res.stats["new_tokens"], elapsed + res.stats["time_s"]
        accepted += res.stats.get("accepted", 0)
        drafted += res.stats.get("drafted", 0)
    return {"tokens_per_s": new / elapsed, "acceptance": accepted / max(drafted, 1),
            "tokens": tokens}


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
                   with_transformers):
    """(name, settings, callable) for every strategy to time."""
    L = model.config.n_layers
    exit_layers = exit_layers or range(1, L)
    configs = [("ours autoregressive", {"strategy": "autoregressive"})]
    configs += [(f"ours early_exit E={e}", {"strategy": "early_exit", "exit_layer": e})
                for e in exit_layers]
    configs += [(f"ours self_speculative E={e} k={k}",
                 {"strategy": "self_speculative", "exit_layer": e, "num_speculations": k})
                for e in exit_layers for k in draft_lengths]
    configs += [(f"ours self_speculative E={e} k=auto",
                 {"strategy": "self_speculative", "exit_layer": e, "num_speculations": "auto"})
                for e in exit_layers]
    configs += [(f"ours layer_skip speedup={s}", {"strategy": "layer_skip", "speedup": s})
                for s in speedups]
    configs += [(f"ours self_speculative draft=layer_skip speedup={s} k={k}",
                 {"strategy": "self_speculative", "draft": "layer_skip", "speedup": s,
                  "num_speculations": k}) for s in speedups for k in draft_lengths]
    timed = [(name, settings, _ours(model, prompts, max_new_tokens, **settings))
             for name, settings in configs]
    if with_transformers:
        hf = _load_transformers(model, model.embed_tokens.weight.dtype)
        timed.append(("transformers generate", {"strategy": "autoregressive"},
                      _transformers(hf, prompts, max_new_tokens)))
        timed += [(f"transformers assistant_early_exit E={e}",
                   {"strategy": "assistant_early_exit", "exit_layer": e},
                   _transformers(hf, prompts, max_new_tokens, assistant_early_exit=e))
                  for e in exit_layers]
    return timed


def time_interleaved(timed, repeats, warmup, progress=None):
    """Run every (name, settings, callable) warmup + repeats times, round-robin; return the
    result rows (median / min / max tokens/s, exactness against the first entry) and the
    last run's outputs per name."""
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
    base_name = timed[0][0]
    results = []
    for name, settings, _ in timed:
        n_tokens = sum(len(t) for t in outputs[name])
        rates = sorted(n_tokens / t for t in times[name])
        row = {"name": name, **settings, "tokens_per_s": statistics.median(rates),
               "tokens_per_s_min": rates[0], "tokens_per_s_max": rates[-1],
               "same_tokens_as_autoregressive": outputs[name] == outputs[base_name]}
        row.update({key: stats[name][key] for key in ("acceptance_rate", "tokens_per_round",
                                                      "rounds") if key in stats[name]})
        results.append(row)
    for row in results:
        row["speedup_vs_ours_autoregressive"] = row["tokens_per_s"] / results[0]["tokens_per_s"]
        k = row.get("num_speculations")
        if isinstance(k, int) and row.get("tokens_per_round"):
            row["speedup_if_all_accepted"] = speedup_if_all_accepted(
                row["speedup_vs_ours_autoregressive"], k, row["tokens_per_round"])
    return results, outputs


def speedup_if_all_accepted(speedup, num_speculations, tokens_per_round):
    """A measured self-speculative speedup scaled to rounds that accept every draft (k + 1
    tokens each): the most a better-trained exit could give at this (E, k), as a round's
    cost barely depends on how many drafts it accepts."""
    return speedup * (num_speculations + 1) / tokens_per_round


def run_benchmark(model, prompts, max_new_tokens=200, repeats=5, warmup=1, exit_layers=None,
                  draft_lengths=(1, 2, 4, 8), speedups=(1.25, 1.5), with_transformers=True,
                  progress=None):
    timed = configurations(model, prompts, max_new_tokens, exit_layers, draft_lengths,
                           speedups, with_transformers)
    results, _ = time_interleaved(timed, repeats, warmup, progress)
    hf_base = next((r["tokens_per_s"] for r in results if r["name"] == "transformers generate"),
                   None)
    for row in results:
        row["speedup_vs_transformers_generate"] = row["tokens_per_s"] / hf_base if hf_base else None
    return {"machine": machine_info(), "threads": torch.get_num_threads(),
            "settings": {"prompts": len(prompts), "max_new_tokens": max_new_tokens,
                         "repeats": repeats, "warmup": warmup, "greedy": True,
                         "dtype": str(next(iter(model.parameters())).dtype)},
            "results": results}


def compare(model, prompts, max_new_tokens, repeats=3, warmup=1, **speculative):
    """Greedy autoregressive against self-speculative decoding, interleaved: result rows
    and the outputs of each."""
    timed = [("autoregressive", {}, _ours(model, prompts, max_new_tokens)),
             ("self_speculative", speculative,
              _ours(model, prompts, max_new_tokens, strategy="self_speculative", **speculative))]
    return time_interleaved(timed, repeats, warmup)


def format_table(report):
    lines = [f"{'configuration':<55} {'tok/s':>8} {'(min-max)':>15} {'vs AR':>6} "
             f"{'vs HF':>6} {'accept':>6} {'exact':>5}"]
    for r in report["results"]:
        hf = r["speedup_vs_transformers_generate"]
        accept = r.get("acceptance_rate")
        lines.append(
            f"{r['name']:<55} {r['tokens_per_s']:8.1f} "
            f"{'(%.0f-%.0f)' % (r['tokens_per_s_min'], r['tokens_per_s_max']):>15} "
            f"{r['speedup_vs_ours_autoregressive']:6.2f} {hf if hf is None else round(hf, 2):>6} "
            f"{'' if accept is None else round(accept, 3):>6} "
            f"{'yes' if r['same_tokens_as_autoregressive'] else 'no':>5}")
    return "\n".join(lines)


def load_prompts(model, prompts_path, tokenizer_path):
    """One prompt per non-empty line of prompts_path (needs a tokenizer), else BOS alone."""
    if not prompts_path:
        bos = model.config.bos_token_id
        return [[bos if bos is not None else 0]]
    if not tokenizer_path:
        raise ValueError("--prompts: a prompts file needs --tokenizer")
    from .model import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_path)
    lines = Path(prompts_path).read_text().splitlines()
    return [tokenizer.encode(line) for line in lines if line.strip()]


class ProgressBar:
    """One line on stderr: bar, count, elapsed / estimated total, current configuration."""

    def __init__(self, width=30, stream=sys.stderr):
        self.width, self.stream, self.start = width, stream, time.perf_counter()

    def __call__(self, done, total, name):
        elapsed = time.perf_counter() - self.start
        filled = self.width * done // total
        eta = elapsed / done * (total - done)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                          f"{elapsed:4.0f}s +{eta:.0f}s {name[:50]:<50}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def main_bench(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    prompts = load_prompts(model, args.prompts, args.tokenizer)
    report = run_benchmark(model, prompts, args.max_new_tokens, args.repeats, args.warmup,
                           with_transformers=not args.no_transformers, progress=ProgressBar())
    report["settings"]["model"] = str(args.model)
    print(format_table(report))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")
