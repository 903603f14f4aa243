"""The `layerskip` command, run in-process through cli.main: every error is one `error: ...`
line on stderr naming the argument or file, with exit status 2 (bad command line), 1 (the run
failed) or 130 (interrupted), checked before the expensive work; outputs are written
atomically, and interrupted benchmarks keep the repetitions that finished."""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layerskip_kernels as lsk
from layerskip_kernels import benchmark, cli, cli_checks
from layerskip_kernels.model import save_hf_directory
from layerskip_kernels.model.checkpoint import DEFAULT_MODEL
from layerskip_kernels.training import TrainConfig, new_model

from conftest import DATA  # noqa: E402
from test_hostile_inputs import no_hang  # noqa: E402, F401 (a fixture)
TINY = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=48,
            max_seq_len=32)
BIG_TOKENIZER = DEFAULT_MODEL / "tokenizer.json"  # 2048 tokens, more than TINY's 64
STORY_END = ("Once upon a time, there was a little dog named Max. Max liked to run. One day, Max "
             "ran to the park and saw a big tree. He played under the tree all day. Then he went "
             "home and slept. The end.")  # stories260K's next token is BOS: the story is over


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer random Llama (vocab 64, max_seq_len 32) with no LayerSkip recommendation."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_hf_directory(new_model(TINY, seed=0), path)
    return str(path)


