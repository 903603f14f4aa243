"""exit_layer="auto" (the adaptive policy) against fixed (E, k) and autoregressive decoding,
in one process, each prompt alone, its configurations back to back in every repeat (the
machine's speed drifts: on a shared 2-core machine by several times within a minute).

    python bench/bench_policy.py --model ../shared/data/stories260K.bin --fixed 1:4,4:1
    python bench/bench_policy.py --prompts bench/results/default_model/heldout_prompts.json \
        --fixed 3:3,3:2,4:1
    python bench/bench_policy.py --text ../shared/data/tinystories_val.txt --fixed 3:3

--prompts: a JSON list of token-id lists, or --text FILE: its first --count non-empty lines
(200 characters each) through --tokenizer (default: the default model's); else BOS alone.
--fixed E:K,...: the fixed
self-speculative pairs beside autoregressive and auto. Prints one line per configuration:
median tokens/s, the ratio to autoregressive (median of the repeats' ratios, and min-max),
exactness, acceptance and, for auto, its rounds per choice (last repeat).
"""
import argparse
import json
import os
import statistics
import time
from collections import Counter

import layerskip_kernels as lsk


def main():
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
    args = p.parse_args()
    lsk.set_num_threads(args.threads)
    model = lsk.load_model(args.model)
    bos = model.config.bos_token_id
    if args.text:
        tok = lsk.load_tokenizer(args.tokenizer)
        lines = [line for line in open(args.text).read().splitlines() if line.strip()]
        prompts = [tok.encode(line[:200]) for line in lines[:args.count]]
    else:
        prompts = json.load(open(args.prompts)) if args.prompts else [[bos or 0]]
    pairs = [tuple(map(int, pair.split(":"))) for pair in args.fixed.split(",") if pair]
    configs = [("autoregressive", {})] + [
        (f"E{e} k{k}", {"strategy": "self_speculative", "exit_layer": e, "num_speculations": k})
        for e, k in pairs] + [("auto", {"strategy": "self_speculative", "exit_layer": "auto"})]
    load = os.getloadavg()
    ratios = {name: [] for name, _ in configs}
    rates = {name: [] for name, _ in configs}
    for rep in range(args.warmup + args.repeats):
        seconds = dict.fromkeys(ratios, 0.0)
        tokens = {name: [] for name in ratios}
        choices, accepted, drafted = Counter(), Counter(), Counter()
        groups = [prompts] if args.batch else [[p] for p in prompts]
        for group in groups:  # each group's configurations back to back: drift cancels
            for name, kw in configs:
                start = time.perf_counter()
                res = lsk.generate(model, group, args.max_new_tokens, eos_token_id=[], **kw)
                seconds[name] += time.perf_counter() - start
                tokens[name] += res.tokens
                accepted[name] += res.stats.get("accepted", 0)
                drafted[name] += res.stats.get("drafted", 0)
                if name == "auto":
                    choices.update(res.stats["choices"])
                    stints = res.stats["stints"]
        if rep < args.warmup:
            continue
        for name in ratios:
            ratios[name].append(seconds["autoregressive"] / seconds[name])
            rates[name].append(sum(map(len, tokens[name])) / seconds[name])
    print(f"load average before: {load}, after: {os.getloadavg()}; {len(prompts)} prompts, "
          f"{'one batch' if args.batch else 'each alone'}, {args.max_new_tokens} new tokens, "
          f"{args.warmup} warm-up + {args.repeats} repeats; ratio to autoregressive: median "
          "of the repeats' ratios (min-max)")
    for name, _ in configs:
        r = sorted(ratios[name])
        print(f"{name:<16} {statistics.median(rates[name]):9.1f} tok/s  "
              f"{statistics.median(r):.2f}x AR ({r[0]:.2f}-{r[-1]:.2f})  exact "
              f"{'yes' if tokens[name] == tokens['autoregressive'] else 'NO'}"
              + (f"  acceptance {accepted[name] / drafted[name]:.2f}" if drafted[name] else "")
              + (f"  {dict(choices.most_common())}" if name == "auto" else ""))
    print("auto, the last prompt's choices over time (choice, rounds): "
          + ", ".join(f"{name} x{n}" for name, n in stints))


if __name__ == "__main__":
    main()
