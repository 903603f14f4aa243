"""One argument-check helper for every op: errors name the argument, what was expected and what came."""


def check(ok: bool, arg: str, expected: str, actual) -> None:
    if not ok:
        raise ValueError(f"{arg}: expected {expected}, got {actual}")
