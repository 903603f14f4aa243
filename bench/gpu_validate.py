"""Helpers of bench/gpu_validate (the bash script is the entry point):

    python bench/gpu_validate.py sanitize           small grid of the attention and KV-append
                                                    ops on every GPU backend (run plain, then
                                                    under compute-sanitizer memcheck/racecheck)
    python bench/gpu_validate.py e2e OUT.json       generate() on the default model and a
                                                    Llama-3.2-1B shape: replay == eager, timed
    python bench/gpu_validate.py merge WORK OUT.json [--copy-to DIR]
                                                    merge the parts' outputs, print the summary
"""
import argparse
import json
import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

# (B, Sq, Hq, Hkv, D, row lengths before the call, Smax, dtype): odd sizes, ragged rows,
# an empty row, a row that ends exactly at Smax, MHA and GQA.
SANITIZE_GRID = [
    (1, 1, 8, 2, 64, [17], 64, torch.bfloat16),
    (3, 5, 8, 8, 128, [0, 37, 123], 128, torch.float16),
    (2, 16, 4, 1, 64, [5, 24], 40, torch.float32),
    (4, 3, 32, 8, 128, [1000, 1, 513, 2045], 2048, torch.bfloat16),
    # Triton: one long sequence (64 splits), head dims 32 and 256 (2 row tiles: 56 rows in bf16,
    # 20 in fp32), 256 rows of group 16 x Sq 16 (2 row tiles, 2 splits), and D 96 (attention
    # falls to torch; kv_cache_append's Triton kernel takes any row). A row ends at Smax.
    (1, 1, 32, 8, 128, [8190], 8192, torch.bfloat16),
    (2, 4, 16, 4, 32, [0, 300], 304, torch.float16),
    (2, 7, 16, 2, 256, [100, 57], 107, torch.bfloat16),
    (2, 5, 8, 2, 256, [9, 40], 45, torch.float32),
    (1, 16, 32, 2, 64, [2000], 4096, torch.bfloat16),
    (3, 2, 6, 3, 96, [5, 0, 62], 64, torch.float16),
    # CUDA: a verify of 20 rows (two 16-row tiles in one block) over a long cache (many splits).
    (1, 5, 32, 8, 128, [20000], 20480, torch.bfloat16),
]


def sanitize():
    """Every GPU backend of each op on SANITIZE_GRID, checked against the torch reference."""
    from layerskip_kernels.ops import attention_with_kvcache
    gen = torch.Generator("cuda").manual_seed(0)
    calls, failures = 0, []
    for B, Sq, Hq, Hkv, D, lengths, Smax, dtype in SANITIZE_GRID:
        randn = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=gen)  # noqa
        q, k_new, v_new = randn(B, Sq, Hq, D), randn(B, Sq, Hkv, D), randn(B, Sq, Hkv, D)
        k_cache, v_cache = randn(B, Smax, Hkv, D), randn(B, Smax, Hkv, D)
        seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        angles = torch.arange(Smax, device="cuda")[:, None] * 10000.0 ** (
            -torch.arange(D // 2, device="cuda") / (D // 2))
        cos, sin = angles.cos(), angles.sin()
        ref = attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k_new, v_new, seqlens,
                                     cos, sin, backend="torch").float()
        ref_caches = _appended(k_cache, v_cache, k_new, v_new, seqlens, "torch")
        for backend in ("triton", "cuda"):
            for op, run in (
                    ("attention_with_kvcache", lambda b: attention_with_kvcache(
                        q, k_cache.clone(), v_cache.clone(), k_new, v_new, seqlens, cos, sin,
                        backend=b)),
                    ("kv_cache_append", lambda b: _appended(
                        k_cache, v_cache, k_new, v_new, seqlens, b))):
                try:
                    out = run(backend)
                    torch.cuda.synchronize()
                except (ValueError, RuntimeError) as error:
                    # An op without this backend, or a shape it does not take, is skipped;
                    # anything else (a kernel fault) is a failure.
                    absent = isinstance(error, ValueError) or "cannot run on" in str(error)
                    line = f"{op} {backend} {(B, Sq, Hq, Hkv, D, Smax)}: {error}"[:200]
                    print(("skip " if absent else "FAIL ") + line)
                    if not absent:
                        failures.append(line)
                    continue
                calls += 1
                if op == "attention_with_kvcache":
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    if not err < 2e-2:
                        failures.append(f"{op} {backend} {(B, Sq, Hq, Hkv, D, Smax, dtype)}: "
                                        f"relative error {err:.2e}")
                elif not torch.equal(out, ref_caches):  # a copy: bit for bit
                    failures.append(f"{op} {backend} {(B, Sq, Hq, Hkv, D, Smax, dtype)}: "
                                    "caches differ from the torch reference")
    print(f"sanitize grid: {calls} calls, {len(failures)} failures")
    for line in failures:
        print("FAIL", line)
    return 1 if failures or calls == 0 else 0


def _appended(k_cache, v_cache, k_new, v_new, seqlens, backend):
    """kv_cache_append on copies of the caches: both caches, stacked."""
    from layerskip_kernels.ops import kv_cache_append
    k, v = k_cache.clone(), v_cache.clone()
    kv_cache_append(k, v, k_new, v_new, seqlens, backend=backend)
    return torch.stack((k, v))


E2E_SHAPES = {  # what `e2e` runs: the embedded default model and a random Llama-3.2-1B shape
    "default": None,
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                         hidden_dim=8192, rope_theta=500000.0, tie_embeddings=True),
}


