"""What a newcomer meets first: `bench`'s selection and its short default, `--stream` with
several prompts, `--json`'s prompts and decode-only rate, `sweep`'s best line, the README's
CLI synopsis against the parser, the example train config and what `train` says about
(exit layer, k)."""
import argparse
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

import layerskip_kernels as lsk
from layerskip_kernels import benchmark, cli, cli_checks
from layerskip_kernels.model import save_hf_directory
from layerskip_kernels.training import TrainConfig, load_config, new_model
from test_cli import TINY, assert_error, run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "bench" / "train_example.toml"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two 4-layer random Llamas: "plain" recommends no (E, k), "recommends" (2, 2)."""
    root = tmp_path_factory.mktemp("models")
    save_hf_directory(new_model(TINY, seed=0), root / "plain")
    save_hf_directory(new_model(TINY | {"exit_layer": 2, "num_speculations": 2}, seed=0),
                      root / "recommends")
    return {name: str(root / name) for name in ("plain", "recommends")}


# -- bench: what it times ----------------------------------------------------------------------

def _bench(capsys, tmp_path, model, *argv):
    out = tmp_path / "bench.json"
    code, _, err = run(capsys, "bench", "--model", model, "--max-new-tokens", "2", "--repeats",
                       "1", "--warmup", "0", "--output", out, "--overwrite", "--quiet", *argv)
    assert code == 0, err
    return json.loads(out.read_text())


def _names(report):
    return [row["name"] for row in report["results"]]


def test_bench_default_is_the_recommended_pair_and_transformers(capsys, tmp_path, models):
    """The default: autoregressive, early exit at E, self-speculative at (E, k) and at E with
    k=auto, transformers' generate and its assistant_early_exit at E, where (E, k) is the
    model's recommendation, else generate()'s defaults (E = L // 4, k = 4)."""
    report = _bench(capsys, tmp_path, models["recommends"])
    assert _names(report) == ["ours autoregressive", "ours early_exit E=2",
                              "ours self_speculative E=2 k=2", "ours self_speculative E=2 k=auto",
                              "transformers generate", "transformers assistant_early_exit E=2"]
    settings = report["settings"]
    assert settings["strategies"] == ["autoregressive", "early_exit", "self_speculative"]
    assert (settings["exit_layers"], settings["draft_lengths"], settings["speedups"]) == (
        [2], [2], [])
    report = _bench(capsys, tmp_path, models["plain"], "--no-transformers")
    assert _names(report) == ["ours autoregressive", "ours early_exit E=1",
                              "ours self_speculative E=1 k=4", "ours self_speculative E=1 k=auto"]


def test_bench_runs_what_it_is_told(capsys, tmp_path, models):
    report = _bench(capsys, tmp_path, models["plain"], "--no-transformers", "--strategies",
                    "self_speculative", "--exit-layers", "1,3", "--draft-lengths", "2")
    assert _names(report) == ["ours autoregressive", "ours self_speculative E=1 k=2",
                              "ours self_speculative E=3 k=2", "ours self_speculative E=1 k=auto",
                              "ours self_speculative E=3 k=auto"]
    report = _bench(capsys, tmp_path, models["plain"], "--no-transformers", "--strategies",
                    "layer_skip,self_speculative", "--speedups", "1.5", "--exit-layers", "2",
                    "--draft-lengths", "1")
    assert _names(report) == ["ours autoregressive", "ours self_speculative E=2 k=1",
                              "ours self_speculative E=2 k=auto", "ours layer_skip speedup=1.5",
                              "ours self_speculative draft=layer_skip speedup=1.5 k=1"]
    report = _bench(capsys, tmp_path, models["plain"], "--strategies", "autoregressive")
    assert _names(report) == ["ours autoregressive", "transformers generate"]


@pytest.mark.parametrize("argv, needles", [
    (["--strategies", "greedy"], ["--strategies", "autoregressive, early_exit", "'greedy'"]),
    (["--strategies", ","], ["--strategies: expected a comma list"]),
    (["--strategies", "autoregressive", "--draft-lengths", "2"],
     ["--draft-lengths", "applies only", "self_speculative", "--strategies autoregressive"]),
    (["--strategies", "autoregressive,layer_skip", "--exit-layers", "2"],
     ["--exit-layers", "early_exit or self_speculative"]),
    (["--speedups", "1.5"], ["--speedups", "layer_skip"]),
    (["--strategies", "layer_skip", "--speedups", "1.5,0.5"], ["--speedups", ">= 1", "0.5"]),
    (["--strategies", "layer_skip", "--speedups", "nan"], ["--speedups: expected", "'nan'"]),
    (["--exit-layers", "0"], ["--exit-layers", ">= 1"]),
    (["--exit-layers", ""], ["--exit-layers: expected", "''"]),
    (["--draft-lengths", "2,x"], ["--draft-lengths", "'2,x'"]),
])
def test_bench_selection_errors_come_before_loading(capsys, tmp_path, monkeypatch, argv, needles):
    def no_load(*args, **kwargs):
        raise AssertionError("checked before the model loads")
    monkeypatch.setattr(cli_checks, "load_model", no_load)
    assert_error(run(capsys, "bench", "--no-transformers", "--output", tmp_path / "r.json",
                     *argv), 2, *needles)
    assert not (tmp_path / "r.json").exists()


def test_bench_exit_layers_past_the_model(capsys, tmp_path, models):
    assert_error(run(capsys, "bench", "--model", models["plain"], "--no-transformers",
                     "--exit-layers", "2,4", "--output", tmp_path / "r.json"), 2,
                 "--exit-layers", "[1, 3]")
    assert not (tmp_path / "r.json").exists()


# -- generate: --stream and --json -------------------------------------------------------------

class _Chars:
    """A tokenizer whose ids are characters: any split of a text into tokens is exact."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def _ids(text):
    return [ord(c) for c in text]


def test_stream_rows_never_interleave_mid_line(capsys):
    printer = cli._Printer(_Chars(), [_ids("def f():"), _ids("x = ")])
    for row, text in ((0, "\n    ret"), (1, "[1, 2"), (0, "urn 1\n"), (1, "]\ny = 3"),
                      (0, "# done")):
        printer(row, _ids(text))
    printer.close()
    assert capsys.readouterr().out.splitlines() == [
        "[0] def f():", "[0]     return 1", "[1] x = [1, 2]", "[0] # done", "[1] y = 3"]


def test_stream_breaks_a_long_line_at_a_space(capsys):
    words = " ".join(f"word{i}" for i in range(60))
    printer = cli._Printer(_Chars(), [_ids("A:"), _ids("B:")])
    for i in range(0, len(words), 7):  # fragments that end mid-word
        printer(0, _ids(words[i:i + 7]))
    shown = capsys.readouterr().out.splitlines()  # before the row ends
    assert shown and all(line.startswith("[0] A:word0 ") is (n == 0) for n, line in
                         enumerate(shown))
    printer.close()
    rest = capsys.readouterr().out.splitlines()
    assert rest[-1] == "[1] B:"  # the prompt of a row that got no token yet
    lines = shown + rest[:-1]
    assert all(len(line) <= len("[0] ") + cli._Printer.WRAP for line in lines)
    assert " ".join(line.removeprefix("[0] ") for line in lines) == "A:" + words


def test_stream_of_several_prompts_echoes_them_in_labelled_lines(capsys):
    """On the default model: each row's lines, joined, are its prompt and the text that
    --json gives, so no fragment of a row lands in another row's line."""
    prompts = ["def fib(n):", "import os", "class Stack:"]
    argv = ["generate", "--max-new-tokens", "24"] + [a for p in prompts for a in ("--prompt", p)]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    outputs = json.loads(out)["outputs"]
    code, out, err = run(capsys, *argv, "--stream")
    assert code == 0, err
    rows = {i: [] for i in range(len(prompts))}
    for line in out.rstrip("\n").split("\n"):
        label, _, text = line.partition(" ")
        rows[int(label.strip("[]"))].append(text)
    for i, prompt in enumerate(prompts):
        assert "\n".join(rows[i]) == prompt + outputs[i]["text"]


def test_json_carries_the_prompt_and_a_decode_only_rate(capsys):
    tok = lsk.load_tokenizer()
    code, out, err = run(capsys, "generate", "--prompt", "def fib(n):", "--prompt-ids", "0 5 6",
                         "--max-new-tokens", "6", "--json")
    assert code == 0, err
    report = json.loads(out)
    first, second = report["outputs"]
    assert (first["prompt"], first["prompt_tokens"]) == ("def fib(n):", tok.encode("def fib(n):"))
    assert (second["prompt"], second["prompt_tokens"]) == (tok.decode([0, 5, 6]), [0, 5, 6])
    stats = report["stats"]
    assert stats["decode_tokens_per_s"] == pytest.approx(
        (stats["new_tokens"] - 2) / (stats["time_s"] - stats["prefill_s"] - stats["capture_s"]))
    assert "decoding alone" in err


def test_decode_only_rate_in_the_api():
    model = lsk.load_model()
    res = lsk.generate(model, [[0, 5], [0, 7, 8]], max_new_tokens=5, eos_token_id=[])
    s = res.stats
    assert s["decode_tokens_per_s"] == pytest.approx(
        (s["new_tokens"] - 2) / (s["time_s"] - s["prefill_s"] - s["capture_s"]))
    # one new token per row comes from prefill alone: nothing was decoded
    assert lsk.generate(model, [[0, 5]], max_new_tokens=1).stats["decode_tokens_per_s"] is None


# -- sweep's best ------------------------------------------------------------------------------

def test_sweep_best_says_it_compares_fixed_k_only(capsys, tmp_path, models):
    code, out, err = run(capsys, "sweep", "--model", models["plain"], "--exit-layers", "1",
                         "--draft-lengths", "1,2", "--max-new-tokens", "2", "--repeats", "1",
                         "--warmup", "0", "--output", tmp_path, "--quiet")
    assert code == 0, err
    best = [line for line in out.splitlines() if line.startswith("best")]
    assert len(best) == 1 and "fixed k" in best[0] and "k=auto not compared" in best[0]
    assert re.search(r"E=1 k=[12]:", best[0])


# -- the README's CLI synopsis is the parser's -------------------------------------------------

def _synopsis():
    """{command: text} of the README's CLI block, with its [MODEL] and [TIMING] spelt out."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## CLI", 1)[1].split("```", 2)[1]
    entries, key = {}, None
    for line in filter(str.strip, block.splitlines()):
        if not line.startswith(" "):
            words = line.split()
            key = words[0].rstrip(":") if words[0] != "layerskip" else words[1]
            line = " ".join(words[1 if words[0] != "layerskip" else 2:])
        entries[key] = entries.get(key, "") + " " + line.strip()
    shared = {name: entries.pop(name, "") for name in ("MODEL", "TIMING")}
    return {command: re.sub(r"\[(MODEL|TIMING)\]", lambda m: shared[m.group(1)], text)
            for command, text in entries.items()}


def _outside_brackets(text):
    """The flags of text written outside [...] and (...): the README's required ones."""
    depth, flags = 0, set()
    for token in re.findall(r"[\[\]()]|--[a-z][a-z-]*", text):
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(token, 0)
        if token.startswith("--") and depth == 0:
            flags.add(token)
    return flags


def test_readme_cli_synopsis_matches_the_parser():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    synopsis = _synopsis()
    assert set(synopsis) == set(commands.choices) | {"--version"}
    for name, sub in commands.choices.items():
        actions = [a for a in sub._actions  # lm-eval's one positional: all its arguments
                   if a.option_strings and a.option_strings[0] not in ("-h", "--debug")]
        flags = {a.option_strings[-1] for a in actions}
        assert set(re.findall(r"--[a-z][a-z-]*", synopsis[name])) == flags, name
        assert _outside_brackets(synopsis[name]) == {
            a.option_strings[-1] for a in actions if a.required}, name
        for action in actions:
            if action.choices:
                assert f"{action.option_strings[-1]} {'|'.join(action.choices)}" in \
                    synopsis[name], (name, action.option_strings)


# -- train: the example config, and the recommended (E, k) -------------------------------------

def test_example_train_config_documents_every_key():
    text = EXAMPLE.read_text()
    documented = set(re.findall(r"^(?:# )?(\w+) = |^\[(\w+)\]$", text, re.MULTILINE))
    documented = {key for pair in documented for key in pair if key}
    keys = {f for f in TrainConfig.__dataclass_fields__}
    assert keys <= documented, sorted(keys - documented)
    config = load_config(EXAMPLE)
    assert (ROOT / config.data).is_file() and (ROOT / config.tokenizer).is_file()
    assert config.model is None and config.model_config["n_layers"] > 1


def test_example_train_config_trains_and_says_how_to_pick_e_and_k(capsys, tmp_path,
                                                                  monkeypatch):
    """Two steps of the example at tiny sizes (run from the repository root, as its paths
    are), then the printed sweep command parses as `layerskip sweep`."""
    monkeypatch.chdir(ROOT)
    raw = tomllib.loads(EXAMPLE.read_text())
    raw.update(seq_len=16, batch_size=2, warmup_steps=1,
               model_config=raw["model_config"] | {"dim": 32, "n_heads": 2, "n_kv_heads": 1,
                                                   "hidden_dim": 48, "n_layers": 3})
    config = tmp_path / "train.json"
    config.write_text(json.dumps(raw))
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", "--config", config, "--steps", "2", "--output", out,
                       "--quiet")
    assert code == 0, err
    assert lsk.load_model(out).config.n_layers == 3
    assert "recommends no (exit layer, k)" in err
    assert "E = 1 (a quarter of the depth) and k = 4" in err
    sweep = next(line for line in err.splitlines() if "layerskip sweep" in line)
    args = cli.build_parser().parse_args(shlex.split(sweep.strip())[1:])
    assert (args.command, args.model, args.exit_layers) == ("sweep", str(out), "1,2")
    assert f'"layerskip": {{"exit_layer": E, "num_speculations": k}} in {out}/config.json' in err
