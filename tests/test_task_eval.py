"""`layerskip eval`: the metrics are their libraries' on hand-checked pairs, self-speculative
scores equal autoregressive scores exactly, and the command writes its report and plot.
Skips when the [eval] extra (rouge-score, sacrebleu) is absent."""
import json

import pytest

pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

import layerskip_kernels as lsk  # noqa: E402
from layerskip_kernels.cli import main  # noqa: E402
from layerskip_kernels.task_eval import (_time_speedup, configurations, load_examples,  # noqa: E402
                                         run_eval, score)

EXAMPLES = [("Once upon a time", " there was a little girl named Lily."),
            ("The dog was", " very happy."),
            ("Tom had a red ball. He", " liked to play with it."),
            ("One day, Lily went to the park", ". She saw a big tree.")]


def test_metrics_on_hand_checked_pairs():
    """'the cat sat on the mat' against 'the cat is on the mat': 5 of 6 words shared (ROUGE-1
    and, as the common subsequence is 'the cat on the mat', ROUGE-L: 5/6), 3 of 5 bigrams
    (ROUGE-2: 3/5); BLEU: n-gram precisions 5/6, 3/5, 1/4 and 0/3, which sacrebleu's default
    'exp' smoothing counts as 1/(2 * 3), at equal lengths (no brevity penalty)."""
    s = score(["the cat sat on the mat"], ["the cat is on the mat"])
    assert s["rouge1"] == pytest.approx(100 * 5 / 6)
    assert s["rouge2"] == pytest.approx(100 * 3 / 5)
    assert s["rougeL"] == pytest.approx(100 * 5 / 6)
    assert s["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    assert s["exact_match"] == 0


def test_metrics_average_over_pairs():
    s = score(["  x = 1\n", "return y", "a b"], ["x = 1", "return z", "c d"])
    assert s["exact_match"] == pytest.approx(100 / 3)  # surrounding whitespace ignored
    # ROUGE-1 per pair: 1, 1/2 ("return" of two words each), 0
    assert s["rouge1"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError, match="predictions"):
        score(["a"], ["a", "b"])


def test_speedup_in_time():
    """Autoregressive: 100 tokens at 10 tokens/s (10 s); a configuration that writes 50 tokens
    at 10 tokens/s takes 5 s: 1x in tokens/s, 2x in time."""
    row = {"tokens_per_s": 10.0, "speedup_vs_ours_autoregressive": 1.0,
           "speedup_vs_ours_autoregressive_min": 0.8, "speedup_vs_ours_autoregressive_max": 1.1}
    _time_speedup(row, 50, 100)
    assert row["time_s"] == 5.0 and row["new_tokens"] == 50
    assert (row["speedup_in_time"], row["speedup_in_time_min"], row["speedup_in_time_max"]) == (
        2.0, 1.6, 2.2)


def test_self_speculative_scores_equal_autoregressive(stories_path, stories_tokenizer_path):
    model = lsk.load_model(stories_path)
    tok = lsk.load_tokenizer(stories_tokenizer_path)
    configs = configurations(model.config.n_layers, exit_layers=[2], speedups=[1.5],
                             exit_layer=2, num_speculations=3)
    assert [n for n, _ in configs] == ["autoregressive", "early_exit E=2",
                                       "layer_skip speedup=1.5", "self_speculative E=2 k=3"]
    report = run_eval(model, tok, [p for p, _ in EXAMPLES], [r for _, r in EXAMPLES], 24,
                      configs, stop=["."], eos_token_id=[tok.bos_id], repeats=1, warmup=0,
                      batch_size=2)
    rows = {r["name"]: r for r in report["results"]}
    ar, spec = rows["autoregressive"], rows["self_speculative E=2 k=3"]
    assert spec["same_text_as_autoregressive"] and spec["same_scores_as_autoregressive"]
    assert all(spec[m] == ar[m] for m in ("rouge1", "rouge2", "rougeL", "bleu", "exact_match"))
    assert spec["new_tokens"] == ar["new_tokens"]  # the same tokens: both speedups agree
    assert spec["speedup_in_time"] == pytest.approx(spec["speedup_vs_ours_autoregressive"])
    assert not rows["early_exit E=2"]["same_text_as_autoregressive"]  # a lossy control
    for example in report["examples"]:
        assert all("." not in text for text in example["outputs"].values())  # the stop
    assert report["complete"] and report["settings"]["stop"] == ["."]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n"
                            for p, r in EXAMPLES))
    return path


