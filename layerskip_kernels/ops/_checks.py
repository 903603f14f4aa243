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
