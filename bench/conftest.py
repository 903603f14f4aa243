"""Shared settings of the microbenchmarks (bench/bench_<op>.py, pytest-benchmark).

    python -m pytest bench -k cpu --benchmark-disable -q     # quick mode: every op's CPU case
    python -m pytest bench -k gpu --benchmark-json=out.json  # the GPU grids
    python bench/routing.py                                  # the GPU grids + routing table

- bench_*.py files are collected here (pyproject's python_files only names test_*.py).
- GPU cases (marked gpu, or named test_gpu*) skip without a GPU, decided at collection.
- Every benchmark's extra_info gets the device, torch and triton versions; on a GPU also the
  HBM bandwidth measured once per session (a large device-to-device copy, bytes read plus
  written) and pct_of_hbm, the kernel's GB/s as a share of it.
- The JSON's machine_info gets the same, plus the commit.

Kernel time (``measure``; what routing decides on): the GPU time of the launches alone, never
the Python around them.
- Inputs rotate: ``inputs()`` makes fresh copies of the arguments until they span
  ROTATE_L2_MULTIPLE x the L2 size, and a CUDA graph replays N calls back to back over the
  copies, so each call reads its inputs from HBM, as a decode step whose weights were evicted
  by the layers before it does. kernel_us = replay time / N (median of REPLAYS replays).
- Inputs too small for that (or no ``inputs``): each call is one graph replay between CUDA
  events, after a read of a buffer of ROTATE_L2_MULTIPLE x L2 that evicts L2 (the events
  bracket the call alone: the host enqueues them while the eviction read runs).
- A function that cannot be captured (a host sync) runs eagerly in the same two schemes, and
  extra_info["timing"] says so (host gaps may then count).
Host time (host_us): pytest-benchmark's median with a sync inside every timed call, the
latency an eager caller sees; gb_per_s and pct_of_hbm are from kernel time, host_gb_per_s
from host time. On a CPU both are the host clock.
"""
import importlib.util
import math
import platform
import statistics
import time

import pytest
import torch

from roofline import measure_hbm_bandwidth  # bench/ is on sys.path: this conftest lives there

ROTATE_L2_MULTIPLE = 2  # input copies (or the eviction read) span this many L2 sizes
MAX_COPIES = 128
COPY_BUDGET = 2 << 30  # bytes of input copies one case may allocate
TARGET_S = 0.02  # GPU seconds of one replay (rotate) or of all timed calls (flush)
REPLAYS = 5
MAX_CALLS = 1000


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):  # named on the command line: pytest's own
        return pytest.Module.from_parent(parent, path=file_path)


