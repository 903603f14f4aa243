"""The kept decode state on the CPU, with a stand-in for CUDA graph capture: what a benchmark's
and a user's alternating calls reuse, what makes a state stale (RoPE tables), the geometry
that eager and replayed calls share (so the attention's split-KV counts are the same), two
threads on one model, and the budgets of bench/gpu_validate's one call."""
import importlib
import re
import shutil
import subprocess
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from random_weights import random_weights
from test_policy import Scripted

import layerskip_kernels as lsk
from layerskip_kernels.benchmark import configurations, time_interleaved
from layerskip_kernels.decoding import plan as plan_module
from layerskip_kernels.decoding import state as state_module
from layerskip_kernels.decoding.state import DecodeState, Graphs, decode_state
from layerskip_kernels.ops import kernels

generate_module = importlib.import_module("layerskip_kernels.decoding.generate")
VOCAB = 61
ROOT = Path(__file__).resolve().parents[1]


def random_llama(generator, max_seq_len=1024):
    config = lsk.LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, n_kv_heads=2,
                             head_dim=32, hidden_dim=48, max_seq_len=max_seq_len)
    model = random_weights(lsk.Llama(config), generator, 0.3)
    model.backend = "torch"  # the Python steps (the C++ CPU steps would stand in for graphs)
    return model


class Capture:
    """A stand-in for CUDA graphs on the CPU: the CPU is "replayable", a capture records its
    key and a replay reruns the captured step over the same buffers (what a graph does),
    and every DecodeState built is counted."""

    def __init__(self, monkeypatch):
        self.keys, self.states = [], []
        capture = self

        class Replay:
            """A graph replays what the step launched at capture: the step's closure is
            frozen here (a decode loop rebinds `rows` to each bucket's rows as it goes)."""

            def __init__(self, step):
                cells = tuple(types.CellType(c.cell_contents) for c in step.__closure__ or ())
                self.replay = types.FunctionType(step.__code__, step.__globals__,
                                                 closure=cells or None)

        def fake_capture(graphs, key, step):
            capture.keys.append(key)
            return Replay(step)

        init = DecodeState.__init__

        def counted_init(state, *args, **kwargs):
            capture.states.append(state)
            init(state, *args, **kwargs)

        for module in (state_module, generate_module):
            monkeypatch.setattr(module, "replayable", lambda device: True)
        monkeypatch.setattr(Graphs, "_capture", fake_capture)
        monkeypatch.setattr(DecodeState, "__init__", counted_init)


@pytest.fixture
def capture(monkeypatch):
    return Capture(monkeypatch)


def ragged_prompts(generator, lengths=(5, 17, 9)):
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def test_the_benchmarks_configurations_twice_build_no_new_state(generator, capture):
    """benchmark.run_benchmark's round-robin (autoregressive, early exit, k = 2 and 4, "auto",
    layer skip, the layer-skip draft): after one pass every later call fits the kept state
    and replays its graphs; nothing is rebuilt or captured again. Greedy self-speculative
    tokens stay the autoregressive ones."""
    model = random_llama(generator)
    prompts = ragged_prompts(generator)
    timed = configurations(model, prompts, 12, exit_layers=[1], draft_lengths=(2, 4),
                           speedups=(1.5,), with_transformers=False)
    after_first = []

    def progress(done, total, name):
        if done == len(timed):
            after_first.append((len(capture.states), len(capture.keys)))

    with torch.inference_mode():
        rows, _ = time_interleaved(timed, repeats=1, warmup=1, progress=progress)
    (built, captured), = after_first
    assert built == 1 and captured > 0
    assert len(capture.states) == built, "the second pass built a new state"
    assert len(capture.keys) == captured, capture.keys[captured:]
    for row in rows:
        assert row["cuda_graphs"] or row["name"].endswith("k=auto"), row
        if row["name"].startswith("ours self_speculative"):
            assert row["same_tokens_as_autoregressive"], row["name"]


