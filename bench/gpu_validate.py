"""Helpers of bench/gpu_validate (the bash script is the entry point):

    python bench/gpu_validate.py sanitize           small grid of the attention op (with its
                                                    fused cache write) on every GPU backend (run
                                                    plain, then under compute-sanitizer
                                                    memcheck/racecheck)
    python bench/gpu_validate.py e2e OUT.json       generate() on the default model and a
                                                    Llama-3.2-1B shape, B = 1 and ragged B = 4,
                                                    AR, fixed (E, k) and exit_layer auto:
                                                    replay == eager, ms per token vs the floor
    python bench/gpu_validate.py merge WORK OUT.json [--copy-to FILE]
                                                    merge the parts' outputs (WORK/parts.tsv,
                                                    WORK/gpu_validate.log's sections, the XML
                                                    and JSON files), print the summary
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
    # falls to torch). A row ends at Smax.
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
    """Every GPU backend of attention_with_kvcache on SANITIZE_GRID, checked against the torch
    reference."""
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
        op = "attention_with_kvcache"
        for backend in ("triton", "cuda"):
            try:
                out = attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k_new, v_new,
                                             seqlens, cos, sin, backend=backend)
                torch.cuda.synchronize()
            except (ValueError, RuntimeError) as error:
                # A backend that cannot run here or take this shape (a ValueError naming the
                # argument) is skipped; anything else (a kernel fault) is a failure.
                absent = isinstance(error, ValueError)
                line = f"{op} {backend} {(B, Sq, Hq, Hkv, D, Smax)}: {error}"[:200]
                print(("skip " if absent else "FAIL ") + line)
                if not absent:
                    failures.append(line)
                continue
            calls += 1
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                failures.append(f"{op} {backend} {(B, Sq, Hq, Hkv, D, Smax, dtype)}: "
                                f"relative error {err:.2e}")
    print(f"sanitize grid: {calls} calls, {len(failures)} failures")
    for line in failures:
        print("FAIL", line)
    return 1 if failures or calls == 0 else 0


E2E_SHAPES = {  # what `e2e` runs: the embedded default model and a random Llama-3.2-1B shape
    "default": None,
    "llama-3.2-1b": "llama-3.2-1b",
}
E2E_BATCHES = {"B=1": [128], "B=4 ragged": [100, 173, 128, 311]}  # prompt lengths
E2E_NEW_TOKENS = 64


def e2e(output, device="cuda", shapes=E2E_SHAPES, new_tokens=E2E_NEW_TOKENS, bandwidth=None):
    """generate() as a user runs it on the GPU, bf16, on the embedded default model and a random
    Llama-3.2-1B-shaped model (layers >= L/4 damped, so drafts are accepted), at B = 1 and a
    ragged B = 4; autoregressive, self-speculative (E = the model's exit layer or L/4, k = 3)
    and self-speculative with exit_layer="auto" (the adaptive policy: its choices per round
    are recorded). Each case: an eager call (cuda_graphs=False), a first replayed call (captures),
    a second (timed): replayed tokens must equal eager ones (the same state, geometry and
    kernels); self-speculative against autoregressive is reported, not required (in bf16 a
    batched verify may flip a near-tie). Decode ms per token (each row's tokens after the
    first, which the prefill gives) beside the weight-bytes floor (every weight read once per
    token over the copy bandwidth measured here). Written after every case. (The CPU tests
    run it on a small shape, with a given bandwidth.)"""
    sys.path.insert(0, str(Path(__file__).parent))
    import layerskip_kernels as lsk
    from roofline import byte_counts, damp_upper_layers, measure_hbm_bandwidth, random_model
    bandwidth = bandwidth or measure_hbm_bandwidth()
    report = {"hbm_gb_per_s": bandwidth, "new_tokens": new_tokens, "models": {},
              "failures": []}
    for name, shape in shapes.items():
        if shape is None:
            model = lsk.load_model(dtype=torch.bfloat16, device=device)
        else:
            model = random_model(shape, device, max_seq_len=1024)
            damp_upper_layers(model, model.config.n_layers // 4, 0.01)
        c = model.config
        E = c.exit_layer or max(1, c.n_layers // 4)
        layer_b, head_b, _ = byte_counts(model, 1, 0)
        floor_ms = (c.n_layers * layer_b + head_b) / bandwidth / 1e6
        cases = report["models"][name] = {"exit_layer": E, "weight_bytes": c.n_layers * layer_b
                                          + head_b, "floor_ms_per_token": floor_ms, "cases": []}
        g = torch.Generator().manual_seed(0)
        for batch, lengths in E2E_BATCHES.items():
            prompts = [torch.randint(0, c.vocab_size, (n,), generator=g).tolist() for n in lengths]
            tokens = {}
            for label, extra in (("autoregressive", {}),
                                 ("self_speculative", dict(exit_layer=E, num_speculations=3)),
                                 ("self_speculative auto", dict(exit_layer="auto"))):
                strategy = label.split()[0]
                kw = dict(max_new_tokens=new_tokens, strategy=strategy, eos_token_id=[], **extra)
                eager = lsk.generate(model, prompts, cuda_graphs=False, **kw)
                first = lsk.generate(model, prompts, **kw)
                timed = lsk.generate(model, prompts, **kw)
                tokens[label] = timed.tokens
                steps = new_tokens - 1
                ms = (timed.stats["time_s"] - timed.stats["prefill_s"]) * 1e3 / steps
                case = {"batch": batch, "prompt_lengths": lengths, "strategy": label,
                        "same_as_eager": first.tokens == eager.tokens == timed.tokens,
                        "path": timed.stats["path"], "cuda_graphs": timed.stats["cuda_graphs"],
                        "capture_s": first.stats["capture_s"],
                        "capture_s_second_call": timed.stats["capture_s"],
                        "ms_per_token": ms, "eager_ms_per_token": (
                            eager.stats["time_s"] - eager.stats["prefill_s"]) * 1e3 / steps,
                        "prefill_ms": timed.stats["prefill_s"] * 1e3,
                        "pct_of_floor": 100 * floor_ms / ms,
                        "acceptance_rate": timed.stats.get("acceptance_rate"),
                        "choices": timed.stats.get("choices")}
                if strategy == "self_speculative":
                    case["same_as_autoregressive"] = timed.tokens == tokens["autoregressive"]
                cases["cases"].append(case)
                if not case["same_as_eager"]:
                    report["failures"].append(f"{name} {batch} {label}: replayed tokens "
                                              "differ from eager")
                print(f"{name} {batch} {label}: {'ok' if case['same_as_eager'] else 'DIFFERS'}"
                      f" {ms:.2f} ms/token (floor {floor_ms:.3f}), capture "
                      f"{case['capture_s']:.2f} s, {case['path']}", flush=True)
                Path(output).write_text(json.dumps(report, indent=1) + "\n")
        del model
        torch.cuda.empty_cache() if device == "cuda" else None
    for line in report["failures"]:
        print("FAIL", line)
    return 1 if report["failures"] else 0


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


def _log_section(work, part):
    """Part's output in gpu_validate.log, between its '===== part NAME' line and the next."""
    path = work / "gpu_validate.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    found = re.findall(rf"^===== part {re.escape(part)}\b.*?\n(.*?)(?=^===== part |\Z)", text,
                       re.S | re.M)
    return found[-1] if found else ""