def test_eval_command(stories_path, stories_tokenizer_path, data, tmp_path, capsys):
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    args = ["eval", "--model", stories_path, "--tokenizer", stories_tokenizer_path,
            "--data", data, "--max-new-tokens", "16", "--stop", "\\n", "--exit-layers", "1,3",
            "--speedups", "1.5", "--repeats", "2", "--warmup", "0", "--quiet",
            "--output", out, "--plot", png]
    assert main(args) == 0
    table = capsys.readouterr()
    assert "self-speculative scores equal the autoregressive scores" in table.err
    report = json.loads(out.read_text())
    assert report["complete"] and report["settings"]["repeats_done"] == 2
    assert report["settings"]["stop"] == ["\n"]
    names = [r["name"] for r in report["results"]]
    # stories260K recommends no E or k: generate()'s defaults, L // 4 = 1 and 4
    assert names == ["autoregressive", "early_exit E=1", "early_exit E=3",
                     "layer_skip speedup=1.5", "self_speculative E=1 k=4"]
    assert all(name in table.out for name in names)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_:
        main(args)  # the output exists now
    assert exit_.value.code == 2
    assert "--output" in capsys.readouterr().err


def test_exit_layers_past_the_model_name_their_flag(stories_path, stories_tokenizer_path, data,
                                                    tmp_path, capsys):
    """stories260K has 5 layers: --exit-layers 1,5 is refused naming --exit-layers (the list
    flag), before any decoding; 1,4 is the passing control of the check (test_eval_command)."""
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", stories_path, "--tokenizer", stories_tokenizer_path,
              "--data", data, "--exit-layers", "1,5", "--output", tmp_path / "eval.json"])
    assert exit_.value.code == 2
    assert "--exit-layers: expected layers in [1, 4]" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("line, match", [("not json", "line 2: expected a JSON object"),
                                         ('{"prompt": "a"}', "line 2: expected"),
                                         ('{"prompt": 1, "reference": "b"}', "line 2")])
def test_bad_data_lines_are_named(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "reference": "b"}) + "\n" + line + "\n")
    assert load_examples(path, limit=1) == (["a"], ["b"])  # passing control: line 2 unread
    with pytest.raises(ValueError, match=match):
        load_examples(path)


def test_interrupt_keeps_the_finished_repetitions(stories_path, stories_tokenizer_path, data,
                                                  tmp_path, monkeypatch, capsys):
    """Ctrl-C after the first of two repetitions: exit 130, and --output holds that one
    ("complete": false), as bench keeps its repetitions."""
    from layerskip_kernels import task_eval
    real = task_eval.time_interleaved

    def one_then_interrupt(timed, repeats, warmup, progress, on_repeat):
        real(timed, 1, warmup, progress, lambda rows, done: on_repeat(rows, done))
        raise KeyboardInterrupt

    monkeypatch.setattr(task_eval, "time_interleaved", one_then_interrupt)
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", stories_path, "--tokenizer", stories_tokenizer_path,
              "--data", data, "--max-new-tokens", "8", "--exit-layers", "2", "--speedups",
              "1.5", "--repeats", "2", "--warmup", "0", "--quiet", "--output", out])
    assert exit_.value.code == 130
    assert "keeps the 1 of 2 repetitions" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert not report["complete"] and report["settings"]["repeats_done"] == 1
    assert len(report["results"]) == 4 and "rougeL" in report["results"][0]
