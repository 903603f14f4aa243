"""bench/bench_policy.py: results.json, auto / the best fixed pair per prompt and over every
4-prompt subset (against a brute-force recomputation), the plot of auto's choices over time,
and outputs refused before any work."""
import importlib.util
import itertools
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import layerskip_kernels as lsk

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_policy.py"
PNG = b"\x89PNG\r\n\x1a\n"


def _load():
    spec = importlib.util.spec_from_file_location("bench_policy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bp = _load()


def brute_force(tokens, seconds, auto, fixed, size):
    """The subset statistic spelt out: every subset of `size` prompts as a bit mask; per
    repeat each configuration's total tokens / total seconds; the best fixed by the median of
    those; the median over repeats of auto's / the best's."""
    n, repeats = len(seconds[auto]), len(seconds[auto][0])
    rows = []
    for mask in range(1 << n):
        members = [p for p in range(n) if mask >> p & 1]
        if len(members) != size:
            continue
        speed = {name: [sum(tokens[name][p][r] for p in members)
                        / sum(seconds[name][p][r] for p in members) for r in range(repeats)]
                 for name in [auto, *fixed]}
        medians = {name: statistics.median(speed[name]) for name in fixed}
        best = next(name for name in fixed if medians[name] == max(medians.values()))
        rows.append((members, statistics.median(
            [speed[auto][r] / speed[best][r] for r in range(repeats)]), best))
    return sorted(rows)


def _synthetic(prompts, repeats, names, seed):
    rng = random.Random(seed)
    tokens = {name: [[rng.randint(50, 128) for _ in range(repeats)] for _ in range(prompts)]
              for name in names}
    seconds = {name: [[rng.uniform(0.05, 0.3) for _ in range(repeats)] for _ in range(prompts)]
               for name in names}
    return tokens, seconds


@pytest.mark.parametrize("prompts, repeats, size", [(6, 3, 4), (7, 4, 4), (5, 1, 1), (4, 2, 4)])
def test_subset_ratios_equal_a_brute_force_recomputation(prompts, repeats, size):
    fixed = ["E3 k3", "E3 k2", "E4 k1"]
    tokens, seconds = _synthetic(prompts, repeats, ["auto", *fixed], seed=prompts * repeats)
    rows = bp.subset_ratios(tokens, seconds, "auto", fixed, size)
    expected = brute_force(tokens, seconds, "auto", fixed, size)
    assert len(rows) == len(expected) == len({tuple(r["prompts"]) for r in rows})
    got = sorted((r["prompts"], r["ratio"], r["best_fixed"]) for r in rows)
    for (subset, ratio, best), (subset_e, ratio_e, best_e) in zip(got, expected):
        assert (subset, best) == (subset_e, best_e)
        assert ratio == pytest.approx(ratio_e, rel=1e-12)
    summary = bp.subset_summary(rows, size)
    ratios = [ratio for _, ratio, _ in expected]
    assert summary["count"] == len(expected)
    assert summary["min"] == pytest.approx(min(ratios))
    assert summary["median"] == pytest.approx(statistics.median(ratios))
    assert summary["worst"]["ratio"] == summary["min"]


def test_auto_losing_on_one_subset_is_the_worst():
    """Five prompts, 10 tokens each, one repeat. Fixed A: 1 s a prompt; fixed B: 0.5 s on
    prompt 0, 4 s elsewhere; auto: 1.1 s on prompts 0-3, 0.1 s on prompt 4. Only the subset
    without prompt 4 is lost: auto 40 / 4.4 s against A's 40 / 4 s (B: 40 / 12.5 s)."""
    tokens = {name: [[10]] * 5 for name in ("auto", "A", "B")}
    seconds = {"A": [[1.0]] * 5, "B": [[0.5]] + [[4.0]] * 4,
               "auto": [[1.1]] * 4 + [[0.1]]}
    rows = bp.subset_ratios(tokens, seconds, "auto", ["A", "B"], 4)
    assert [r["prompts"] for r in rows] == [[0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 3, 4],
                                            [0, 2, 3, 4], [1, 2, 3, 4]]
    assert rows[0]["ratio"] == pytest.approx(4 / 4.4) and rows[0]["best_fixed"] == "A"
    assert [r["ratio"] for r in rows[1:]] == pytest.approx([4 / 3.4] * 4)
    summary = bp.subset_summary(rows, 4)
    assert summary["worst"]["prompts"] == [0, 1, 2, 3]
    assert summary["min"] == pytest.approx(4 / 4.4)
    assert summary["median"] == pytest.approx(4 / 3.4)
    per_prompt = bp.subset_ratios(tokens, seconds, "auto", ["A", "B"], 1)
    assert [r["best_fixed"] for r in per_prompt] == ["B", "A", "A", "A", "A"]
    assert [r["ratio"] for r in per_prompt] == pytest.approx([0.5 / 1.1] + [1 / 1.1] * 3 + [10])


def test_the_best_fixed_is_by_median_over_repeats():
    """A is faster in two of three repeats (the median), B in one by far (the mean)."""
    tokens = {name: [[10, 10, 10]] for name in ("auto", "A", "B")}
    seconds = {"A": [[1.0, 1.0, 1.0]], "B": [[1.1, 1.1, 0.01]], "auto": [[2.0, 0.5, 1.0]]}
    (row,) = bp.subset_ratios(tokens, seconds, "auto", ["A", "B"], 1)
    assert row["best_fixed"] == "A"
    assert row["ratio"] == pytest.approx(1.0)  # median of 0.5, 2, 1


def _runs(prompts, repeats=2):
    """runs[name][prompt][repeat] records, as measure() makes them."""
    tokens, seconds = _synthetic(prompts, repeats, ["autoregressive", "E3 k3", "auto"], 1)
    return {name: [[{"seconds": seconds[name][p][r], "tokens": tokens[name][p][r]}
                    for r in range(repeats)] for p in range(prompts)] for name in tokens}


def test_versus_best_fixed_leaves_out_subsets_under_four_prompts():
    assert "subsets" not in bp.versus_best_fixed(_runs(3))
    out = bp.versus_best_fixed(_runs(4))
    assert len(out["per_prompt"]) == 4 and out["subsets"]["count"] == 1
    assert {r["best_fixed"] for r in out["per_prompt"]} == {"E3 k3"}  # never autoregressive


def test_stint_colours():
    colours = bp.stint_colours({"E10 k1", "autoregressive", "E2 k4", "E2 k1"})
    assert list(colours) == ["autoregressive", "E2 k1", "E2 k4", "E10 k1"]
    assert colours["autoregressive"] == "0.75" and len(set(map(str, colours.values()))) == 4


def test_choices_figure_draws_each_stint_where_it_ran():
    stints = [[["autoregressive", 2], ["E4 k1", 2], ["autoregressive", 40]],
              [["E3 k3", 10], ["E3 k1", 5]]]
    report = {"settings": {"model": None, "prompts": 2, "batch": False, "max_new_tokens": 64},
              "runs": {"auto": [[{"stints": [["E3 k3", 1]]}, {"stints": s}] for s in stints]}}
    ax = bp.choices_figure(report).axes[0]
    colours = bp.stint_colours({"autoregressive", "E4 k1", "E3 k3", "E3 k1"})
    bars = []
    for bar in ax.collections:
        x, y = bar.get_paths()[0].vertices.T
        bars.append((round(y.mean()), x.min(), x.max(), tuple(bar.get_facecolor()[0])))
    from matplotlib.colors import to_rgba
    assert sorted(bars) == sorted(
        (band, start, start + rounds, to_rgba(colours[name]))
        for band, line in enumerate(stints)
        for start, (name, rounds) in zip([0, *itertools.accumulate(n for _, n in line)], line))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(colours)


@pytest.mark.parametrize("batch", [False, True])
def test_plot_choices_from_a_report(tmp_path, batch):
    stints = [[["autoregressive", 2], ["E4 k1", 2], ["autoregressive", 40]],
              [["E3 k3", 10], ["E3 k1", 5]]]
    report = {"settings": {"model": None, "prompts": 2, "batch": batch, "max_new_tokens": 64},
              "runs": {"auto": [[{"stints": s}] for s in stints[:1 if batch else 2]]}}
    bp.plot_choices(report, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes().startswith(PNG)
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temporary file left


# -- a run of the script -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run on the embedded default model, 5 held-out prompts each alone."""
    root = tmp_path_factory.mktemp("policy")
    prompts = json.loads((ROOT / "bench/results/default_model/heldout_prompts.json").read_text())
    (root / "p5.json").write_text(json.dumps(prompts[:5]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--prompts", str(root / "p5.json"), "--fixed", "3:3,3:2",
         "--max-new-tokens", "8", "--repeats", "1", "--warmup", "0", "--threads", "1",
         "--output", str(root / "out"), "--plot", str(root / "choices.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc.stdout, json.loads((root / "out" / "results.json").read_text())


def test_results_json_holds_every_run(run):
    _, _, report = run
    assert report["complete"] and report["repeats_done"] == 1
    assert "bench_policy.py" in report["command"] and "--fixed 3:3,3:2" in report["command"]
    assert report["commit"] is None or len(report["commit"]) == 40
    machine = report["machine"]
    for key in ("platform", "cpu_count", "torch", "load_average_before", "load_average_after"):
        assert machine[key], key
    assert report["settings"]["prompts"] == 5 and report["settings"]["fixed"] == [[3, 3], [3, 2]]
    assert list(report["runs"]) == ["autoregressive", "E3 k3", "E3 k2", "auto"]
    for name, groups in report["runs"].items():
        assert len(groups) == 5 and all(len(repeats) == 1 for repeats in groups)
        for record in (r for repeats in groups for r in repeats):
            assert record["seconds"] > 0 and record["tokens"] == 8 and record["exact"]
            if name != "autoregressive":
                assert 0 <= record["acceptance"] <= 1 and record["tokens_per_round"] >= 1
            if name == "auto":
                rounds = sum(n for _, n in record["stints"])
                assert rounds == sum(record["choices"].values()) > 0
    assert set(report["summary"]) == set(report["runs"])
    # Each prompt alone on one model: the first auto call explores, the later ones recall it.
    assert [group[0]["recalled"] for group in report["runs"]["auto"]] == [False] + [True] * 4
    assert report["settings"]["cold"] is False


def test_results_json_subset_statistics_recompute(run):
    _, stdout, report = run
    runs = report["runs"]
    fixed = ["E3 k3", "E3 k2"]
    tokens = {n: [[r["tokens"] for r in g] for g in runs[n]] for n in runs}
    seconds = {n: [[r["seconds"] for r in g] for g in runs[n]] for n in runs}
    subsets = brute_force(tokens, seconds, "auto", fixed, 4)
    ratios = [ratio for _, ratio, _ in subsets]
    stored = report["subsets"]
    assert (stored["size"], stored["count"]) == (4, 5)
    assert stored["min"] == pytest.approx(min(ratios))
    assert stored["median"] == pytest.approx(statistics.median(ratios))
    worst = min(subsets, key=lambda row: row[1])
    assert (stored["worst"]["prompts"], stored["worst"]["best_fixed"]) == (worst[0], worst[2])
    per_prompt = brute_force(tokens, seconds, "auto", fixed, 1)
    assert [r["ratio"] for r in report["per_prompt"]] == pytest.approx(
        [ratio for _, ratio, _ in per_prompt])
    assert f"over all 5 4-prompt subsets: min {stored['min']:.3f}" in stdout
    assert "auto / the best fixed pair, per prompt" in stdout
    assert "auto, the last prompt's choices over time" in stdout  # the lines it printed before


def test_plot_is_a_png_and_replots(run, monkeypatch):
    root, _, _ = run
    assert (root / "choices.png").read_bytes().startswith(PNG)

    def no_load(*args, **kwargs):
        raise AssertionError("--replot runs nothing")
    monkeypatch.setattr(lsk, "load_model", no_load)
    bp.main(["--replot", str(root / "out" / "results.json"), "--plot", str(root / "again.png")])
    assert (root / "again.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("existing", ["out/results.json", "choices.png"])
def test_an_existing_output_is_refused_before_any_work(tmp_path, monkeypatch, capsys, existing):
    def no_load(*args, **kwargs):
        raise AssertionError("refused before the model loads")
    monkeypatch.setattr(lsk, "load_model", no_load)
    (tmp_path / existing).parent.mkdir(exist_ok=True)
    (tmp_path / existing).write_text("old")
    flag = "--plot" if existing.endswith(".png") else "--output"
    with pytest.raises(SystemExit) as exit:
        bp.main(["--output", str(tmp_path / "out"), "--plot", str(tmp_path / "choices.png")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag} " in err and ("exists" in err or "already holds" in err)
    assert "--overwrite" in err
    assert (tmp_path / existing).read_text() == "old"
    (tmp_path / existing).unlink()  # the control: nothing in the way, and it gets to the model
    with pytest.raises(AssertionError, match="refused before the model loads"):
        bp.main(["--output", str(tmp_path / "out"), "--plot", str(tmp_path / "choices.png")])


def test_a_directory_in_the_way_is_refused_even_with_overwrite(tmp_path, capsys):
    (tmp_path / "results.json").mkdir()
    with pytest.raises(SystemExit) as exit:
        bp.main(["--output", str(tmp_path), "--overwrite"])
    assert exit.value.code == 2 and "--output" in capsys.readouterr().err