def test_changing_k_draft_or_strategy_reuses_the_state_through_decode_state(generator):
    """decode_state(..., graphs=True) with each configuration's sizes as generate() asks them
    (k drafts and k + 1 reserved positions; "auto" drafts up to 8): one state for all."""
    model = random_llama(generator)
    calls = [(3, 17 + 12 + k + 1, k) for k in (0, 2, 4, 8, 0, 2)]  # AR, k=2, k=4, auto, ...
    states = {id(decode_state(model, batch, length, k, graphs=True)) for batch, length, k in calls}
    states |= {id(decode_state(model, batch, length, k, graphs=True)) for batch, length, k in calls}
    assert len(states) == 1


def test_a_rope_regrow_gives_a_new_state(generator):
    """A kept graph holds the RoPE tables' addresses; model.rope() frees them when it grows.
    The state covers its cache with the tables up front (no step regrows them), keeps them
    alive, and a regrow elsewhere changes the key."""
    model = random_llama(generator, max_seq_len=4096)
    state = decode_state(model, 2, 40, 2, graphs=True)
    tables = model.rope(1)
    assert len(tables[0]) >= state.max_seq_len and state.rope is tables
    assert decode_state(model, 2, 40, 2, graphs=True) is state
    model.rope(state.max_seq_len + 1)  # e.g. a long forward() between two generate() calls
    assert model._rope is not tables
    fresh = decode_state(model, 2, 40, 2, graphs=True)
    assert fresh is not state and fresh.rope is model._rope
    assert state.rope is tables  # the old graphs' tables were never freed under them


def test_a_generate_call_never_regrows_the_kept_states_rope(generator, capture):
    """Prefill and steps read the tables the state was built with: calls that fit it keep
    it; a longer call gets a new state, whose tables are the ones its steps use."""
    model = random_llama(generator, max_seq_len=4096)
    with torch.inference_mode():
        lsk.generate(model, ragged_prompts(generator), max_new_tokens=20)
        tables = model._rope
        lsk.generate(model, ragged_prompts(generator, (200, 2)), max_new_tokens=20)
        assert model._rope is tables and len(capture.states) == 1
        lsk.generate(model, ragged_prompts(generator, (300, 2)), max_new_tokens=20)
    assert len(capture.states) == 2 and model._rope is capture.states[1].rope
    assert model._decode_state is capture.states[1]


