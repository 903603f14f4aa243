"""The routing table: which backend "auto" picks for every benchmarked op and shape, beside
the measured kernel time of every provider, and where another backend was faster.

    python bench/routing.py                         # a GPU: run `pytest bench -k gpu`, then
                                                    #   write the table (about 5 minutes)
    python bench/routing.py -k "gpu and draft"      # one op's grid
    python bench/routing.py --json microbench.json  # a pytest-benchmark JSON made earlier
                                                    #   (any machine, e.g. gpu_validate's)

Writes <out-dir>/routing-<device>.json (every row, the ops' ROUTING rules, machine info, the
command) and routing-<device>.md (one table per op), and after a run the raw pytest-benchmark
JSON as microbench-<device>.json; prints the markdown and a summary last.
A row's verdict: "ok" when auto's backend is within TOLERANCE of the fastest backend measured
there; "auto slower" otherwise: the op's ROUTING table (ops/<op>.py) should send that shape to
the faster backend. Providers that are not backends (unfused, sdpa, flash, triton:fma, ...)
are shown for comparison; "vs base" is auto's kernel time over the baseline's (unfused for
the draft head, sdpa for attention): below 1 the kernel wins.
"""
import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whatever else is installed
TOLERANCE = 0.05  # auto's backend may be this much slower than the fastest before it counts
# op name -> (module holding the Op and its ROUTING, Op attribute, baseline provider)
OPS = {
    "draft_head_argmax": ("layerskip_kernels.ops.draft_head", "DRAFT_HEAD_ARGMAX", "unfused"),
    "draft_head_topk": ("layerskip_kernels.ops.draft_head", "DRAFT_HEAD_TOPK", "unfused"),
    "rms_norm": ("layerskip_kernels.ops.rms_norm", "RMS_NORM", None),
    "greedy_accept": ("layerskip_kernels.ops.greedy_accept", "GREEDY_ACCEPT", None),
    "attention_with_kvcache": ("layerskip_kernels.ops.attention_with_kvcache", "ATTENTION",
                               "sdpa"),
}
# extra_info keys that describe a measurement or the machine, not the call shape
NOT_SHAPE = {"provider", "device", "torch", "triton", "hbm_gb_per_s", "pct_of_hbm", "bytes",
             "kernel_us", "gb_per_s", "host_us", "host_gb_per_s", "timing", "calls",
             "input_copies", "l2_bytes", "capture_failed", "auto_backend", "sdpa_backend",
             "flash_attn", "flashinfer", "rope", "op"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="read this pytest-benchmark JSON instead of running")
    parser.add_argument("-k", default="gpu", help="pytest -k expression (default: gpu)")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--max-time", default="0.02", help="--benchmark-max-time per case (s)")
    return parser.parse_args(argv)


def run_benchmarks(expr, max_time, json_path):
    """The GPU grids through pytest-benchmark (the shared `measure` fixture times them)."""
    command = [sys.executable, "-m", "pytest", "bench", "-k", expr, "-q", "-p",
               "no:cacheprovider", f"--benchmark-json={json_path}",
               f"--benchmark-max-time={max_time}", "--benchmark-min-rounds=3",
               "--benchmark-warmup=off", "--benchmark-disable-gc"]
    print("+", " ".join(command), flush=True)
    proc = subprocess.Popen(command, cwd=ROOT)
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:  # `timeout -s INT`: pytest, interrupted too, still writes its JSON
        returncode = proc.wait(timeout=120)
        print("routing: interrupted; the table covers the cases measured so far", flush=True)
    if not Path(json_path).exists():
        raise SystemExit(f"routing: pytest wrote no JSON (exit code {returncode})")
    return command, returncode


def _op(name):
    module, attr, _ = OPS[name]
    return getattr(importlib.import_module(module), attr)


def routing_rules():
    """Each op's ROUTING table, as the op module states it."""
    rules = {}
    for name, (module, _, _) in OPS.items():
        table = getattr(importlib.import_module(module), "ROUTING", None)
        rules[name] = None if table is None else [
            dict(zip(("argument", "kernel_range", "why", "evidence"), rule)) for rule in table]
    return rules


def shape_key(info):
    return tuple(sorted((k, v) for k, v in info.items() if k not in NOT_SHAPE))


