"""The one place that decides which implementation of an op runs."""
import functools
import importlib.util
import os

from .._ext import cuda_available
from ._checks import check

PREFERENCE = ("cuda", "triton", "torch")  # fastest first, for backend="auto" on a GPU


def triton_available(device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _usable(name, device) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        return triton_available(device)
    return device.type == "cuda" and cuda_available()


def resolve_backend(backend, device, available) -> str:
    """'auto' is cuda > triton > torch on a GPU and torch on a CPU; a named backend must run."""
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        return next(name for name in PREFERENCE if name in available and _usable(name, device))
    check(backend in available, "backend", f"'auto' or one of {available}", repr(backend))
    if not _usable(backend, device):
        why = {"triton": "triton is not installed, or the tensors are on the CPU without "
                         "TRITON_INTERPRET=1",
               "cuda": "the CUDA extension is not built or no GPU is visible"}[backend]
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {why}")
    return backend


def bind(op, reference, available, backend, device):
    """What a trusted caller (the model, on tensors it built) calls many times: the reference
    without per-call checks on the torch backend, else the checked op on the resolved one."""
    name = resolve_backend(backend, device, available)
    return reference if name == "torch" else functools.partial(op, backend=name)