def run(capsys, *argv):
    """cli.main(argv): (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result, code, *needles):
    """Exit status `code` and exactly one stderr line, `error: ...`, holding every needle."""
    status, _, err = result
    lines = err.strip().splitlines()
    assert status == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- the command itself ------------------------------------------------------------------------

def test_no_arguments_prints_the_help(capsys):
    code, out, err = run(capsys)
    assert code == 0 and out.startswith("usage: layerskip") and "generate" in out
    assert "exit status" in out.lower() and not err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"layerskip {lsk.__version__}\n"
    assert lsk.__version__ == importlib.metadata.version("layerskip-kernels")


def test_help_shows_defaults(capsys):
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0
    for default in ("(default: 128)", "(default: autoregressive)", "(default: 0.0)",
                    "(default: float32)", "(default: cpu)"):
        assert default in out
    code, out, _ = run(capsys, "bench", "--help")
    assert "(default: 5)" in out and "interrupted run keeps" in out


def test_python_dash_m_gives_one_line_and_status_2():
    proc = subprocess.run([sys.executable, "-m", "layerskip_kernels", "generate", "--prompt-ids",
                           "1", "--top-k", "3"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: --top-k") and not proc.stdout


# -- one line per error, the argument named ----------------------------------------------------

def test_truncated_safetensors(capsys, tiny, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((Path(tiny) / "config.json").read_text())
    weights = (Path(tiny) / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    assert_error(run(capsys, "info", "--model", broken), 1, "--model", str(broken))


@pytest.mark.parametrize("argv, needle", [
    (["--model", "{tmp}/absent"], "--model"),
    (["--model", "{tiny}", "--tokenizer", "{tmp}/bad.json", "--prompt", "hi"], "--tokenizer"),
])
def test_unreadable_files(capsys, tiny, tmp_path, argv, needle):
    (tmp_path / "bad.json").write_text("not json")
    argv = [a.format(tmp=tmp_path, tiny=tiny) for a in argv]
    assert_error(run(capsys, "generate", "--prompt-ids", "1", *argv), 1, needle)


@pytest.mark.parametrize("argv, needle", [
    (["--device", "nonsense"], "--device"),
    (["--dtype", "bf17"], "--dtype"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--strategy", "layer_skip", "--speedup", "inf"], "--speedup"),
    *[(["--temperature", "1", "--seed", seed], "--seed") for seed in ("-1", "1.5", str(2**64))],
    (["--temperature", "1", "--top-p", "1.5"], "--top-p"),
    (["--num-speculations", "0", "--strategy", "self_speculative"], "--num-speculations"),
    (["--eos-token-id", "x"], "--eos-token-id"),
    (["--eos-token-id", "none", "--eos-token-id", "3"], "--eos-token-id"),
    (["--prompt-ids", "1 x"], "--prompt-ids"),
    (["--strategy", "nope"], "--strategy"),
    (["--bogus"], "--bogus"),
])
def test_bad_values_are_usage_errors(capsys, tiny, argv, needle):
    assert_error(run(capsys, "generate", "--model", tiny, "--prompt-ids", "1", *argv), 2, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_cuda_on_a_cpu_only_torch(capsys, tiny):
    for command in (["generate", "--prompt-ids", "1"], ["info"], ["compare"]):
        assert_error(run(capsys, *command, "--model", tiny, "--device", "cuda"), 2,
                     "--device", "no usable CUDA device")


@pytest.mark.parametrize("argv, needle", [
    (["--num-speculations", "3"], "--num-speculations"),
    (["--exit-layer", "2"], "--exit-layer"),
    (["--strategy", "early_exit", "--speedup", "1.5"], "--speedup"),
    (["--strategy", "self_speculative", "--draft", "layer_skip", "--speedup", "1.5",
      "--exit-layer", "2"], "--exit-layer"),
    (["--draft", "layer_skip"], "--draft"),
    (["--strategy", "layer_skip"], "--speedup"),
    (["--top-k", "3"], "--top-k"),
    (["--top-p", "0.9"], "--top-p"),
    (["--seed", "1"], "--seed"),
    (["--top-k", "0"], "--top-k"),  # a flag given is a flag used, even at its neutral value
    (["--stream", "--json"], "--stream"),
])
def test_flags_that_cannot_apply(capsys, argv, needle, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("checked before the model loads")
    monkeypatch.setattr(cli_checks, "load_model", no_load)
    assert_error(run(capsys, "generate", "--prompt-ids", "1", *argv), 2, needle)


def test_early_exit_without_an_exit_layer(capsys, tiny):
    assert_error(run(capsys, "generate", "--model", tiny, "--prompt-ids", "1",
                     "--strategy", "early_exit"), 2, "--exit-layer", "[1, 3]")
    assert_error(run(capsys, "generate", "--model", tiny, "--prompt-ids", "1",
                     "--strategy", "early_exit", "--exit-layer", "4"), 2, "--exit-layer", "4")


def test_tokenizer_larger_than_the_model(capsys, tiny):
    line = assert_error(run(capsys, "generate", "--model", tiny, "--tokenizer", BIG_TOKENIZER,
                            "--prompt", "hi"), 2, "--tokenizer", "2048", "64")
    assert str(BIG_TOKENIZER) in line


def small_tokenizer(path, size):
    """A tokenizer.json of `size` word-level tokens, <s> and </s> among them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<s>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_tokenizer_smaller_than_the_model(capsys, tiny, tmp_path, monkeypatch, command):
    """The model could emit ids the tokenizer cannot decode: refused before decoding (2), not
    after it (1)."""
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the tokenizer was checked")
    monkeypatch.setattr(cli, "generate", no_decoding)
    monkeypatch.setattr(cli, "compare", no_decoding)
    tok = small_tokenizer(tmp_path / "tokenizer.json", 40)
    assert_error(run(capsys, command, "--model", tiny, "--tokenizer", tok, "--prompt", "w2",
                     "--max-new-tokens", "2"), 2, f"--tokenizer {tok}", "40", "64", "smaller")


def test_tokenizer_as_large_as_the_model(capsys, tiny, tmp_path):
    tok = small_tokenizer(tmp_path / "tokenizer.json", TINY["vocab_size"])
    code, out, err = run(capsys, "generate", "--model", tiny, "--tokenizer", tok, "--prompt",
                         "w2 w3", "--max-new-tokens", "2")
    assert code == 0, err


