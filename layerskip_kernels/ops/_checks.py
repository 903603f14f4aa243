"""The argument checks of the package: errors name the argument, what was expected and what came."""


def check(ok: bool, arg: str, expected: str, actual) -> None:
    if not ok:
        raise ValueError(f"{arg}: expected {expected}, got {actual}")


def fail(arg: str, expected: str, actual) -> None:
    """The same error, raised directly (actual shown as its repr) by checks with more logic."""
    raise ValueError(f"{arg}: expected {expected}, got {actual!r}")