def e2e(output):
    """generate() as a user runs it on the GPU, bf16: the embedded default model and a random
    Llama-3.2-1B-shaped model (layers >= L/4 damped, so drafts are accepted), each with a
    ragged batch of 100+ token prompts. Every strategy's greedy tokens must equal eager
    (cuda_graphs=False) decoding's (the same kernels, replayed); self-speculative against
    autoregressive is reported, not required (in bf16 a batched verify may flip a near-tie).
    Timed with benchmark.run_benchmark, against transformers on the default model."""
    sys.path.insert(0, str(Path(__file__).parent))
    import layerskip_kernels as lsk
    from layerskip_kernels.benchmark import run_benchmark
    from roofline import damp_upper_layers, random_model
    report, failures = {}, []
    for name, shape in E2E_SHAPES.items():
        if shape is None:
            model = lsk.load_model(dtype=torch.bfloat16, device="cuda")
        else:
            model = random_model(shape, "cuda", max_seq_len=1024)
            damp_upper_layers(model, model.config.n_layers // 4, 0.01)
        E = model.config.exit_layer or max(1, model.config.n_layers // 4)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
                   for n in (100, 173, 128, 311)]
        runs = {"autoregressive": {}, "self_speculative": dict(exit_layer=E, num_speculations=3),
                "early_exit": dict(exit_layer=E),
                "layer_skip": dict(speedup=1.5)}
        rows = {}
        for strategy, extra in runs.items():
            kw = dict(max_new_tokens=48, strategy=strategy, eos_token_id=[], **extra)
            eager = lsk.generate(model, prompts, cuda_graphs=False, **kw)
            replayed = lsk.generate(model, prompts, **kw)
            rows[strategy] = {"same_as_eager": replayed.tokens == eager.tokens,
                              "path": replayed.stats["path"],
                              "capture_s": replayed.stats["capture_s"]}
            if not rows[strategy]["same_as_eager"]:
                failures.append(f"{name} {strategy}: replayed tokens differ from eager")
            rows[strategy]["tokens"] = replayed.tokens
        rows["self_speculative"]["same_as_autoregressive"] = (
            rows["self_speculative"]["tokens"] == rows["autoregressive"]["tokens"])
        bench = run_benchmark(model, prompts, 48, repeats=3, warmup=1, exit_layers=[E],
                              draft_lengths=(2, 4), speedups=(1.5,),
                              with_transformers=shape is None)
        for r in rows.values():
            r.pop("tokens")
        report[name] = {"exit_layer": E, "prompt_lengths": [len(p) for p in prompts],
                        "strategies": rows, "results": bench["results"]}
        print(f"{name}: " + ", ".join(f"{k} {'ok' if v['same_as_eager'] else 'DIFFERS'} "
                                      f"({v['path']})" for k, v in rows.items()))
        del model
        torch.cuda.empty_cache()
    report["failures"] = failures
    Path(output).write_text(json.dumps(report, indent=1) + "\n")
    for line in failures:
        print("FAIL", line)
    return 1 if failures else 0


# ---- merge -----------------------------------------------------------------------------

def _junit(path):
    if not path.exists():
        return None
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    count = lambda key: sum(int(s.get(key, 0)) for s in suites)  # noqa: E731
    tests, failed, errors, skipped = (count(k) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": tests - failed - errors - skipped, "failed": failed, "errors": errors,
            "skipped": skipped}


def _json(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _grep(path, pattern):
    text = path.read_text(errors="replace") if path.exists() else ""
    found = re.findall(pattern, text)
    return found[-1] if found else None


def _bench_summary(data):
    """Per provider: cases, best GB/s and % of HBM over the grid."""
    if not data:
        return None, None
    by = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        key = f"{b['name'].split('[')[0]}:{info.get('provider', '?')}"
        row = by.setdefault(key, {"cases": 0, "best_gb_per_s": 0.0, "best_pct_of_hbm": 0.0})
        row["cases"] += 1
        row["best_gb_per_s"] = max(row["best_gb_per_s"], info.get("gb_per_s") or 0.0)
        row["best_pct_of_hbm"] = max(row["best_pct_of_hbm"], info.get("pct_of_hbm") or 0.0)
    text = ", ".join(f"{k} {v['best_pct_of_hbm']:.0f}%" for k, v in sorted(by.items()))
    return by, f"{len(data.get('benchmarks', []))} cases; best % of HBM: {text}"


def _roofline_summary(data):
    if not data:
        return None
    parts = [f"HBM {data['hbm_gb_per_s']:.0f} GB/s"]
    for name, model in data["models"].items():
        r = model["rows"][0]
        parts.append(f"{name} B={r['batch']} AR {r['ar_ms']:.2f} ms (floor {r['ar_floor_ms']:.2f}),"
                     f" draft c={r['c']:.2f}")
    measured = data.get("measured")
    if measured:
        spec = [r for r in measured["results"] if r.get("strategy") == "self_speculative"]
        best = max(spec, key=lambda r: r["speedup_vs_ours_autoregressive"], default=None)
        if best:
            parts.append(f"damped {measured['model']}: x{best['speedup_vs_ours_autoregressive']:.2f}"
                         f" ({best['name'].removeprefix('ours ')}, accept "
                         f"{best['acceptance_rate']:.2f})")
    return "; ".join(parts)


def _e2e_summary(data):
    if not data:
        return None
    parts = []
    for name, model in data.items():
        if name == "failures":
            continue
        rows = {r["name"]: r for r in model["results"]}
        ar = rows["ours autoregressive"]
        spec = max((r for r in model["results"] if r.get("strategy") == "self_speculative"),
                   key=lambda r: r["tokens_per_s"], default=None)
        text = f"{name}: AR {ar['tokens_per_s']:.0f} tok/s"
        hf = ar.get("speedup_vs_transformers_generate")
        text += f" (x{hf:.2f} vs HF)" if hf else ""
        if spec:
            text += (f", {spec['name'].removeprefix('ours ')} x"
                     f"{spec['speedup_vs_ours_autoregressive']:.2f}")
        parts.append(text)
    failures = data.get("failures") or []
    return "; ".join(parts) + (f"; {len(failures)} FAILURES" if failures else "")


def merge(work, output, copy_to=None):
    work = Path(work)
    parts = []
    for line in (work / "parts.tsv").read_text().splitlines() if (work / "parts.tsv").exists() else []:
        name, rc, seconds, limit = line.split("\t")
        rc = int(rc)
        status = {0: "ok", 124: "TIMEOUT", 130: "TIMEOUT", 137: "TIMEOUT", 77: "skipped"}.get(rc, "FAIL")
        parts.append({"part": name, "rc": rc, "status": status, "seconds": int(seconds),
                      "limit_s": int(limit)})
    bench, bench_text = _bench_summary(_json(work / "microbench.json"))
    results = {
        "build": _grep(work / "build.log", r"built _C for .*"),
        "gpu_tests": _junit(work / "gpu_tests.xml"),
        "suite": _junit(work / "suite.xml"),
        "sanity": _grep(work / "sanity.log", r"sanitize grid: .*"),
        "memcheck": _grep(work / "memcheck.log", r"ERROR SUMMARY: .*|compute-sanitizer not found.*"),
        "racecheck": _grep(work / "racecheck.log",
                           r"RACECHECK SUMMARY: .*|ERROR SUMMARY: .*|compute-sanitizer not found.*"),
        "microbench": bench,
        "roofline": _json(work / "roofline.json"),
        "e2e": _json(work / "e2e.json"),
    }
    text = {"build": results["build"], "sanity": results["sanity"],
            "memcheck": results["memcheck"], "racecheck": results["racecheck"],
            "microbench": bench_text, "roofline": _roofline_summary(results["roofline"]),
            "e2e": _e2e_summary(results["e2e"])}
    for key in ("gpu_tests", "suite"):
        if results[key]:
            text[key] = ", ".join(f"{v} {k}" for k, v in results[key].items() if v)
    from layerskip_kernels.benchmark import machine_info
    machine = machine_info()
    machine["commit"] = machine["commit"] or os.environ.get("COMMIT")  # no .git on the device
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    report = {"machine": machine, "device": device,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": parts, "results": results,
              "summary": text}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(report, indent=1) + "\n")
    if copy_to:
        shutil.copy(output, copy_to)
    print(f"\nwrote {output}")
    print(f"{'part':<11} {'status':<8} {'s':>4}  result")
    for p in parts:
        print(f"{p['part']:<11} {p['status']:<8} {p['seconds']:>4}  {(text.get(p['part']) or '')[:200]}")
    return 0 if all(p["status"] in ("ok", "skipped") for p in parts) else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("sanitize")
    sub.add_parser("e2e").add_argument("output")
    m = sub.add_parser("merge")
    m.add_argument("work")
    m.add_argument("output")
    m.add_argument("--copy-to")
    args = p.parse_args(argv)
    if args.command != "merge" and not torch.cuda.is_available():
        print("gpu_validate.py: needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 77
    with torch.inference_mode():
        if args.command == "sanitize":
            return sanitize()
        if args.command == "e2e":
            return e2e(args.output)
    return merge(args.work, args.output, args.copy_to)


if __name__ == "__main__":
    sys.exit(main())