@pytest.mark.parametrize("argv, needles", [
    (["--prompt-ids", "1 64"], ("--prompt-ids", "[0, 64)", "64")),
    (["--prompt-ids", "1", "--prompt-ids", " ".join(["1"] * 33)], ("--prompt-ids 2", "32")),
    (["--prompt-ids", " ".join(["1"] * 32)], ("--prompt-ids", "no room")),
    (["--prompt-ids", "1 2", "--max-new-tokens", "31"], ("--max-new-tokens", "at most 30")),
    (["--prompt-ids", "1 2", "--max-new-tokens", "26", "--strategy", "self_speculative"],
     ("--max-new-tokens", "at most 25", "5 draft slots")),
    (["--prompt-ids", "1", "--max-new-tokens", "4", "--eos-token-id", "64"], ("--eos-token-id",)),
])
def test_prompts_the_model_cannot_take(capsys, tiny, argv, needles):
    assert_error(run(capsys, "generate", "--model", tiny, *argv), 2, *needles)


def test_over_long_llama2c_prompt(capsys, stories_path, stories_tokenizer_path):
    assert_error(run(capsys, "generate", "--model", stories_path, "--tokenizer",
                     stories_tokenizer_path, "--prompt", "the cat sat. " * 90),
                 2, "--prompt", "max_seq_len (512)")


def test_prompt_text_needs_a_tokenizer(capsys, stories_path):
    assert_error(run(capsys, "generate", "--model", stories_path, "--prompt", "hi"),
                 2, "--prompt", "--tokenizer")


@pytest.mark.parametrize("error", [KeyError("weights"), ZeroDivisionError("float division"),
                                   IndexError("list index"), TypeError("bad operand"),
                                   RuntimeError("CUDA out of memory.\nTried to allocate"),
                                   OSError(28, "No space left on device")])
