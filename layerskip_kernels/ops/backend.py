"""The one place that decides which implementation of an op runs.

Each op lists its backends, fastest first, as `Impl`s: a launcher (its arguments already
checked by the op) and `limits(*args)`, which returns None when the backend can run that call
or else (argument, what the backend needs, what came). The backends:

  "cuda"    csrc/ kernels through layerskip_kernels._C: CUDA tensors, when _C was built
  "cpu"     csrc/cpu/ kernels through layerskip_kernels._cpu: CPU tensors, when _cpu was built
  "triton"  Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)
  "torch"   the PyTorch reference: every device and every shape

How a call picks a backend:
  backend="auto"    on a GPU, the first backend in the op's order that runs there and whose
                    limits take this call (so "torch" when no kernel does); on a CPU, "cpu"
                    when the op has it and its limits take the call, else "torch".
  backend=<name>    that backend; a ValueError naming the argument it cannot take, or naming
                    `backend` when it cannot run on the device at all (no _C, no triton).
  a preference      (a model's backend, `Op.prefer`): that backend when it takes the call,
                    else as "auto". Never raises: "torch" takes every call.
"""
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

from .._ext import cpu_unavailable_reason, cuda_available
from ._checks import check

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available(device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter."""
    return _TRITON_INSTALLED and (device.type == "cuda"
                                  or os.environ.get("TRITON_INTERPRET") == "1")


def _why_not_on(name, device):
    """None when backend `name` can run on `device`, else why not."""
    if name == "torch":
        return None
    if name == "cpu":
        return cpu_unavailable_reason() if device.type == "cpu" else (
            "the cpu backend runs on CPU tensors")
    if name == "triton":
        return None if triton_available(device) else (
            "triton is not installed, or the tensors are on the CPU without TRITON_INTERPRET=1")
    return None if device.type == "cuda" and cuda_available() else (
        "the CUDA extension is not built or no GPU is visible")


@dataclass(frozen=True)
class Impl:
    run: Callable
    limits: Callable | None = None  # (*args) -> None | (argument, expected, actual)

    def why_not(self, args):
        return None if self.limits is None else self.limits(*args)


class Op:
    """One op's backends, fastest first (the reference "torch" last)."""

    def __init__(self, name: str, impls: dict):
        self.name, self.impls = name, impls

    @property
    def backends(self):
        return tuple(self.impls)

    def resolve(self, backend, device, args):
        """The backend name for this call: see the module docstring."""
        if backend == "auto":
            return self._auto(device, args)
        check(backend in self.impls, "backend", f"'auto' or one of {self.backends}",
              repr(backend))
        reason = _why_not_on(backend, device)
        check(not reason, "backend", f"a backend that runs on {device}",
              f"{backend!r}, which cannot: {reason}")
        limit = self.impls[backend].why_not(args)
        if limit:
            arg, expected, actual = limit
            check(False, arg, f"{expected} for backend {backend}", actual)
        return backend

    def prefer(self, preference, device, args):
        """`preference` when it runs this call, else what "auto" picks."""
        impl = self.impls.get(preference)
        if impl and not _why_not_on(preference, device) and not impl.why_not(args):
            return preference
        return self._auto(device, args)

    def _auto(self, device, args):
        if device.type != "cuda":
            cpu = self.impls.get("cpu")
            if cpu and not _why_not_on("cpu", device) and not cpu.why_not(args):
                return "cpu"
            return "torch"
        return next(name for name, impl in self.impls.items()
                    if not _why_not_on(name, device) and not impl.why_not(args))

    def __call__(self, backend, device, args):
        """Run the call on the backend `resolve` picks."""
        return self.impls[self.resolve(backend, device, args)].run(*args)