def split_counts(shapes, sm_count=132):
    """The Triton attention's split-KV counts (triton/attention_with_kvcache.py, chosen from
    the cache length Smax and the batch, never from the row lengths) at an H200's SM count,
    bf16, for each recorded (B, Sq, Hq, Hkv, D, Smax)."""
    triton_attention = pytest.importorskip("layerskip_kernels.triton.attention_with_kvcache")
    return [triton_attention.num_splits_heuristic(
        B, Hkv, Sq, Hq // Hkv, Smax, sm_count,
        triton_attention.launch_config(Sq, Hq // Hkv, D)) for B, Sq, Hq, Hkv, D, Smax in shapes]


@pytest.mark.parametrize("strategy,extra", [
    ("autoregressive", {}), ("self_speculative", {"exit_layer": 1, "num_speculations": 3})])
def test_eager_and_replayed_calls_have_the_same_geometry(generator, capture, monkeypatch,
                                                         strategy, extra):
    """cuda_graphs=False runs on the kept state's buffers: the same batch bucket (4 for 3
    rows) and cache length (a power of two) as replays, hence the same split-KV counts, so
    replay against eager compares the same arithmetic. The old exact-size eager state had 3
    rows of 42 positions, against 4 of 256: 2 splits against 1 at these sizes."""
    shapes = []
    attend = kernels.Decode.attend

    def recorded(step, q, k, v, kv):
        shapes.append((q.shape[0], q.shape[1], q.shape[2], kv[0].shape[2], q.shape[3],
                       kv[0].shape[1]))
        return attend(step, q, k, v, kv)

    monkeypatch.setattr(kernels.Decode, "attend", recorded)
    model = random_llama(generator)
    prompts = ragged_prompts(generator)
    kw = dict(max_new_tokens=16, strategy=strategy, eos_token_id=[], **extra)
    with torch.inference_mode():
        eager = lsk.generate(model, prompts, cuda_graphs=False, **kw)
        eager_shapes, shapes[:] = list(shapes), []
        replayed = lsk.generate(model, prompts, **kw)
    assert eager.stats["path"] == "eager: cuda_graphs=False" and not eager.stats["cuda_graphs"]
    assert replayed.stats["cuda_graphs"], replayed.stats["path"]
    assert replayed.tokens == eager.tokens
    assert len(capture.states) == 1
    # A replay reruns the captured step here: each step's shapes are recorded either way.
    assert sorted(set(shapes)) == sorted(set(eager_shapes))
    assert {Smax for *_, Smax in shapes} == {256}
    assert 4 in {B for B, *_ in shapes} <= {1, 2, 4}  # buckets, whatever finishes when
    assert split_counts(sorted(set(shapes))) == split_counts(sorted(set(eager_shapes)))


def test_threads_on_one_model_take_turns_with_its_state(generator, capture, monkeypatch):
    """Two threads calling generate() on one model with a kept state wait for each other
    (held_state's lock): never two calls inside it at once, and each gets the tokens of a
    sequential run."""
    model = random_llama(generator)
    prompts = [ragged_prompts(generator), ragged_prompts(generator, (3, 30))]
    kw = dict(max_new_tokens=8, eos_token_id=[])
    with torch.inference_mode():
        want = [lsk.generate(model, p, **kw).tokens for p in prompts]
    inside, most = [0], [0]
    held = state_module.held_state

    def counted(*args):
        with held(*args) as state:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            try:
                yield state
            finally:
                inside[0] -= 1

    monkeypatch.setattr(generate_module, "held_state",
                        state_module.contextlib.contextmanager(counted))
    got, errors = [None, None], []

    def run(i):
        try:
            with torch.inference_mode():
                got[i] = lsk.generate(model, prompts[i], stream=lambda row, t: time.sleep(0.002),
                                      **kw).tokens
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == want
    assert most[0] == 1


def test_a_nested_call_in_the_same_thread_gets_its_own_state(generator, capture):
    """A stream callback that generates with the same model (same thread) cannot wait for the
    call it is inside: it gets a state of its own, not kept, and its own tokens are right."""
    model = random_llama(generator)
    prompts = ragged_prompts(generator)
    with torch.inference_mode():
        inner_want = lsk.generate(model, prompts[:1], max_new_tokens=4, eos_token_id=[]).tokens
        outer_want = lsk.generate(model, prompts, max_new_tokens=6, eos_token_id=[]).tokens
        kept = model._decode_state
        inner = []

        def stream(row, tokens):
            if not inner:
                inner.append(lsk.generate(model, prompts[:1], max_new_tokens=4,
                                          eos_token_id=[]).tokens)

        done = []
        worker = threading.Thread(target=lambda: done.append(lsk.generate(
            model, prompts, max_new_tokens=6, eos_token_id=[], stream=stream).tokens))
        worker.start()
        worker.join(timeout=120)
    assert not worker.is_alive(), "the nested call waited for its own caller"
    assert done == [outer_want] and inner == [inner_want]
    assert model._decode_state is kept


# ---------------------------------------------------------------- the bound on graphs


class Held:
    """A stand-in graph that checks, when it replays, that its Graphs still holds it: an
    evicted graph never replays."""

    def __init__(self, graphs, key, step):
        self.graphs, self.key, self.step = graphs, key, step

    def replay(self):
        assert self.graphs.captured.get(self.key) is self, f"{self.key} replayed, not held"
        self.graphs.last_replayed = self
        self.step()


@pytest.fixture
def held(monkeypatch):
    """Graphs._capture makes Held graphs and records, per capture, the keys held while it
    ran. A capture on CUDA begins with a device sync (torch.cuda.graph): the graph replayed
    last must still be held then, so that no graph is dropped while it may be replaying."""
    log = []

    def fake_capture(graphs, key, step):
        last = getattr(graphs, "last_replayed", None)
        assert last is None or graphs.captured.get(last.key) is last
        log.append((key, list(graphs.captured)))
        return Held(graphs, key, step)

    monkeypatch.setattr(Graphs, "_capture", fake_capture)
    return log


def test_graphs_evict_the_least_recently_used_and_capture_it_again(held):
    graphs, ran = Graphs(True, capacity=2), []

    def run(key):
        graphs.run(key, lambda: ran.append(key))

    for key in "ABA":  # A captured, B captured, A replayed: now B is the least recent
        run(key)
    run("C")  # evicts B, not A
    assert list(graphs.captured) == ["A", "C"] and graphs.evictions == 1
    run("B")  # captured again, evicting A
    assert list(graphs.captured) == ["C", "B"] and graphs.evictions == 2
    run("C")
    assert [key for key, _ in held] == ["A", "B", "C", "B"]
    # Each capture ran with every earlier graph still held: evicted only after it.
    assert [before for _, before in held] == [[], ["A"], ["B", "A"], ["A", "C"]]
    assert graphs.replays == 2 and ran == list("ABACBC")  # every step ran once per call
    assert len(graphs.captured) <= graphs.capacity


def test_the_graph_run_now_is_never_the_one_evicted(held):
    """Capacity 1: each new key evicts the last one, never itself; the one that replayed
    last stays held through the next capture (the fixture checks it)."""
    graphs, ran = Graphs(True, capacity=1), []
    for key in "AABBA":
        graphs.run(key, lambda key=key: ran.append(key))
        assert list(graphs.captured) == [key]
    assert ran == list("AABBA") and graphs.replays == 2 and graphs.evictions == 2


def test_a_failed_capture_is_kept_and_retried_only_after_its_eviction(monkeypatch):
    """A key whose capture failed runs eagerly (no new capture) while kept; the notes keep
    the newest MAX_NOTES distinct reasons, however many keys failed."""
    reasons = [f"reason {i % 6}" for i in range(20)]
    attempts = []

    class Failing:
        def __init__(self, graph, pool):
            pass

        def __enter__(self):
            attempts.append(1)
            raise RuntimeError(reasons[(len(attempts) - 1) % len(reasons)])

        def __exit__(self, *args):
            return False

    cuda = types.SimpleNamespace(graph_pool_handle=lambda: "pool", CUDAGraph=object,
                                 graph=Failing, synchronize=lambda: None)
    monkeypatch.setattr(state_module.torch, "cuda", cuda)
    graphs, ran = Graphs(True, capacity=30), []
    for key in range(20):
        graphs.run(key, lambda key=key: ran.append(key))
    graphs.run(3, lambda: ran.append(3))  # kept: eager, no capture attempt
    assert len(attempts) == 20 and ran == [*range(20), 3]
    assert graphs.captured[3] is None and graphs.replays == 0
    newest = list(dict.fromkeys(reversed(reasons)))[:state_module.MAX_NOTES][::-1]
    assert graphs.notes == [f"RuntimeError: {r}" for r in newest]
    graphs.capacity = 1
    graphs.run(20, lambda: None)  # evicts the other 20 keys
    graphs.run(3, lambda: None)  # evicted: its capture is tried again
    assert len(attempts) == 22 and graphs.evictions == 21


@pytest.mark.parametrize("capacity", [0, -1, 2.0, True])
def test_graphs_capacity_is_checked(capacity):
    Graphs(True, capacity=1)  # control
    with pytest.raises(ValueError, match=f"capacity: expected an int >= 1.*got {capacity!r}"):
        Graphs(True, capacity=capacity)


class Cycling(Scripted):
    """A policy that cycles through three options (one with a shadow exit), two rounds each:
    with at most two graphs kept, each option's first round past the first three captures
    its key again (least recently used: evicted), its second replays."""
    SCRIPT = [(1, 2, ()), (1, 2, ()), None, None, (2, 3, (1,)), (2, 3, (1,))]


def test_evictions_mid_call_keep_the_tokens_and_are_counted(generator, capture, monkeypatch):
    """Two graphs kept at most, rounds that change key every time (a ragged batch, three
    options in turn): keys are evicted and captured again within the call, the tokens stay
    autoregressive decoding's, and stats["graph_evictions"] counts each call's evictions."""
    model = random_llama(generator)
    prompts = ragged_prompts(generator)
    kw = dict(max_new_tokens=24, eos_token_id=[])
    with torch.inference_mode():
        expected = lsk.generate(model, prompts, **kw)  # all kept: no eviction (control)
        assert expected.stats["graph_evictions"] == 0 and expected.stats["cuda_graphs"]
        model._decode_state = None
        captured = len(capture.keys)
        monkeypatch.setattr(state_module, "MAX_GRAPHS", 2)
        monkeypatch.setattr(plan_module, "AdaptivePolicy", Cycling)
        calls = [lsk.generate(model, prompts, strategy="self_speculative", exit_layer="auto",
                              **kw) for _ in range(2)]
    graphs = model._decode_state.graphs
    keys = capture.keys[captured:]
    assert graphs.capacity == 2 and len(graphs.captured) == 2
    assert len(keys) > len(set(keys))  # captured again after an eviction
    assert any(len(key) == 5 for key in keys)  # a round with its shadow exit
    assert graphs.evictions == len(keys) - 2  # each capture past the first two evicted one
    for res in calls:
        assert res.tokens == expected.tokens
        assert res.stats["cuda_graphs"] and res.stats["graph_evictions"] > 0
    assert sum(res.stats["graph_evictions"] for res in calls) == graphs.evictions


# ---------------------------------------------------------------- bench/gpu_validate


def dry_run(*args):
    """The parts `bash bench/gpu_validate ARGS --dry-run` lists: [(name, limit)], and the
    total it states, checked to be the limits plus the reserve for the merge."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    out = subprocess.run(["bash", "bench/gpu_validate", *args, "--dry-run"], cwd=ROOT, text=True,
                         capture_output=True, check=True, timeout=60).stdout
    parts = [(name, int(limit)) for name, limit in re.findall(r"^part (\S+) limit (\d+) s",
                                                             out, re.M)]
    reserve = int(re.search(r"^reserve (\d+) s", out, re.M).group(1))
    total = int(re.search(r"^total (\d+) s", out, re.M).group(1))
    assert total == sum(limit for _, limit in parts) + reserve, out
    return parts, total, out


def test_the_one_gpu_call_fits_its_budget():
    """`bash bench/gpu_validate --dry-run` lists the one call's parts, in order, each with its
    limit: the build first, the engine's GPU tests next, and limits that add up to at most
    540 s (the device call's 600 s, less a bare machine's margin), what it leaves out named."""
    parts, total, out = dry_run()
    assert [name for name, _ in parts] == ["build", "engine_tests", "e2e", "roofline",
                                           "kernel_tests"], out
    assert total <= 540 and all(limit > 0 for _, limit in parts), out
    assert re.search(r"^left out: .*test_gpu_llama_heads_match_oracle", out, re.M), out


@pytest.mark.parametrize("args", [["more"], ["build", "suite"]])
def test_the_later_gpu_calls_fit_too(args):
    parts, total, out = dry_run(*args)
    assert total <= 540 and all(limit > 0 for _, limit in parts), out
    if args == ["more"]:
        assert {"gpu_tests_rest", "sanity", "memcheck", "racecheck", "microbench",
                "suite"} <= {name for name, _ in parts}, out


def test_an_unknown_part_is_refused():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    proc = subprocess.run(["bash", "bench/gpu_validate", "e2e", "bogus", "--dry-run"], cwd=ROOT,
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and "got 'bogus'" in proc.stderr
