"""Every file the package writes goes through here: `bench` and `sweep` reports, `eval-exits`
plots, `train` checkpoints and save_hf_directory's exports.

The rules, in one place:
- A path that already exists must be a regular file, not a symlink: the rename that replaces
  it would otherwise replace whatever the name holds (a device node such as /dev/full, a FIFO,
  a directory, or the link itself instead of the file it points to). --overwrite never lifts
  this.
- Before any work, the directory must accept a new file: checked by creating and removing a
  probe file in it, since os.access says yes to root on /proc or a read-only mount's parent.
- A missing parent directory is created, with its own missing parents, at the first write
  (never by a check, so a refused run leaves nothing on disk).
- A write goes to a temporary file beside the target (same filesystem), renamed onto it only
  when complete: a failed or interrupted write leaves the old file or the whole new one.

A refusal is an OutputPathError (a ValueError, exit status 2 on the command line): one line
naming the argument, the path and what is wrong with it.
"""
import os
import secrets
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path


class OutputPathError(ValueError):
    """An output path the rules above refuse."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def kind(path):
    """What the name path holds, not following a final symlink: None (nothing), "a regular
    file", "a directory", "a symlink", "a dangling symlink", "a FIFO", "a character device"..."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # the latter: a parent is a file
        return None
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISLNK(mode) and not os.path.exists(path):
        return "a dangling symlink"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_replaceable(path, what="path"):
    """Refuse a name that exists and is no regular file (the module's first rule), e.g. for
    every file of a set before the first is written."""
    found = kind(path)
    if found not in (None, "a regular file"):
        raise OutputPathError(f"{what} {path}: {found}, expected a regular file or a new path "
                              "(it would be replaced)")


def check_output_file(path, what, overwrite=False):
    """An output file, before any work: a new path or (with overwrite) a regular file, in a
    directory that accepts new files or can be created. what names it in errors (--output)."""
    path = Path(path)
    if kind(path) == "a directory":
        raise OutputPathError(f"{what} {path}: is a directory, expected a file path")
    check_replaceable(path, what)
    if path.exists() and not overwrite:
        raise OutputPathError(f"{what} {path}: the file exists (pass --overwrite to replace it)")
    _check_writable(path.parent, what, path)


def check_output_dir(path, what, files=(), overwrite=False):
    """An output directory, before any work: a directory (a symlink to one is fine: what is
    written goes inside it) or a new path; each of `files` in it a new path or a regular file,
    and an existing one only with overwrite; the directory accepts new files."""
    path = Path(path)
    found = kind(path)
    if found is not None and not path.is_dir():
        raise OutputPathError(f"{what} {path}: {'is a file' if path.is_file() else found}, "
                              "expected a directory")
    for name in files:
        check_replaceable(path / name, what)
    existing = [name for name in files if (path / name).exists()]
    if existing and not overwrite:
        raise OutputPathError(f"{what} {path}: already holds {', '.join(existing)} "
                              "(pass --overwrite to replace)")
    _check_writable(path, what, path)


def _check_writable(directory, what, path):
    """The directory, or its nearest existing ancestor when it is to be created, accepts a new
    file: a probe file is created there and removed."""
    existing = Path(directory)
    while kind(existing) is None and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{what} {path}: {existing} is not a writable directory "
                              f"({kind(existing)})")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".layerskip-probe-")
    except OSError as error:
        raise OutputPathError(f"{what} {path}: {existing} is not a writable directory "
                              f"({error.strerror})") from None
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_path(path, what="path"):
    """The one way the package writes a file: a new temporary path beside `path` to write to
    (missing parent directories created first), renamed onto `path` when the block ends without
    error, removed otherwise. The temporary name keeps the suffix (matplotlib picks the format
    from it). A `path` that exists and is no regular file is refused, here as in the checks."""
    path = Path(path)
    check_replaceable(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # ours, not a link
    try:
        yield tmp
        check_replaceable(path, what)  # again: the block may have run for hours
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text, what="path"):
    """Write text to path through atomic_path."""
    with atomic_path(path, what) as tmp:
        tmp.write_text(text)


def write_bytes(path, data, what="path"):
    """Write bytes to path through atomic_path."""
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)
