"""The compiled CUDA extension `_C`, if this install built one, and when it can run.

`_C` is torch-free pybind11 (see setup.py): kernels take data_ptr() integers, shapes,
a dtype code from DTYPE_CODES and a cudaStream_t as an integer.
"""
import torch

try:
    from . import _C
except ImportError:  # pure-Python install: no nvcc, or LAYERSKIP_BUILD_CUDA=0
    _C = None

try:
    from . import _cpu
except ImportError:  # built without the CPU kernels (no pybind11 at build time)
    _cpu = None

# Keep in sync with lsk::DType in csrc/common.cuh.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cuda_unavailable_reason():
    """None when the CUDA backend can run, else a sentence saying why not."""
    if _C is None:
        return "layerskip_kernels._C is not built (no nvcc at install time, or LAYERSKIP_BUILD_CUDA=0)"
    if _C.device_count() == 0:
        return "no CUDA device or driver is visible to layerskip_kernels._C"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (CPU-only torch?)"
    return None


def cuda_available() -> bool:
    return cuda_unavailable_reason() is None


def cpu_unavailable_reason():
    """None when the "cpu" backend (layerskip_kernels._cpu) can run, else why not."""
    return None if _cpu is not None else (
        "layerskip_kernels._cpu is not built (setup.py build_ext; needs pybind11)")
