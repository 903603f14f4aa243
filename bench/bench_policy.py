"""exit_layer="auto" (the adaptive policy) against fixed (E, k) and autoregressive decoding,
in one process, interleaved over repeats (benchmark.time_interleaved), each prompt alone.

    python bench/bench_policy.py --model ../shared/data/stories260K.bin --fixed 1:4,4:1
    python bench/bench_policy.py --prompts bench/results/default_model/heldout_prompts.json \
        --fixed 3:3,3:2,4:1
    python bench/bench_policy.py --text ../shared/data/tinystories_val.txt --fixed 3:3

--prompts: a JSON list of token-id lists, or --text FILE: its first --count non-empty lines
(200 characters each) through --tokenizer (default: the default model's); else BOS alone.
--fixed E:K,...: the fixed
self-speculative pairs beside autoregressive and auto. Prints one line per configuration:
median tokens/s, the ratio to autoregressive (median, and min-max over repeats), exactness,
acceptance and, for auto, its rounds per choice (last repeat).
"""
import argparse
import json
import os

import layerskip_kernels as lsk
from layerskip_kernels.benchmark import _ours, time_interleaved


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="default: the embedded default model")
    p.add_argument("--prompts", help="JSON list of token-id lists (default: BOS alone)")
    p.add_argument("--text", help="a text file: its first --count lines are the prompts")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--tokenizer", help="for --text (default: the default model's)")
    p.add_argument("--fixed", default="", help="E:K,... fixed self-speculative pairs")
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
    timed = [(name, kw, _ours(model, prompts, args.max_new_tokens, batch_size=1,
                              eos_token_id=[], **kw)) for name, kw in configs]
    load = os.getloadavg()
    last_stints = {}

    def keep_stints(run):  # the policy's choices over time, of the last prompt's last run
        def wrapped():
            tokens, stats = run()
            last_stints["auto"] = stats.get("stints")
            return tokens, stats
        return wrapped
    timed[-1] = (*timed[-1][:2], keep_stints(timed[-1][2]))
    rows, _ = time_interleaved(timed, args.repeats, args.warmup)
    print(f"load average before: {load}, after: {os.getloadavg()}; {len(prompts)} prompts, each alone, "
          f"{args.max_new_tokens} new tokens, {args.warmup} warm-up + {args.repeats} repeats")
    for r in rows:
        print(f"{r['name']:<16} {r['tokens_per_s']:9.1f} tok/s  "
              f"{r['speedup_vs_ours_autoregressive']:.2f}x AR "
              f"({r['speedup_vs_ours_autoregressive_min']:.2f}-"
              f"{r['speedup_vs_ours_autoregressive_max']:.2f})  exact "
              f"{'yes' if r['same_tokens_as_autoregressive'] else 'NO'}"
              + (f"  acceptance {r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "")
              + (f"  {r['choices']}" if "choices" in r else ""))
    print("auto, the last prompt's choices over time (choice, rounds): "
          + ", ".join(f"{name} x{n}" for name, n in last_stints["auto"]))


if __name__ == "__main__":
    main()
