"""CPU timing of the fused layer (ops.llama_layer, backend "cpu") against the torch path, on
the embedded default model, in one process.

    python bench/cpu_step.py [--repeats 15] [--context 100] [--output bench/results/cpu_step.json]

Times, in microseconds per call, median (min-max) over interleaved repeats (every configuration
runs once per repeat, so drift in machine speed hits them all alike):
  - one layer over S = 1, 2, 4, 9 new positions (B = 1, `context` cached positions):
      torch    Block.forward with a Decode step on backend "torch" (the reference path, the
               CPU path before the C++ layer)
      cpu      the op's C++ launcher (_launch_cpu: Python checks-free launch + kernel)
      kernel   the bare _cpu.llama_layer call with its integer arguments prepared
  - the greedy head of one row (final norm, lm_head, argmax): ops.draft_head_argmax's
    reference (torch) against the C++ draft head (cpu)
  - one greedy decode step of the whole model (embedding, all layers, head, argmax):
      torch    decoding.autoregressive.decode_step on backend "torch"
      cpu      the same step with every layer through _launch_cpu and the CPU draft head
      stack    the same with all layers in one _launch_cpu_layers call
      fused    the whole step as one C++ call (decoding/cpu.py, what generate() runs on a CPU)
with 1 and 2 threads (torch's for the torch path; the kernel team's, torch on one, for the
others; the torch path is timed in a pass of its own). It also checks that the two step
paths produce the same greedy tokens for `--tokens` steps. Prints a table on stderr and the
JSON (with machine info) on stdout; --output also writes it to a file.
Absolute times on a shared machine are noisy: read the ratios within one run.
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch

import layerskip_kernels as lsk
from layerskip_kernels.benchmark import machine_info
from layerskip_kernels.decoding.autoregressive import decode_step
from layerskip_kernels.decoding.state import DecodeState
from layerskip_kernels.ops import llama_layer as op
from layerskip_kernels.ops.draft_head import draft_head_argmax_reference


def layer_weights(block):
    return (block.input_layernorm.weight, block.self_attn.qkv_proj.weight,
            block.self_attn.o_proj.weight, block.post_attention_layernorm.weight,
            block.mlp.gate_up_proj.weight, block.mlp.down_proj.weight)


def layer_calls(model, reference, S, context):
    """(torch, cpu, kernel) callables running layer 0 over S new positions at `context`."""
    c = model.config
    cache = model.new_cache(1, context + 16)
    seqlens = torch.tensor([context], dtype=torch.int32)
    cos, sin = model.rope(cache.max_seq_len)
    k, v = cache.layer(0, 1)
    x, res = torch.randn(1, S, c.dim), torch.randn(1, S, c.dim)
    block, weights = reference.layers[0], layer_weights(model.layers[0])
    step = reference.step(cache, seqlens, S)
    delta, h = torch.empty_like(x), torch.empty_like(x)
    prepared = (x.data_ptr(), res.data_ptr(), c.dim, c.dim, *(w.data_ptr() for w in weights),
                k.data_ptr(), v.data_ptr(), k.stride()[:3], v.stride()[:3], seqlens.data_ptr(),
                cos.data_ptr(), sin.data_ptr(), cos.stride(0), sin.stride(0), len(cos),
                delta.data_ptr(), h.data_ptr(), 1, S, c.dim, c.n_heads, c.n_kv_heads,
                c.head_dim, c.hidden_dim, cache.max_seq_len, c.norm_eps,
                1.0 / math.sqrt(c.head_dim))
    alive = (cache, seqlens, x, res, delta, h, cos, sin)  # the prepared pointers point into these
    return {"torch": lambda: block(x, res, step, (k, v)),
            "cpu": lambda: op._launch_cpu(x, res, weights, c.norm_eps, k, v, seqlens, cos, sin),
            "kernel": lambda alive=alive: op._cpu.llama_layer(*prepared)}


def head_calls(model):
    """(torch, cpu) callables of the greedy head (final norm, lm_head, argmax) on one row."""
    h = torch.randn(1, model.config.dim)
    args = (h, model.norm.weight, model.config.norm_eps, model.lm_head.weight)
    return {"torch": lambda: draft_head_argmax_reference(*args),
            "cpu": lambda: op.draft_head_argmax_cpu(*args)}


def cpu_decode_step(model, rows, weights, stack=False):
    """decode_step's greedy path with the C++ layer (one call per layer, or one for the stack)
    and the CPU draft head."""
    c = model.config
    cos, sin = model.rope(rows.cache.max_seq_len)
    x, res = model.embed_tokens(rows.tokens[:, None]), None
    kv = [rows.cache.layer(i, rows.n) for i in range(len(weights))]
    if stack:
        x, res = op._launch_cpu_layers(x, res, weights, c.norm_eps, kv, rows.cache_seqlens, cos,
                                       sin)
    for w, (k, v) in zip(weights, kv) if not stack else ():
        x, res = op._launch_cpu(x, res, w, c.norm_eps, k, v, rows.cache_seqlens, cos, sin)
    tokens, _ = op.draft_head_argmax_cpu((x + res)[:, 0], model.norm.weight, c.norm_eps,
                                         model.lm_head.weight)
    rows.tokens.copy_(tokens)
    rows.cache_seqlens.add_(rows.active)


def decode_rows(model, prompt, length):
    """One row's decode state after the prompt's prefill (its first token pending): its rows,
    and its one-call C++ steps (decoding/cpu.py)."""
    state = DecodeState(model, 1, length, 0, graphs=False)
    rows = state.rows(1)
    ids = torch.tensor([prompt])
    rows.tokens.copy_(model.prefill(ids, torch.tensor([len(prompt)], dtype=torch.int32),
                                    rows.cache).argmax(-1))
    rows.cache_seqlens.fill_(len(prompt))
    rows.active.fill_(True)
    return rows, state.cpu_steps


def step_calls(model, reference, context):
    """(torch, cpu) callables of one decode step at a fixed context (the length is reset after
    each step, so every call does the same work)."""
    weights = [layer_weights(b) for b in model.layers]
    prompt = list(range(1, context + 1))
    calls = {}
    for name in PATHS:
        rows, fused = decode_rows(model, prompt, context + 16)

        def run(rows=rows, name=name, fused=fused):
            one_step(model, reference, rows, fused, weights, name)
            rows.cache_seqlens.fill_(context)
        calls[name] = run
    return calls


PATHS = ("torch", "cpu", "stack", "fused")


def one_step(model, reference, rows, fused, weights, path):
    """One greedy step on `path`; reference: the same weights with backend "torch"."""
    if path == "torch":
        decode_step(reference, rows, range(model.config.n_layers))
    elif path == "fused":
        fused.run(("step", rows.n, tuple(range(model.config.n_layers))))
    else:
        cpu_decode_step(model, rows, weights, stack=path == "stack")


def greedy_tokens_match(model, reference, prompt, steps):
    weights = [layer_weights(b) for b in model.layers]
    out = {}
    for name in PATHS:
        (rows, fused), tokens = decode_rows(model, prompt, len(prompt) + steps + 1), []
        for _ in range(steps):
            tokens.append(int(rows.tokens[0]))
            one_step(model, reference, rows, fused, weights, name)
        out[name] = tokens
    return all(tokens == out["torch"] for tokens in out.values()), out


def measure(configs, repeats, seconds=0.01):
    """configs: {key: (threads, fn)}, key[2] the path. Interleaved repeats; each sample times
    enough calls to fill about `seconds`. Returns {key: [(wall µs, this thread's CPU µs) per
    call, ...]}: on a shared machine the CPU time of a 1-thread run leaves out the time it was
    preempted."""
    inner = {}
    for key, (threads, fn) in configs.items():  # warm up and size the inner loops
        set_threads(threads, key[2] == "torch")
        fn()
        t = time.perf_counter()
        fn()
        inner[key] = max(3, int(seconds / max(time.perf_counter() - t, 1e-7)))
    samples = {key: [] for key in configs}
    for _ in range(repeats):
        for key, (threads, fn) in configs.items():
            set_threads(threads, key[2] == "torch")
            fn()
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(inner[key]):
                fn()
            wall, cpu = time.perf_counter() - t, time.thread_time() - c
            samples[key].append((wall / inner[key] * 1e6, cpu / inner[key] * 1e6))
    return samples


def set_threads(n, torch_path):
    """n threads for the path timed: torch's own for the torch path; for the C++ paths the
    kernels' team, with torch on one, as generate() runs them (decoding/cpu.py
    torch_threads_idle): torch's spinning OpenMP threads would take the team's cores."""
    torch.set_num_threads(n if torch_path else 1)
    op._cpu.set_num_threads(n)


def summary(values, prefix=""):
    return {f"{prefix}median_us": round(statistics.median(values), 2),
            f"{prefix}min_us": round(min(values), 2), f"{prefix}max_us": round(max(values), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--context", type=int, default=100, help="cached positions per row")
    parser.add_argument("--tokens", type=int, default=48, help="greedy steps to compare")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--output")
    args = parser.parse_args()
    if op._cpu is None:
        sys.exit(f"the cpu backend cannot run: {op.cpu_unavailable_reason()}")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = lsk.load_model().eval()
    reference = lsk.load_model(backend="torch").eval()
    threads = [int(t) for t in args.threads.split(",")]

    configs = {}
    for n in threads:
        for S in (1, 2, 4, 9):
            for name, fn in layer_calls(model, reference, S, args.context).items():
                configs[("layer", S, name, n)] = (n, fn)
        for name, fn in head_calls(model).items():
            configs[("head", 1, name, n)] = (n, fn)
        for name, fn in step_calls(model, reference, args.context).items():
            configs[("step", 1, name, n)] = (n, fn)
    # Two passes: after a torch op its OpenMP threads spin for milliseconds on the cores the
    # C++ team's helper needs, so the torch path is timed apart.
    torch_path = {key: c for key, c in configs.items() if key[2] == "torch"}
    samples = {**measure(torch_path, args.repeats),
               **measure({k: c for k, c in configs.items() if k not in torch_path}, args.repeats)}
    same, tokens = greedy_tokens_match(model, reference, list(range(1, 9)), args.tokens)

    results = []
    for key in configs:
        what, S, name, n = key
        wall, cpu = [w for w, _ in samples[key]], [c for _, c in samples[key]]
        results.append({"what": what, "S": S, "path": name, "threads": n, "samples": len(wall),
                        **summary(wall), **(summary(cpu, "thread_cpu_") if n == 1 else {})})
    ratios = {}
    for clock, index in (("wall", 0), ("thread_cpu", 1)):
        med = {key: statistics.median(v[index] for v in vs) for key, vs in samples.items()}
        for n in threads if clock == "wall" else [n for n in threads if n == 1]:
            for path in ("torch", "cpu", "kernel"):
                for S in (2, 4, 9):
                    ratios[f"{clock}: layer {path} S={S} / S=1, {n} thread(s)"] = round(
                        med[("layer", S, path, n)] / med[("layer", 1, path, n)], 3)
            for S in (1, 2, 4, 9):
                ratios[f"{clock}: layer cpu / torch S={S}, {n} thread(s)"] = round(
                    med[("layer", S, "cpu", n)] / med[("layer", S, "torch", n)], 3)
            for what, path in (("head", "cpu"), ("step", "cpu"), ("step", "stack"),
                               ("step", "fused")):
                ratios[f"{clock}: {what} {path} / torch, {n} thread(s)"] = round(
                    med[(what, 1, path, n)] / med[(what, 1, "torch", n)], 3)
    report = {"benchmark": "cpu_step", "machine": machine_info(), "isa": op._cpu.isa(),
              "model": "default (lsk.load_model())", "context": args.context,
              "repeats": args.repeats, "greedy_tokens_identical": same,
              "greedy_steps": args.tokens, "results": results, "ratios_of_medians": ratios}

    print(f"{'what':6} {'S':>2} {'path':7} {'thr':>3}  wall: median (min-max) µs   "
          "thread CPU: median (min-max) µs", file=sys.stderr)
    for r in results:
        cpu = (f"{r['thread_cpu_median_us']:9.1f} ({r['thread_cpu_min_us']:.1f}-"
               f"{r['thread_cpu_max_us']:.1f})" if r["threads"] == 1 else "")
        print(f"{r['what']:6} {r['S']:2} {r['path']:7} {r['threads']:3}  {r['median_us']:9.1f} "
              f"({r['min_us']:.1f}-{r['max_us']:.1f})   {cpu}", file=sys.stderr)
    for k, v in ratios.items():
        print(f"{k}: {v}", file=sys.stderr)
    print(f"greedy tokens identical over {args.tokens} steps: {same}", file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
