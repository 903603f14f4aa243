"""The argument checks of the package: errors name the argument, what was expected and what came."""
import math
import numbers
import operator

import torch


def check(ok: bool, arg: str, expected: str, actual) -> None:
    if not ok:
        raise ValueError(f"{arg}: expected {expected}, got {actual}")


def fail(arg: str, expected: str, actual) -> None:
    """The same error, raised directly (actual shown as its repr) by checks with more logic."""
    raise ValueError(f"{arg}: expected {expected}, got {actual!r}")


def _scalar(value):
    """False for a bool (Python, numpy or torch) and for a tensor with dims: no number here."""
    if torch.is_tensor(value):
        return value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
    return not isinstance(value, bool) and type(value).__name__ not in ("bool", "bool_")  # numpy


def as_int(arg: str, value, low=None, high=None) -> int:
    """value as a Python int in [low, high]: an int, a numpy or torch integer scalar, or a 0-d
    integer tensor. A bool is refused (True would count as 1), and so is a float, even 8.0."""
    try:
        number = operator.index(value) if _scalar(value) else None
    except TypeError:
        number = None
    if number is None or (low is not None and number < low) or (high is not None
                                                                and number > high):
        bounds = ("" if low is None and high is None else f" >= {low}" if high is None
                  else f" <= {high}" if low is None else f" in [{low}, {high}]")
        fail(arg, f"an integer{bounds}", value)
    return number


def as_float(arg: str, value, expected: str, ok=lambda x: True) -> float:
    """value as a finite Python float for which ok(value) holds: a real number, a numpy scalar
    or a 0-d tensor; never a bool, nan or inf. expected: what the error says was expected."""
    number = None
    if _scalar(value) and (torch.is_tensor(value) or isinstance(value, numbers.Real)):
        number = float(value)
    if number is None or not math.isfinite(number) or not ok(number):
        fail(arg, expected, value)
    return number


def overlaps_itself(t) -> bool:
    """True when two indices of t may address one element (an expanded, stride-0 view, say),
    so that a write through it lands twice. Sorted by stride, each dim must step past every
    offset the smaller dims reach: sufficient for distinct addresses, and what every layout
    we write through (contiguous tensors and their slices) satisfies."""
    reach = 0
    for stride, size in sorted((abs(s), n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def share_memory(a, b) -> bool:
    """True when the address ranges of a and b intersect (one written through the other)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def span(t):
        extent = sum(abs(s) * (n - 1) for s, n in zip(t.stride(), t.shape)) + 1
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1
