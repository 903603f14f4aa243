"""Writers never clobber (layerskip_kernels/files.py): every output of bench, sweep, eval-exits,
train and save_hf_directory refuses a name that exists and is no regular file (a device node,
a FIFO, a directory, a symlink), with or without --overwrite, and a directory that cannot take
a new file, before any work; nothing on disk is touched by a refusal. Device nodes are never
used as targets: a symlink to one stands in (the rename would replace the link)."""
import json
import os
import stat

import pytest
from test_cli import TINY, assert_error, run, tiny  # noqa: F401 (tiny is a fixture)
from test_hostile_inputs import no_hang  # noqa: F401 (a fixture)

import layerskip_kernels as lsk
from layerskip_kernels import cli_checks, files
from layerskip_kernels.model import save_hf_directory
from layerskip_kernels.training import new_model

HOSTILE = ("fifo", "dangling symlink", "symlink to a device", "symlink to a file", "directory")
KIND_NAMED = {"fifo": "a FIFO", "dangling symlink": "a dangling symlink",
              "symlink to a device": "a symlink", "symlink to a file": "a symlink",
              "directory": "directory"}


def make(path, kind):
    """Put a `kind` of HOSTILE at path (what a writer must refuse to replace)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling symlink":
        os.symlink(path.parent / "absent", path)
    elif kind == "symlink to a device":
        os.symlink("/dev/null", path)
    elif kind == "symlink to a file":
        (path.parent / "real.json").write_text("{}")
        os.symlink(path.parent / "real.json", path)
    else:
        path.mkdir()
        (path / "inside").write_text("kept")
    return path


def snapshot(root):
    """Every name under root with its type, link target and contents: what a refusal must
    leave as it was (a FIFO is never opened)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            seen[path] = (stat.S_IFMT(mode), os.readlink(path) if stat.S_ISLNK(mode) else None,
                          open(path, "rb").read() if stat.S_ISREG(mode) else None)
    return seen


@pytest.fixture
def no_load(monkeypatch):
    """Refusals come before any work: loading the model fails the test."""
    def load(*args, **kwargs):
        raise AssertionError("the model loaded: the output was not checked before the work")
    monkeypatch.setattr(cli_checks, "load_model", load)


@pytest.mark.parametrize("kind", HOSTILE)
def test_bench_output_that_is_no_regular_file(capsys, tmp_path, no_load, no_hang, kind):
    target = make(tmp_path / "report.json", kind)
    before = snapshot(tmp_path)
    assert_error(run(capsys, "bench", "--output", target, "--overwrite", "--no-transformers"),
                 2, f"--output {target}", KIND_NAMED[kind])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", HOSTILE)
def test_eval_exits_plot_that_is_no_regular_file(capsys, tmp_path, no_load, no_hang, kind):
    data = tmp_path / "held_out.txt"
    data.write_text("some text\n")
    target = make(tmp_path / "plot.png", kind)
    before = snapshot(tmp_path)
    assert_error(run(capsys, "eval-exits", "--model", tmp_path, "--data", data, "--plot",
                     target, "--overwrite"), 2, f"--plot {target}", KIND_NAMED[kind])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", [k for k in HOSTILE if k != "directory"])
@pytest.mark.parametrize("name", ["sweep.json", "sweep.csv", "sweep_heatmap.png"])
def test_sweep_file_that_is_no_regular_file(capsys, tmp_path, no_load, no_hang, kind, name):
    make(tmp_path / name, kind)
    before = snapshot(tmp_path)
    assert_error(run(capsys, "sweep", "--output", tmp_path, "--overwrite"), 2,
                 f"--output {tmp_path / name}", KIND_NAMED[kind])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "dangling symlink", "symlink to a device"])
def test_sweep_directory_that_is_no_directory(capsys, tmp_path, no_load, no_hang, kind):
    target = make(tmp_path / "out", kind)
    before = snapshot(tmp_path)
    assert_error(run(capsys, "sweep", "--output", target), 2, f"--output {target}",
                 KIND_NAMED[kind], "expected a directory")
    assert snapshot(tmp_path) == before


def train_config(tmp_path, output):
    (tmp_path / "text.txt").write_text("hello\n")
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"data": str(tmp_path / "text.txt"), "steps": 1,
                                  "output": str(output), "model_config": TINY}))
    return config


