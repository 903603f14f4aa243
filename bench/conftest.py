"""Shared settings of the microbenchmarks (bench/bench_<op>.py, pytest-benchmark).

    python -m pytest bench -k cpu --benchmark-disable -q     # quick mode: every op's CPU case
    python -m pytest bench -k gpu --benchmark-json=out.json  # the GPU grids

- bench_*.py files are collected here (pyproject's python_files only names test_*.py).
- GPU cases (marked gpu, or named test_gpu*) skip without a GPU, decided at collection.
- Every benchmark's extra_info gets the device, torch and triton versions; on a GPU also the
  HBM bandwidth measured once per session (a large device-to-device copy, bytes read plus
  written) and, when the benchmark recorded gb_per_s, pct_of_hbm.
- The JSON's machine_info gets the same, plus the commit.
"""
import importlib.util
import platform

import pytest
import torch

from roofline import measure_hbm_bandwidth  # bench/ is on sys.path: this conftest lives there


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


@pytest.fixture
def measure(benchmark):
    """measure(fn, nbytes, **info): time fn, synchronising inside the timed call, after one
    warm-up call (compiles, caches); record info, the bytes fn moves and GB/s."""
    def run(fn, nbytes, **info):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def timed():
            fn()
            sync()

        timed()
        benchmark(timed)
        stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
        seconds = stats.stats.median if stats else None
        benchmark.extra_info.update(info, bytes=nbytes,
                                    gb_per_s=nbytes / seconds / 1e9 if seconds else None)
    return run


@pytest.fixture
def bench_generator():
    """Seeded inputs for benchmarks that want them (house rule 8: seeds from fixtures)."""
    return torch.Generator().manual_seed(1234)