def _grep(text, pattern):
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
    """Per model and batch: ms per token of AR, self-speculative and the adaptive policy
    against the floor."""
    if not data:
        return None
    parts = []
    for name, model in data.get("models", {}).items():
        for batch in dict.fromkeys(c["batch"] for c in model["cases"]):
            ms = {c["strategy"]: c["ms_per_token"] for c in model["cases"] if c["batch"] == batch}
            parts.append(f"{name} {batch}: AR {ms.get('autoregressive', float('nan')):.2f}, "
                         f"spec {ms.get('self_speculative', float('nan')):.2f}, auto "
                         f"{ms.get('self_speculative auto', float('nan')):.2f} ms/token (floor "
                         f"{model['floor_ms_per_token']:.3f})")
    failures = data.get("failures") or []
    return "; ".join(parts) + (f"; {len(failures)} FAILURES" if failures else "")


TEST_PARTS = ("engine_tests", "kernel_tests", "gpu_tests_rest", "suite")  # junit XML each


def merge(work, output, copy_to=None):
    work = Path(work)
    parts = []
    for line in (work / "parts.tsv").read_text().splitlines() if (work / "parts.tsv").exists() else []:
        name, rc, seconds, limit = line.split("\t")
        rc = int(rc)
        status = {0: "ok", 124: "TIMEOUT", 130: "TIMEOUT", 137: "TIMEOUT", 77: "skipped"}.get(rc, "FAIL")
        parts.append({"part": name, "rc": rc, "status": status, "seconds": int(seconds),
                      "limit_s": int(limit)})
    microbench = sorted(work.glob("routing/microbench-*.json"))
    bench, bench_text = _bench_summary(_json(microbench[-1]) if microbench else None)
    log = lambda part: _log_section(work, part)  # noqa: E731
    results = {
        "build": _grep(log("build"), r"built _C for .*"),
        **{part: _junit(work / f"{part}.xml") for part in TEST_PARTS},
        "sanity": _grep(log("sanity"), r"sanitize grid: .*"),
        "memcheck": _grep(log("memcheck"), r"ERROR SUMMARY: .*|compute-sanitizer not found.*"),
        "racecheck": _grep(log("racecheck"),
                           r"RACECHECK SUMMARY: .*|ERROR SUMMARY: .*|compute-sanitizer not found.*"),
        "microbench": bench,
        "roofline": _json(work / "roofline.json"),
        "e2e": _json(work / "e2e.json"),
    }
    text = {"build": results["build"], "sanity": results["sanity"],
            "memcheck": results["memcheck"], "racecheck": results["racecheck"],
            "microbench": bench_text, "roofline": _roofline_summary(results["roofline"]),
            "e2e": _e2e_summary(results["e2e"])}
    for key in TEST_PARTS:
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
    if copy_to and Path(copy_to).resolve() != Path(output).resolve():
        shutil.copy(output, copy_to)
    print(f"\nwrote {output}")
    print(f"{'part':<14} {'status':<8} {'s':>4}  result")
    for p in parts:
        print(f"{p['part']:<14} {p['status']:<8} {p['seconds']:>4}  {(text.get(p['part']) or '')[:200]}")
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