def test_unexpected_errors_are_one_line(capsys, tiny, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(cli, "generate", fail)
    line = assert_error(run(capsys, "generate", "--model", tiny, "--prompt-ids", "1",
                            "--max-new-tokens", "2"), 1)
    assert str(error.args[-1]).split("\n")[0] in line


def test_debug_shows_the_traceback(capsys, tiny, monkeypatch):
    def fail(*args, **kwargs):
        raise ZeroDivisionError("float division by zero")
    monkeypatch.setattr(cli, "generate", fail)
    code, _, err = run(capsys, "generate", "--debug", "--model", tiny, "--prompt-ids", "1",
                       "--max-new-tokens", "2")
    assert code == 1 and "Traceback" in err
    assert err.strip().splitlines()[-1] == "error: ZeroDivisionError: float division by zero"


def test_interrupt(capsys, tiny, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "generate", interrupt)
    assert_error(run(capsys, "generate", "--model", tiny, "--prompt-ids", "1",
                     "--max-new-tokens", "2"), 130, "interrupted")


def test_library_errors_name_the_flag(capsys, tiny, monkeypatch):
    """A ValueError naming a generate() argument is reported as its flag, status 2."""
    def fail(*args, **kwargs):
        raise ValueError("top_p: expected a value in (0, 1], got 2")
    monkeypatch.setattr(cli, "generate", fail)
    assert_error(run(capsys, "generate", "--model", tiny, "--prompt-ids", "1",
                     "--max-new-tokens", "2"), 2, "--top-p: expected")


# -- outputs checked before the work, written atomically ---------------------------------------

def test_bench_refuses_outputs_before_loading(capsys, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("checked before the model loads")
    monkeypatch.setattr(cli_checks, "load_model", no_load)
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    assert_error(run(capsys, "bench", "--output", existing, "--no-transformers"), 2,
                 "--output", "exists", "--overwrite")
    assert existing.read_text() == "{}"
    assert_error(run(capsys, "bench", "--output", tmp_path, "--no-transformers"), 2,
                 "--output", "directory")
    assert_error(run(capsys, "bench", "--output", existing / "x.json", "--no-transformers"), 2,
                 "--output", "not a writable directory")
    assert_error(run(capsys, "bench", "--output", tmp_path / "r.json", "--repeats", "0"), 2,
                 "--repeats")
    assert_error(run(capsys, "bench", "--output", tmp_path / "r.json", "--no-transformers",
                     "--prompts", tmp_path / "absent.txt"), 2, "--prompts")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("command", ["bench", "sweep"])
def test_prompts_fifo_is_no_regular_file(capsys, tmp_path, monkeypatch, command):
    """Reported as what it is, and never opened (a FIFO's open blocks for a writer)."""
    def no_load(*args, **kwargs):
        raise AssertionError("checked before the model loads")
    monkeypatch.setattr(cli_checks, "load_model", no_load)
    os.mkfifo(tmp_path / "prompts.txt")
    output = tmp_path / ("r.json" if command == "bench" else "sweep")
    line = assert_error(run(capsys, command, "--output", output, "--prompts",
                            tmp_path / "prompts.txt", "--tokenizer", BIG_TOKENIZER,
                            *(["--no-transformers"] if command == "bench" else [])),
                        2, "--prompts", "not a regular file", "FIFO")
    assert "does not exist" not in line


@pytest.mark.parametrize("argv", [
    ["bench", "--output", "r.json", "--no-transformers"], ["sweep", "--output", "out"],
    ["compare"], ["train", "--config", "train.json"]])
def test_threads_bounded_by_the_cpus(capsys, tmp_path, argv):
    """--threads 100000 used to have the C++ pool spawn them (and crash)."""
    argv = [str(tmp_path / a) if a in ("r.json", "out", "train.json") else a for a in argv]
    assert_error(run(capsys, *argv, "--threads", 100000), 2, "--threads",
                 f"[1, {os.cpu_count()}]", "100000")


def test_set_num_threads_bounded_by_the_cpus():
    for bad in (100000, 0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match=r"^n: expected an integer in \[1, "):
            lsk.set_num_threads(bad)
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(threads=100000)
    previous = torch.get_num_threads()
    lsk.set_num_threads(1)  # the control
    assert torch.get_num_threads() == 1
    torch.set_num_threads(previous)


@pytest.mark.parametrize("rank, prints", [("1", False), ("0", True)])
def test_under_torchrun_only_rank_0_prints_the_error(capsys, monkeypatch, rank, prints):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run(capsys, "generate", "--max-new-tokens", "0", "--prompt-ids", "1")
    assert code == 2 and not out
    assert (err.strip().splitlines() == [err.strip()] and "--max-new-tokens" in err) if prints \
        else err == ""


def test_bench_without_transformers_writes_its_report(capsys, tiny, tmp_path):
    out = tmp_path / "results" / "bench.json"
    code, stdout, err = run(capsys, "bench", "--model", tiny, "--no-transformers",
                            "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0",
                            "--output", out, "--quiet")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["complete"] and report["settings"]["repeats_done"] == 1
    assert report["settings"]["dtype"] == "float32" and report["settings"]["model"] == tiny
    assert all(r["speedup_vs_transformers_generate"] is None for r in report["results"])
    assert "ours autoregressive" in stdout and f"wrote {out}" in err
    assert list(out.parent.iterdir()) == [out]  # no temporary file left
    code, _, err = run(capsys, "bench", "--model", tiny, "--no-transformers", "--max-new-tokens",
                       "3", "--repeats", "1", "--warmup", "0", "--output", out, "--overwrite",
                       "--quiet")
    assert code == 0, err


def test_bench_exit_layers_auto_times_the_adaptive_policy(capsys, tiny, tmp_path):
    """auto among --exit-layers adds exit_layer="auto" beside the fixed configurations;
    alone, the fixed exit layers are the default (E = L // 4 = 1 on this model)."""
    out = tmp_path / "bench.json"
    common = ["bench", "--model", tiny, "--no-transformers", "--max-new-tokens", "3",
              "--repeats", "1", "--warmup", "0", "--output", out, "--overwrite", "--quiet"]
    code, stdout, err = run(capsys, *common, "--strategies", "self_speculative",
                            "--exit-layers", "2,auto", "--draft-lengths", "1")
    assert code == 0, err
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows] == [
        "ours autoregressive", "ours self_speculative E=2 k=1",
        "ours self_speculative E=2 k=auto", "ours self_speculative E=auto"]
    auto = rows[-1]
    assert auto["exit_layer"] == "auto" and auto["same_tokens_as_autoregressive"]
    assert sum(auto["choices"].values()) == auto["rounds"] > 0
    assert f"adaptive (exit layer auto): rounds per choice (last run): {auto['choices']}" \
        in stdout
    code, stdout, err = run(capsys, *common, "--exit-layers", "auto")
    assert code == 0, err
    assert [r["name"] for r in json.loads(out.read_text())["results"]] == [
        "ours autoregressive", "ours early_exit E=1", "ours self_speculative E=1 k=4",
        "ours self_speculative E=1 k=auto", "ours self_speculative E=auto"]
    code, stdout, err = run(capsys, *common)  # the control: no auto, no adaptive row or line
    assert code == 0, err
    assert "E=auto" not in out.read_text() and "adaptive" not in stdout


@pytest.mark.parametrize("argv, needles", [
    (["--strategies", "early_exit", "--exit-layers", "2,auto"],
     ["--exit-layers", "auto", "self_speculative", "--strategies early_exit"]),
    (["--exit-layers", "2,autox"], ["--exit-layers", "integers >= 1 and auto", "'2,autox'"]),
    (["--exit-layers", "0,auto"], ["--exit-layers", "'0,auto'"]),
])
def test_bench_exit_layers_auto_errors_come_before_loading(capsys, tmp_path, monkeypatch, argv,
                                                           needles):
    def no_load(*args, **kwargs):
        raise AssertionError("checked before the model loads")
    monkeypatch.setattr(cli_checks, "load_model", no_load)
    assert_error(run(capsys, "bench", "--no-transformers", "--output", tmp_path / "r.json",
                     *argv), 2, *needles)


def test_format_table_without_transformers():
    row = {"name": "ours autoregressive", "tokens_per_s": 10.0, "tokens_per_s_min": 9.0,
           "tokens_per_s_max": 11.0, "speedup_vs_ours_autoregressive": 1.0,
           "speedup_vs_transformers_generate": None, "same_tokens_as_autoregressive": True}
    assert " - " in benchmark.format_table({"results": [row]})


def test_interrupted_bench_keeps_the_finished_repetitions(capsys, tiny, tmp_path, monkeypatch):
    calls = []

    def progress(self, done, total, name):  # interrupt in the second of two repetitions
        calls.append(done)
        if done == total // 2 + 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(benchmark.Progress, "__call__", progress)
    out = tmp_path / "bench.json"
    assert_error(run(capsys, "bench", "--model", tiny, "--no-transformers", "--max-new-tokens",
                     "2", "--repeats", "2", "--warmup", "0", "--output", out), 130,
                 "interrupted", str(out), "1 of 2")
    report = json.loads(out.read_text())
    assert not report["complete"] and report["settings"]["repeats_done"] == 1
    assert len(report["results"]) == len(calls) - 1
    assert list(tmp_path.iterdir()) == [out]


def test_interrupted_sweep_keeps_the_finished_repetitions(capsys, tiny, tmp_path, monkeypatch):
    def progress(self, done, total, name):
        if done == total // 2 + 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(benchmark.Progress, "__call__", progress)
    assert_error(run(capsys, "sweep", "--model", tiny, "--exit-layers", "1,2", "--draft-lengths",
                     "1", "--max-new-tokens", "2", "--repeats", "2", "--warmup", "0",
                     "--output", tmp_path), 130, "interrupted", "sweep.json")
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert not report["complete"] and report["settings"]["model"] == tiny
    assert (tmp_path / "sweep.csv").read_text().startswith("name,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.json"]


def test_sweep_checks(capsys, tiny, tmp_path):
    assert_error(run(capsys, "sweep", "--model", tiny, "--exit-layers", "1,4",
                     "--output", tmp_path), 2, "--exit-layers", "[1, 3]")
    assert_error(run(capsys, "sweep", "--model", tiny, "--draft-lengths", "0",
                     "--output", tmp_path), 2, "--draft-lengths")
    (tmp_path / "sweep.json").write_text("{}")
    assert_error(run(capsys, "sweep", "--model", tiny, "--output", tmp_path), 2,
                 "--output", "sweep.json", "--overwrite")


def test_train_checks_before_training(capsys, tmp_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"data": str(tmp_path / "text.txt"), "steps": 1,
                                  "output": str(tmp_path / "run")}))
    assert_error(run(capsys, "train", "--config", tmp_path / "absent.toml"), 2, "--config")
    assert_error(run(capsys, "train", "--config", config, "--steps", "0"), 2, "--steps")
    assert_error(run(capsys, "train", "--config", config), 2, "--config", "data")
    (tmp_path / "text.txt").write_text("hello\n")
    (tmp_path / "a_file").write_text("")
    assert_error(run(capsys, "train", "--config", config, "--output", tmp_path / "a_file"), 2,
                 "--output", "is a file")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert_error(run(capsys, "train", "--config", config, "--output", tmp_path / "model"), 2,
                 "--output", "--overwrite")
    config.write_text(json.dumps({"data": str(tmp_path / "text.txt"), "stepz": 1}))
    assert_error(run(capsys, "train", "--config", config), 1, "--config", "unknown keys")


