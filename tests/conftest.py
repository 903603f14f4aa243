"""Shared test settings. Triton kernels run compiled on a GPU and in Triton's CPU interpreter
elsewhere; the interpreter must be chosen before triton is imported (torch does not import it)."""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Real weights and text (../shared/data beside the checkout; LAYERSKIP_TEST_DATA elsewhere, e.g.
# a copy carried to a GPU machine); tests that need them skip when they are absent.
DATA = Path(os.environ.get("LAYERSKIP_TEST_DATA")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")

# One tolerance table per dtype: (atol, rtol) against a float64 oracle.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def pytest_collection_modifyitems(config, items):
    """GPU tests skip here, decided once at collection, never at import of a test module."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    """Our test models are tiny: with 2 busy cores, intra-op threads cost more in waiting than they win."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_device():
    """Where the Triton kernels under test run: the GPU when there is one (compiled), else the
    CPU (interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def stories_path():
    path = DATA / "stories260K.bin"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture
def stories_tokenizer_path():
    path = DATA / "tok512.bin"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path