def _is_gpu_case(item):
    return "gpu" in item.keywords or item.name.startswith("test_gpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.path.name.startswith("bench_") and _is_gpu_case(item):
            item.add_marker(skip)


def _version(module):
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(__import__(module), "__version__", None)


_bandwidth = {}


def hbm_bandwidth():
    """GB/s of the current GPU, measured on first use and cached for the session."""
    if "gb_per_s" not in _bandwidth:
        _bandwidth["gb_per_s"] = measure_hbm_bandwidth() if torch.cuda.is_available() else None
    return _bandwidth["gb_per_s"]


@pytest.fixture(scope="session")
def device_info():
    return {"device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                       else platform.processor() or platform.machine()),
            "torch": torch.__version__, "triton": _version("triton")}


@pytest.fixture(autouse=True)
def _record_device(request, device_info):
    """Device and versions into every benchmark's extra_info; % of HBM after a GPU case."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    benchmark.extra_info.update(device_info)
    gpu = _is_gpu_case(request.node) and torch.cuda.is_available()
    if gpu:
        benchmark.extra_info["hbm_gb_per_s"] = hbm_bandwidth()
    yield
    achieved = benchmark.extra_info.get("gb_per_s")
    if gpu and achieved:
        benchmark.extra_info["pct_of_hbm"] = 100 * achieved / hbm_bandwidth()


def pytest_benchmark_update_machine_info(config, machine_info):
    from layerskip_kernels.benchmark import machine_info as layerskip_machine_info
    machine_info.update(layerskip=layerskip_machine_info(), triton=_version("triton"),
                        hbm_gb_per_s=hbm_bandwidth())


# ---------------------------------------------------------------- kernel time
def tensor_bytes(obj):
    """Bytes of the tensors in a (nested) tuple / list / dict of arguments."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x) for x in obj)
    return 0


def _capture(fn):
    """A CUDA graph of fn (warmed up on a side stream first), or (None, why not)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # a host sync, an uncapturable op: time it eagerly
        torch.cuda.synchronize()
        return None, f"{type(error).__name__}: {str(error)[:120]}"
    return graph, None


def _events_ms(fn, before=None):
    """GPU milliseconds between two events around fn(), `before()` enqueued ahead of them."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if before is not None:
        before()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def plan(set_bytes, l2_bytes, rotatable):
    """(copies of the inputs, rotate?): copies until they span ROTATE_L2_MULTIPLE L2 sizes,
    within MAX_COPIES and COPY_BUDGET; rotate when they do, else evict L2 before each call."""
    span = ROTATE_L2_MULTIPLE * l2_bytes
    copies = 1
    if rotatable:
        copies = max(1, min(MAX_COPIES, math.ceil(span / set_bytes), COPY_BUDGET // set_bytes))
    return copies, copies * set_bytes >= span


def rotate_calls(copies, estimate_s):
    """Calls in one replay: a multiple of copies lasting about TARGET_S, at most MAX_CALLS."""
    calls = copies * max(1, math.ceil(TARGET_S / max(estimate_s * copies, 1e-7)))
    return max(copies, min(calls, MAX_CALLS - MAX_CALLS % copies))


def evict_calls(estimate_s, evict_s):
    """Timed calls (each after an L2 eviction): about TARGET_S of them, 10 to 100."""
    return max(10, min(100, math.ceil(TARGET_S / max(estimate_s + evict_s, 1e-7))))


def kernel_time(call, inputs=None, args=()):
    """Kernel µs of call(args) on the GPU (see the module docstring) and how it was timed.

    call(args_tuple) runs the op once; inputs() makes a fresh argument tuple (new buffers);
    args: the tuple already made (and warmed up: compiled) by the caller."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 0) or 50 << 20
    copies, rotate = plan(max(tensor_bytes(args), 1), l2, inputs is not None)
    sets = [args] + [tuple(inputs()) for _ in range(copies - 1)]
    estimate = min(_events_ms(lambda a=a: call(a)) for a in sets[:3]) / 1e3  # seconds
    info = {"l2_bytes": l2, "input_copies": copies}
    if rotate:  # every call reads its inputs from HBM
        calls = rotate_calls(copies, estimate)

        def run():
            for i in range(calls):
                call(sets[i % copies])
        graph, why = _capture(run)
        replay = graph.replay if graph is not None else run
        replay()
        times = [_events_ms(replay) / calls for _ in range(REPLAYS)]
        info.update(calls=calls, timing=f"{'graph' if graph else 'eager'} of {calls} calls "
                                         f"over {copies} rotating input sets")
    else:  # evict L2 before each call
        evict = torch.empty(ROTATE_L2_MULTIPLE * l2, dtype=torch.uint8, device="cuda")
        evict_read = lambda: evict.max()  # noqa: E731 - a read: no dirty lines to write back
        graph, why = _capture(lambda: call(args))
        replay = graph.replay if graph is not None else (lambda: call(args))
        calls = evict_calls(estimate, _events_ms(evict_read) / 1e3)
        times = [_events_ms(replay, before=evict_read) for _ in range(calls)]
        info.update(calls=calls, timing=f"{'graph' if graph else 'eager'} replay per call, "
                                        f"L2 evicted before each")
        del evict
    if why:
        info["capture_failed"] = why
    del sets
    return statistics.median(times) * 1e3, info


def _host_seconds(fn, reps=3):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.fixture
def measure(benchmark):
    """measure(fn, nbytes, inputs=None, first=None, **info): kernel time and host time of fn.

    fn(*args) runs the op once on args = inputs() (a fresh tuple of argument tensors per call:
    new buffers of the same shapes), or fn() when inputs is None (no rotation: L2 is evicted
    instead); first: a tuple inputs() already made, used as the first copy (no second one of
    a large set). nbytes: the bytes the op must move (what GB/s counts). Records into extra_info:
    info, bytes, kernel_us, gb_per_s (kernel), host_us, host_gb_per_s, and on a GPU how the
    kernel was timed (timing, calls, input_copies, l2_bytes)."""
    def run(fn, nbytes, inputs=None, first=None, **info):
        args = tuple(first) if first is not None else tuple(inputs()) if inputs else ()
        on_gpu = torch.cuda.is_available() and (
            inputs is None or any(torch.is_tensor(t) and t.is_cuda for t in args))
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        call = lambda a: fn(*a)  # noqa: E731

        def timed():
            call(args)
            sync()

        timed()  # warm-up: compiles, fills caches
        benchmark(timed)
        stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
        host_s = stats.stats.median if stats else _host_seconds(timed)
        timing = {"timing": "host clock (cpu)"}
        kernel_s = host_s
        if on_gpu:
            kernel_us, timing = kernel_time(call, inputs, args)
            kernel_s = kernel_us / 1e6
        benchmark.extra_info.update(
            info, bytes=nbytes, kernel_us=kernel_s * 1e6, gb_per_s=nbytes / kernel_s / 1e9,
            host_us=host_s * 1e6, host_gb_per_s=nbytes / host_s / 1e9, **timing)
    return run


@pytest.fixture
def bench_generator():
    """Seeded inputs for benchmarks that want them (house rule 8: seeds from fixtures)."""
    return torch.Generator().manual_seed(1234)