@pytest.mark.parametrize("name", ["trainer_state.json", "trainer_state.safetensors",
                                  "config.json", "model.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("kind", ["fifo", "dangling symlink", "symlink to a device"])
def test_train_checkpoint_file_that_is_no_regular_file(capsys, tmp_path, monkeypatch, no_hang,
                                                       name, kind):
    """A FIFO trainer_state.json would hang the resume; any of them would be replaced."""
    from layerskip_kernels.training import trainer

    def no_training(*args, **kwargs):
        raise AssertionError("trained: the output was not checked before the work")
    monkeypatch.setattr(trainer, "run_training", no_training)
    (tmp_path / "run").mkdir()
    make(tmp_path / "run" / name, kind)
    config = train_config(tmp_path, tmp_path / "run")
    before = snapshot(tmp_path)
    assert_error(run(capsys, "train", "--config", config, "--overwrite"), 2,
                 f"--output {tmp_path / 'run' / name}", KIND_NAMED[kind])
    assert snapshot(tmp_path) == before


def test_export_refuses_before_writing_either_file(tmp_path, no_hang):
    model = new_model(TINY, seed=0)
    out = tmp_path / "export"
    out.mkdir()
    os.mkfifo(out / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: a FIFO"):
        save_hf_directory(model, out)
    assert sorted(os.listdir(out)) == ["model.safetensors"]  # config.json not written either
    os.unlink(out / "model.safetensors")
    save_hf_directory(model, out)  # the control
    assert lsk.load_model(out).config.n_layers == TINY["n_layers"]


@pytest.mark.parametrize("argv", [
    ["bench", "--output", "/proc/x.json", "--no-transformers"],
    ["bench", "--output", "/proc/new/dir/x.json", "--no-transformers"],
    ["sweep", "--output", "/proc/sweep"],
    ["eval-exits", "--model", "m", "--data", "DATA", "--plot", "/proc/plot.png"]])
def test_unwritable_directory_refused_before_work(capsys, tmp_path, no_load, argv):
    """os.access says root may write to /proc: the probe file says otherwise."""
    data = tmp_path / "held_out.txt"
    data.write_text("text\n")
    argv = [str(data) if a == "DATA" else a for a in argv]
    line = assert_error(run(capsys, *argv), 2, "/proc", "not a writable directory")
    assert "Errno" not in line


def test_train_output_in_an_unwritable_directory(capsys, tmp_path, monkeypatch):
    from layerskip_kernels.training import trainer
    monkeypatch.setattr(trainer, "run_training", lambda *a, **k: pytest.fail("trained"))
    assert_error(run(capsys, "train", "--config", train_config(tmp_path, "/proc/run")), 2,
                 "--output /proc/run", "not a writable directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_directory(capsys, tmp_path, no_load):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert_error(run(capsys, "bench", "--output", locked / "x.json", "--no-transformers"), 2,
                 f"--output {locked / 'x.json'}", "not a writable directory")


# -- the helper itself -------------------------------------------------------------------------

def test_checks_leave_nothing_and_missing_directories_come_at_the_first_write(tmp_path):
    target = tmp_path / "a" / "b" / "report.json"
    files.check_output_file(target, "--output")
    files.check_output_dir(tmp_path / "c", "--output", ["x.csv"])
    assert os.listdir(tmp_path) == []  # the probe file is gone; no directory made yet
    files.write_text(target, "whole")
    assert target.read_text() == "whole" and os.listdir(target.parent) == ["report.json"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("stopped")
    assert list(tmp_path.iterdir()) == []
    files.write_text(target, "whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_a_target_that_turns_special_during_the_write_is_kept(tmp_path, no_hang):
    """The rule holds at the rename too: a run may take hours after its checks."""
    target = tmp_path / "out.json"
    with pytest.raises(files.OutputPathError, match="a FIFO"):
        with files.atomic_path(target, "--output") as tmp:
            tmp.write_text("new")
            os.mkfifo(target)
    assert stat.S_ISFIFO(os.lstat(target).st_mode) and os.listdir(tmp_path) == ["out.json"]


def test_existing_regular_file_needs_overwrite(tmp_path):
    target = tmp_path / "old.json"
    target.write_text("{}")
    with pytest.raises(files.OutputPathError, match="--overwrite"):
        files.check_output_file(target, "--output")
    files.check_output_file(target, "--output", overwrite=True)
    files.write_text(target, "new")
    assert target.read_text() == "new"
