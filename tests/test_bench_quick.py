"""The benchmark suite on the CPU: quick mode, `layerskip sweep`, and the GPU-only scripts'
argument handling and CPU-testable pieces (bench/roofline.py, bench/gpu_validate[.py],
bench/routing.py, the kernel timer's plan in bench/conftest.py)."""
import argparse
import contextlib
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from layerskip_kernels import sweep

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child_env():
    """The environment for a child pytest: without the parent's xdist worker variables, which
    make pytest-benchmark disable itself (the suite runs under `-n 8` on the GPU machine)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}


def _quick_json(path, *select):
    proc = subprocess.run([sys.executable, "-m", "pytest", *select, "-k", "cpu", "-q", "-p",
                           "no:cacheprovider", "--benchmark-max-time=0.01",
                           f"--benchmark-json={path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=150,
                          env=_child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.slow
def test_quick_mode_runs_every_cpu_case_in_two_minutes(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench", "-k", "cpu",
                           "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=150,
                          env=_child_env())
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    assert elapsed < 120, f"quick mode took {elapsed:.0f} s"


@pytest.mark.slow
def test_benchmark_json_records_machine_and_bandwidth(tmp_path, monkeypatch):
    """Also under xdist (the GPU run's suite: PYTEST_XDIST_WORKER set in this process): the
    child must not inherit it, or pytest-benchmark disables itself and records no time."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    report = _quick_json(tmp_path / "bench.json", "bench/bench_rms_norm.py")
    assert report["machine_info"]["layerskip"]["torch"] == torch.__version__
    info = report["benchmarks"][0]["extra_info"]
    assert info["bytes"] > 0 and info["gb_per_s"] > 0 and info["device"]
    assert info["kernel_us"] > 0 and info["host_us"] > 0 and info["timing"]
    assert info["op"] == "rms_norm" and info["auto_backend"] == "torch"


@pytest.mark.slow
def test_routing_table_from_the_quick_json(tmp_path):
    """bench/routing.py --json: one row per op and shape, with auto's pick and a verdict, the
    ops' ROUTING rules, written as JSON and markdown."""
    _quick_json(tmp_path / "bench.json", "bench")
    routing = _load("routing")
    assert routing.main(["--json", str(tmp_path / "bench.json"), "--out-dir",
                         str(tmp_path / "out")]) == 0
    written = list((tmp_path / "out").glob("routing-*.json"))
    assert len(written) == 1 and written[0].with_suffix(".md").exists()
    table = json.loads(written[0].read_text())
    assert {r["op"] for r in table["rows"]} == set(routing.OPS)
    assert all(r["auto"] in ("torch", "cpu") for r in table["rows"])  # a CPU: no GPU kernel
    assert all(r["verdict"] == "ok" for r in table["rows"] if r["auto"] == "torch")
    assert table["routing_rules"]["draft_head_argmax"][0]["argument"] == "h"
    assert table["routing_rules"]["greedy_accept"] == []


def test_routing_verdicts():
    """auto's backend 10% slower than another backend: flagged; within 5%: ok; the baseline
    ratio is auto's time over the unfused path's."""
    routing = _load("routing")

    def bench(provider, us, auto="triton", B=1):
        return {"extra_info": dict(op="draft_head_argmax", provider=provider, kernel_us=us,
                                   auto_backend=auto, model="m", B=B, k=1, device="d")}
    rows = routing.build_rows([bench("torch", 100.0), bench("triton", 110.0),
                               bench("unfused", 120.0), bench("torch", 100.0, B=2),
                               bench("triton", 104.0, B=2)])
    assert [r["shape"]["B"] for r in rows] == [1, 2]
    assert rows[0]["verdict"].startswith("auto slower: torch is 10% faster")
    assert rows[0]["vs_base"] == pytest.approx(110 / 120)
    assert rows[1]["verdict"] == "ok" and rows[1]["fastest"] == "torch"


@no_gpu
def test_routing_needs_a_gpu_or_a_json(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        _load("routing").main(["--out-dir", str(tmp_path)])


def test_kernel_timer_plan(monkeypatch):
    """Inputs are copied until they span 2 L2 sizes (rotate), up to 128 copies and 2 GiB;
    smaller ones are timed one call at a time after an L2 eviction."""
    monkeypatch.syspath_prepend(str(BENCH))
    timer = _load("conftest")
    l2 = 50 << 20
    assert timer.plan(525 << 20, l2, True) == (1, True)  # the lm_head alone spans L2
    assert timer.plan(2 << 20, l2, True) == (50, True)
    assert timer.plan(8 << 10, l2, True) == (128, False)  # a decode row: evict instead
    assert timer.plan(8 << 10, l2, False) == (1, False)
    assert timer.plan(1 << 30, 1 << 30, True) == (2, True)  # the 2 GiB budget
    assert timer.rotate_calls(48, 10e-6) == 960  # 42 rounds of 48 would pass MAX_CALLS
    assert timer.rotate_calls(1, 200e-6) == 100 and timer.rotate_calls(1, 1.0) == 1
    assert timer.evict_calls(1e-6, 40e-6) == 100 and timer.evict_calls(0.01, 0.0) == 10
    assert timer.tensor_bytes((torch.ones(4), 1e-5, None, [torch.ones(2, dtype=torch.int64)])) == 32


def test_roofline_help():
    proc = subprocess.run([sys.executable, str(BENCH / "roofline.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--batches" in proc.stdout and "Leviathan" in proc.stdout


def test_roofline_rejects_unknown_model():
    roofline = _load("roofline")
    with pytest.raises(SystemExit) as exit_info:
        roofline.parse_args(["--models", "llama-3-8b,gpt-2"])
    assert exit_info.value.code == 2


@no_gpu
def test_roofline_exits_cleanly_without_gpu(tmp_path):
    roofline = _load("roofline")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        roofline.main(["--output", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_projected_speedup_formula():
    roofline = _load("roofline")
    # a = 0.5, k = 1: (1 - 0.25) / 0.5 = 1.5 tokens per round; free drafts, verify = 1 step
    assert roofline.projected_speedup(0.5, 1, c=0.0) == pytest.approx(1.5)
    # k = 4, c = 0.25, v = 1.2: (1 - 0.9^5) / 0.1 / (4 * 0.25 + 1.2)
    assert roofline.projected_speedup(0.9, 4, 0.25, 1.2) == pytest.approx(4.0951 / 2.2)


def test_roofline_case_and_damped_run_on_cpu():
    roofline = _load("roofline")
    shape = dict(vocab_size=96, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=64)
    model = roofline.random_model(shape, "cpu", dtype=torch.float32, max_seq_len=64)
    with torch.inference_mode():
        row = roofline.roofline_case(model, 2, 1, [2], context=8, bandwidth=10.0, graphs=True,
                                     iters=1)
        assert row["c"] > 0 and row["v_k2"] > 0 and set(row["projected_k2"]) == {
            "0.5", "0.6", "0.7", "0.8", "0.9"}
        layer, head, _ = roofline.byte_counts(model, 2, 8)
        assert row["weight_bytes_full"] == 4 * layer + head
        # a round of k = 2 reads layers [0, 1) twice, all 4 layers once, and the head 3 times
        assert row["round_k2_floor_ms"] == pytest.approx((6 * layer + 3 * head) / 10.0 / 1e6)
        assert row["ar_floor_ms"] == pytest.approx((4 * layer + head) / 10.0 / 1e6)
        measured = roofline.measured_run(model, 1, [2], 0.01, 12, 1, 1)
    spec = [r for r in measured["results"] if r["name"] == "ours self_speculative E=1 k=2"][0]
    assert spec["same_tokens_as_autoregressive"]
    assert spec["acceptance_rate"] > 0.9  # damped upper layers: the exit agrees with the top


def test_random_model_keeps_tied_embeddings_tied():
    """Llama-3.2-1B ties lm_head to the embedding (as transformers loads it): one 0.5 GB
    tensor in bf16, not two."""
    roofline = _load("roofline")
    shape = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
    tied = roofline.random_model({**shape, "tie_embeddings": True}, "cpu", dtype=torch.float32)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    untied = roofline.random_model(shape, "cpu", dtype=torch.float32)
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1
    assert roofline.SHAPES["llama-3.2-1b"]["tie_embeddings"]


def test_gpu_validate_script_parses_and_exits_without_gpu():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    assert subprocess.run([bash, "-n", str(BENCH / "gpu_validate")]).returncode == 0
    proc = subprocess.run([bash, str(BENCH / "gpu_validate"), "--help"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and "compute-sanitizer" in proc.stdout
    if not torch.cuda.is_available():
        proc = subprocess.run([bash, str(BENCH / "gpu_validate")], capture_output=True,
                              text=True, timeout=60, env={"PATH": str(Path(sys.executable).parent)
                                                          + ":/usr/bin:/bin"})
        assert proc.returncode == 0 and "nothing validated" in proc.stdout


def test_gpu_validate_merge(tmp_path, capsys):
    gpu_validate = _load("gpu_validate")
    (tmp_path / "parts.tsv").write_text("build\t0\t40\t100\nsuite\t124\t80\t80\n"
                                        "racecheck\t77\t0\t40\n")
    (tmp_path / "gpu_validate.log").write_text(
        "===== part build (limit 150s)\n...\nbuilt _C for sm_90a\n"
        "===== part suite (limit 80s)\nbuilt _C for sm_80 (another part's line)\n")
    (tmp_path / "suite.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>')
    out = tmp_path / "results" / "dev.json"
    assert gpu_validate.main(["merge", str(tmp_path), str(out)]) == 1  # the suite timed out
    report = json.loads(out.read_text())
    assert [p["status"] for p in report["parts"]] == ["ok", "TIMEOUT", "skipped"]
    assert report["results"]["suite"] == {"passed": 2, "failed": 1, "errors": 0, "skipped": 2}
    assert "sm_90a" in capsys.readouterr().out.splitlines()[-3]


def test_gpu_validate_e2e_on_cpu(tmp_path):
    """The one call's e2e part on a small bf16 shape on the CPU (no graphs there: eager both
    times), so that the GPU's minutes are not spent on a Python error: every case written,
    replay == eager, the summary readable."""
    gpu_validate = _load("gpu_validate")
    shape = dict(vocab_size=96, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=64)
    with torch.inference_mode():
        rc = gpu_validate.e2e(tmp_path / "e2e.json", device="cpu", shapes={"tiny": shape},
                              new_tokens=6, bandwidth=10.0)
    report = json.loads((tmp_path / "e2e.json").read_text())
    cases = report["models"]["tiny"]["cases"]
    assert rc == 0 and not report["failures"]
    assert [(c["batch"], c["strategy"]) for c in cases] == [
        (b, s) for b in ("B=1", "B=4 ragged")
        for s in ("autoregressive", "self_speculative", "self_speculative auto")]
    assert all(c["choices"] for c in cases if c["strategy"] == "self_speculative auto")
    assert all(c["same_as_eager"] and c["ms_per_token"] > 0 for c in cases)
    assert all(c["same_as_autoregressive"] for c in cases if c["strategy"] != "autoregressive")
    assert "tiny B=4 ragged: AR" in gpu_validate._e2e_summary(report)
    assert ", auto " in gpu_validate._e2e_summary(report)


def _script_part(name):
    """The command line of part `name` in bench/gpu_validate, continuation lines joined."""
    text = (BENCH / "gpu_validate").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith(f"part {name} "))
    return line.split()[2:]


def test_gpu_validate_roofline_flags_parse():
    roofline = _load("roofline")
    command = _script_part("roofline")
    assert command[:2] == ["$PY", "bench/roofline.py"]
    args = roofline.parse_args([a.strip('"') for a in command[2:]])
    assert args.batches == [1, 8] and args.draft_lengths == [2, 4]


def test_gpu_validate_leaves_out_the_host_heavy_gpu_tests_it_names():
    """The -k expression the one call deselects (and `more` runs) names 31 GPU tests."""
    text = (BENCH / "gpu_validate").read_text()
    heavy = text.split('HOST_HEAVY="', 1)[1].split('"', 1)[0]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                           "-p", "no:cacheprovider", "tests/test_draft_head.py", "-k", heavy],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "31/" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def _sweep_args(model, output, **overrides):
    args = dict(model=str(model), tokenizer=None, prompts=None, dtype="float32", device="cpu",
                backend="auto", exit_layers="1,2", draft_lengths="1,2", output=str(output),
                max_new_tokens=8, repeats=1, warmup=0, threads=1)
    return argparse.Namespace(**{**args, **overrides})


def test_sweep_on_stories(stories_path, tmp_path, capsys):
    with torch.inference_mode():
        report = sweep.main_sweep(_sweep_args(stories_path, tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    grid = {(r["exit_layer"], r["num_speculations"]) for r in rows
            if r["strategy"] == "self_speculative"}
    assert grid == {(e, k) for e in ("1", "2") for k in ("1", "2", "auto")} | {
        ("auto", "per round")}  # the adaptive policy's row
    assert all(r["same_tokens_as_autoregressive"] == "True" for r in rows
               if r["strategy"] != "early_exit")  # greedy self-speculation is lossless
    for r in rows:  # the ceiling scales the measured speedup to k + 1 tokens per round
        if r["num_speculations"] in ("1", "2"):
            k, speedup = int(r["num_speculations"]), float(r["speedup_vs_ours_autoregressive"])
            assert float(r["speedup_if_all_accepted"]) == pytest.approx(
                speedup * (k + 1) / float(r["tokens_per_round"]))
            assert float(r["speedup_if_all_accepted"]) >= speedup
        else:
            assert r["speedup_if_all_accepted"] == ""
    assert json.loads((tmp_path / "sweep.json").read_text())["settings"]["exit_layers"] == [1, 2]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "sweep_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    best, out = sweep.best_pair(report), capsys.readouterr().out
    assert (f"best of the fixed k (k=auto not compared; sweep.csv has it): "
            f"E={best['exit_layer']} k={best['num_speculations']}:") in out
    assert "adaptive (exit layer auto): x" in out and "the best fixed; rounds per choice" in out


@pytest.mark.parametrize("arg, value", [("exit_layers", "1,x"), ("exit_layers", "0,1"),
                                        ("draft_lengths", "")])
def test_sweep_rejects_bad_grids(stories_path, tmp_path, arg, value):
    flag = "--" + arg.replace("_", "-")
    with pytest.raises(ValueError, match=flag):
        sweep.main_sweep(_sweep_args(stories_path, tmp_path, **{arg: value}))


def test_sweep_rejects_exit_layer_past_the_model(stories_path, tmp_path):
    with pytest.raises(ValueError, match=r"--exit-layers: expected layers in \[1, 4\]"):
        sweep.main_sweep(_sweep_args(stories_path, tmp_path, exit_layers="2,5"))


class _FakeCuda:
    """Enough of torch.cuda for bench/conftest.kernel_time to run its control flow on a CPU:
    events read the host clock, streams are no-ops, a capture either succeeds (replay does
    nothing) or raises (the eager fallback), L2 is 1 MiB."""

    def __init__(self, capture_fails):
        self.capture_fails = capture_fails

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class _Stream:
        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            pass

    def Stream(self):
        return self._Stream()

    def current_stream(self):
        return self._Stream()

    def stream(self, s):
        return contextlib.nullcontext()

    def graph(self, g):
        if self.capture_fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        return contextlib.nullcontext()

    def synchronize(self):
        pass

    def current_device(self):
        return 0

    def get_device_properties(self, index):
        return argparse.Namespace(L2_cache_size=1 << 20)


@pytest.mark.parametrize("capture_fails", [False, True], ids=["graph", "eager"])
@pytest.mark.parametrize("size", [1 << 16, 1 << 8], ids=["rotate", "evict"])
def test_kernel_time_control_flow_with_a_fake_cuda(monkeypatch, capture_fails, size):
    monkeypatch.syspath_prepend(str(BENCH))
    timer = _load("conftest")
    fake_torch = argparse.Namespace(**{name: getattr(torch, name) for name in dir(torch)
                                       if not name.startswith("__")})
    fake_torch.cuda = _FakeCuda(capture_fails)
    fake_torch.empty = lambda *shape, device=None, **kw: torch.empty(*shape, **kw)
    monkeypatch.setattr(timer, "torch", fake_torch)
    ran = []

    def call(args):
        ran.append(len(args))
        return args[0] * 2

    inputs = lambda: (torch.ones(size // 4),)  # noqa: E731
    us, info = timer.kernel_time(call, inputs, inputs())
    assert us >= 0 and ran and info["l2_bytes"] == 1 << 20
    copies, rotate = timer.plan(size, 1 << 20, True)
    assert info["input_copies"] == copies and ("rotating" in info["timing"]) == rotate
    assert ("capture_failed" in info) == capture_fails
    assert info["timing"].startswith("eager" if capture_fails else "graph")


def test_json_prompts_hold_text_across_lines_or_ids(tmp_path):
    """A .json prompts file: strings (code spans lines) or token-id lists, in order."""
    from layerskip_kernels.benchmark import load_prompts
    import layerskip_kernels as lsk
    model, tokenizer = lsk.load_model(), lsk.load_tokenizer()
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["def f(x):\n    return x", [0, 5, 6]]))
    prompts, labels = load_prompts(model, path, tokenizer)
    assert prompts == [tokenizer.encode("def f(x):\n    return x"), [0, 5, 6]]
    assert labels[1].endswith("item 1")
    for bad in ("[]", "[[]]", '["a", 3]', "{", '[["x"]]'):
        path.write_text(bad)
        with pytest.raises(ValueError, match="--prompts"):
            load_prompts(model, path, tokenizer)


def test_batch_size_decodes_prompts_alone_and_sums_the_rounds():
    """bench / sweep / compare --batch-size 1: each prompt decoded alone, the same tokens as
    one batch, the rounds of every call summed into one acceptance."""
    from layerskip_kernels.benchmark import _ours
    import layerskip_kernels as lsk
    model = lsk.load_model()
    prompts = [[0, 5, 6, 7], [0, 9], [0, 11, 12]]
    kw = dict(strategy="self_speculative", exit_layer=2, num_speculations=3, eos_token_id=[])
    together, stats = _ours(model, prompts, 12, **kw)()
    alone, alone_stats = _ours(model, prompts, 12, batch_size=1, **kw)()
    assert alone == together
    each = [lsk.generate(model, [p], 12, **kw).stats for p in prompts]
    assert alone_stats["drafted"] == sum(s["drafted"] for s in each)
    assert alone_stats["acceptance_rate"] == sum(s["accepted"] for s in each) / sum(
        s["drafted"] for s in each)


def test_policy_headroom_replay_counts_rounds_as_self_speculation_does():
    headroom = _load("policy_headroom")
    trace = {3: ([1, 1, 0, 1, 1, 1, 1, 0], [0.9] * 8)}
    cost = {(3, 2): 2.0, (3, 4): 3.0}
    # k = 2 at t: accepts the run of agreements from t, at most 2, then one token more.
    # t=0: m=2 -> t=3; t=3: m=2 -> t=6; t=6: m=1 -> t=8: three rounds of cost 2.
    assert headroom.replay(trace, cost, lambda t, history: (3, 2)) == 6.0
    fixed = {k: headroom.speed([trace], cost, lambda tr, k=k: lambda t, h: (3, k)) for k in (2, 4)}
    best = headroom.speed([trace], cost, headroom.oracle(cost, [3], [2, 4]))
    assert best >= max(fixed.values())
    assert headroom.up_to([1, 2, 4], 3) == 4 and headroom.up_to([1, 2, 4], 9) == 4


def test_policy_headroom_traces_match_the_model(stories_path):
    """The agreement trace at the last layer but one is what early exit there decodes
    alongside the full model's tokens (a mismatch would make every replay wrong)."""
    import layerskip_kernels as lsk
    headroom = _load("policy_headroom")
    model = lsk.load_model(stories_path)
    L, prompt = model.config.n_layers, [1]
    (trace,) = headroom.traces(model, [prompt], 12)
    full = lsk.generate(model, [prompt], 12, eos_token_id=[]).tokens[0]
    assert set(trace) == set(range(1, L)) and all(len(a) == 12 for a, _ in trace.values())
    # Position 0's exit token is early exit's first token from the same prompt.
    for e in (1, L - 1):
        first = lsk.generate(model, [prompt], 1, strategy="early_exit", exit_layer=e,
                             eos_token_id=[]).tokens[0][0]
        assert trace[e][0][0] == (first == full[0])
        assert 0 < trace[e][1][0] <= 1