def build_rows(benchmarks):
    """One row per (op, shape): every provider's kernel µs, auto's pick, the fastest backend."""
    groups = {}
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if info.get("op") not in OPS or info.get("kernel_us") is None:
            continue
        groups.setdefault((info["op"], shape_key(info)), []).append(info)
    rows = []
    for (op_name, key), infos in sorted(groups.items(), key=lambda g: (g[0][0], str(g[0][1]))):
        backends = set(_op(op_name).impls)
        kernel = {i["provider"]: i["kernel_us"] for i in infos}
        auto = next((i["auto_backend"] for i in infos if i.get("auto_backend")), None)
        measured = {p: us for p, us in kernel.items() if p in backends}
        fastest = min(measured, key=measured.get) if measured else None
        row = dict(op=op_name, shape=dict(key), auto=auto, fastest=fastest,
                   kernel_us=kernel,
                   pct_of_hbm={i["provider"]: i.get("pct_of_hbm") for i in infos},
                   host_us={i["provider"]: i.get("host_us") for i in infos},
                   timing={i["provider"]: i.get("timing") for i in infos},
                   sdpa_backend=next((i["sdpa_backend"] for i in infos
                                      if i.get("sdpa_backend")), None))
        auto_us = kernel.get(auto)
        if auto_us is None or fastest is None:
            row["verdict"] = "auto's backend not measured"
        elif auto_us <= measured[fastest] * (1 + TOLERANCE):
            row["verdict"] = "ok"
        else:
            row["verdict"] = (f"auto slower: {fastest} is "
                              f"{100 * (auto_us / measured[fastest] - 1):.0f}% faster")
        base = OPS[op_name][2]
        if base in kernel and auto_us:
            row["vs_base"] = auto_us / kernel[base]
        rows.append(row)
    return rows


def _fmt_us(us, pct):
    if us is None:
        return ""
    return f"{us:.1f}" + (f" ({pct:.0f}%)" if pct else "")


def markdown(rows, rules, header):
    """One table per op: shape, each provider's kernel µs (% of HBM), auto, verdict."""
    lines = [header, ""]
    for op_name in OPS:
        op_rows = [r for r in rows if r["op"] == op_name]
        lines.append(f"### {op_name}")
        lines.append("")
        for rule in rules.get(op_name) or []:
            lines.append(f"- routing rule: {rule['argument']}: {rule['kernel_range']} for the "
                         f"kernel, else torch ({rule['why']}; {rule['evidence']})")
        if rules.get(op_name) == []:
            lines.append("- routing rules: none (the kernel takes every shape)")
        lines.append("")
        if not op_rows:
            lines += ["(not measured)", ""]
            continue
        shape_cols = list(op_rows[0]["shape"])
        providers = sorted({p for r in op_rows for p in r["kernel_us"]})
        base = OPS[op_name][2]
        cols = shape_cols + [f"{p} µs" for p in providers] + ["auto", "fastest backend"] + (
            ["auto / " + base] if base else []) + ["verdict"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in op_rows:
            cells = [str(r["shape"].get(c, "")) for c in shape_cols]
            cells += [_fmt_us(r["kernel_us"].get(p), r["pct_of_hbm"].get(p)) for p in providers]
            cells += [str(r["auto"]), str(r["fastest"])]
            if base:
                cells.append(f"{r['vs_base']:.2f}" if r.get("vs_base") else "")
            cells.append(r["verdict"])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def device_slug(report):
    name = None
    for bench in report.get("benchmarks", []):
        name = bench.get("extra_info", {}).get("device") or name
    name = name or report.get("machine_info", {}).get("layerskip", {}).get("cuda_device")
    return re.sub("[^a-z0-9]+", "-", (name or "unknown").lower()).strip("-")


def main(argv=None):
    args = parse_args(argv)
    command, returncode = None, 0
    if args.json:
        json_path = args.json
    else:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("routing: needs a CUDA GPU to measure (or --json FILE)")
        json_path = str(Path(tempfile.mkdtemp()) / "microbench.json")
        command, returncode = run_benchmarks(args.k, args.max_time, json_path)
    report = json.loads(Path(json_path).read_text())
    rows, rules = build_rows(report.get("benchmarks", [])), routing_rules()
    machine = report.get("machine_info", {})
    slug = device_slug(report)
    commit = machine.get("layerskip", {}).get("commit")
    hbm = machine.get("hbm_gb_per_s")
    header = (f"## Routing on {slug} (commit {commit}, HBM {hbm:.0f} GB/s measured in the run)"
              if hbm else f"## Routing on {slug} (commit {commit})")
    text = markdown(rows, rules, header)
    bad = [r for r in rows if r["verdict"] != "ok"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"routing-{slug}.json").write_text(json.dumps(dict(
        machine_info=machine, command=command, pytest_exit_code=returncode,
        tolerance=TOLERANCE, routing_rules=rules, rows=rows, not_ok=len(bad)), indent=1))
    (out / f"routing-{slug}.md").write_text(text + "\n")
    if not args.json:
        (out / f"microbench-{slug}.json").write_text(json.dumps(report))
    print(text)
    print(f"routing: {len(rows)} shapes, {len(bad)} not ok; wrote {out}/routing-{slug}.json "
          f"and .md")
    for r in bad:
        print(f"  {r['op']} {r['shape']}: {r['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