def test_train_data_fifo_is_never_opened(capsys, tmp_path, no_hang):
    os.mkfifo(tmp_path / "text.txt")
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"data": str(tmp_path / "text.txt"), "steps": 1,
                                  "output": str(tmp_path / "run")}))
    assert_error(run(capsys, "train", "--config", config), 2, "data", "not a regular file")
    assert not (tmp_path / "run").exists()


# -- eval-exits --------------------------------------------------------------------------------

def test_eval_exits_errors(capsys, tiny, tmp_path):
    data = tmp_path / "held_out.txt"
    data.write_text("some text\n")
    common = ["eval-exits", "--model", tiny, "--tokenizer", BIG_TOKENIZER, "--data", data]
    assert_error(run(capsys, *common, "--max-windows", "0"), 2, "--max-windows")
    assert_error(run(capsys, *common[:-1], tmp_path / "absent.txt"), 2, "--data")
    assert_error(run(capsys, *common), 2, "--tokenizer", "2048")
    data.write_text("")  # checked before the model loads, so the tokenizer is not reached
    (tmp_path / "plot.png").write_text("old")
    assert_error(run(capsys, *common, "--plot", tmp_path / "plot.png"), 2, "--plot", "exists")


def test_eval_exits_progress_and_plot(capsys, stories_path, stories_tokenizer_path, tmp_path):
    sample = DATA / "tinystories_sample.txt"
    if not sample.exists():
        pytest.skip(f"{sample} is absent")
    plot = tmp_path / "exits.png"
    plotting = importlib.util.find_spec("matplotlib") is not None
    code, out, err = run(capsys, "eval-exits", "--model", stories_path, "--tokenizer",
                         stories_tokenizer_path, "--data", sample, "--seq-len", "32",
                         "--max-windows", "2", "--json", *(["--plot", plot] if plotting else []))
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == 64 and result["exits"][-1]["agreement"] == 1.0
    assert "2/2" in err  # the tqdm bar on stderr
    if plotting:
        assert plot.read_bytes()[:4] == b"\x89PNG" and f"wrote {plot}" in err
    code, out, err = run(capsys, "eval-exits", "--model", stories_path, "--tokenizer",
                         stories_tokenizer_path, "--data", sample, "--seq-len", "32",
                         "--max-windows", "1", "--quiet")
    assert code == 0 and err == "" and "| 5 |" in out


# -- what a researcher expects -----------------------------------------------------------------

def test_self_speculative_without_a_recommendation(capsys, stories_path):
    code, out, err = run(capsys, "generate", "--model", stories_path, "--prompt-ids", "1 403",
                         "--strategy", "self_speculative", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    stats = json.loads(out)["stats"]
    assert stats["exit_layer"] == 1 and stats["num_speculations"] == 4
    assert sorted(stats["defaulted"]) == ["exit_layer", "num_speculations"]
    assert "exit layer 1 (default), k 4 (default)" in err and "--exit-layer" in err


def test_compare_without_a_recommendation(capsys, stories_path, stories_tokenizer_path):
    code, out, err = run(capsys, "compare", "--model", stories_path, "--tokenizer",
                         stories_tokenizer_path, "--prompt", "Once upon a time",
                         "--max-new-tokens", "8", "--repeats", "2", "--warmup", "0", "--quiet")
    assert code == 0, err
    assert out.count("Once upon a time") == 2 and "identical outputs: yes" in out
    assert "exit layer 1 (default), k 4 (default)" in out and "tokens/round" in out
    assert "acceptance" in out and "per-repeat" in out
    assert "C++ steps" in out or "eager" in out  # how the steps ran (eager: no _cpu)


def test_stories_stops_at_the_end_of_its_story(capsys, stories_path, stories_tokenizer_path):
    common = ["generate", "--model", stories_path, "--tokenizer", stories_tokenizer_path,
              "--prompt", STORY_END, "--max-new-tokens", "12", "--json"]
    code, out, err = run(capsys, *common)
    assert code == 0, err
    assert json.loads(out)["outputs"][0]["tokens"] == [1]  # llama2.c's end of text: BOS
    code, out, _ = run(capsys, *common, "--eos-token-id", "none")
    assert len(json.loads(out)["outputs"][0]["tokens"]) == 12


def test_eos_token_id(capsys, tiny):
    common = ["generate", "--model", tiny, "--prompt-ids", "1 2 3", "--max-new-tokens", "8",
              "--json"]
    code, out, _ = run(capsys, *common)
    tokens = json.loads(out)["outputs"][0]["tokens"]
    assert code == 0 and len(tokens) == 8  # no EOS in the config, no tokenizer
    stop = tokens[3]
    for flag in ([f"{stop}"], [f"63,{stop}"], ["63", "--eos-token-id", f"{stop}"]):
        code, out, _ = run(capsys, *common, "--eos-token-id", *flag)
        assert json.loads(out)["outputs"][0]["tokens"] == tokens[:tokens.index(stop) + 1]


def test_no_cuda_graphs_reaches_generate(capsys, tiny, monkeypatch):
    seen = {}
    real = cli.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(cli, "generate", spy)
    code, _, err = run(capsys, "generate", "--model", tiny, "--prompt-ids", "1",
                       "--max-new-tokens", "2", "--no-cuda-graphs")
    assert code == 0 and seen["cuda_graphs"] is False and "CUDA graphs" not in err
    run(capsys, "generate", "--model", tiny, "--prompt-ids", "1", "--max-new-tokens", "2")
    assert seen["cuda_graphs"] is None


def test_info_json_conventions(capsys, tiny):
    code, out, _ = run(capsys, "info", "--model", tiny, "--dtype", "bf16")
    info = json.loads(out)
    assert code == 0 and info["dtype"] == "bfloat16" and info["config"]["exit_layer"] is None
    assert '"None"' not in out and "torch." not in out
