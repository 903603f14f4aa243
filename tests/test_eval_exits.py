"""Per-exit evaluation (`layerskip eval-exits`): perplexity and agreement with the final layer."""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA
from layerskip_kernels import load_model
from layerskip_kernels.model import save_hf_directory
from layerskip_kernels.training import evaluate_exits, format_table, new_model, plot_exits
from layerskip_kernels.training.cli import add_training_commands

TINY = dict(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=48,
            max_seq_len=64)


def _parser():
    parser = argparse.ArgumentParser()
    add_training_commands(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize("seq_len, batch_size", [(16, 2), (13, 8)])
def test_final_layer_agrees_with_itself(seq_len, batch_size):
    model = new_model(TINY, seed=0).eval()
    tokens = torch.randint(0, 61, (200,), generator=torch.Generator().manual_seed(0))
    result = evaluate_exits(model, tokens, seq_len=seq_len, batch_size=batch_size)
    exits = result["exits"]
    assert [e["exit_layer"] for e in exits] == [1, 2, 3]
    assert exits[-1]["agreement"] == 1.0
    assert all(math.isfinite(e["perplexity"]) and 0 <= e["agreement"] <= 1 for e in exits)
    assert result["tokens"] == (199 // seq_len) * seq_len


def test_matches_the_exit_forward():
    model = new_model(TINY, seed=0).eval()
    tokens = torch.randint(0, 61, (33,), generator=torch.Generator().manual_seed(1))
    result = evaluate_exits(model, tokens, seq_len=32)
    inputs, targets = tokens[None, :-1], tokens[1:]
    final = model(inputs)[0].argmax(-1)
    for e in result["exits"]:
        logits = model(inputs, exit_layer=e["exit_layer"])[0]
        assert e["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
        assert e["agreement"] == pytest.approx((logits.argmax(-1) == final).float().mean().item())


def test_stories260k(stories_path, stories_tokenizer_path):
    from layerskip_kernels import load_tokenizer
    from layerskip_kernels.training import tokenize_text
    model = load_model(stories_path)
    text = (DATA / "tinystories_sample.txt").read_text()
    tokens = tokenize_text(load_tokenizer(stories_tokenizer_path), text)
    result = evaluate_exits(model, tokens, seq_len=128)
    final = result["exits"][-1]
    assert final["agreement"] == 1.0 and 1 < final["perplexity"] < 20
    assert result["exits"][0]["perplexity"] > final["perplexity"]
    assert "| 5 |" in format_table(result)


def test_eval_exits_command(tmp_path, capsys):
    model = new_model(TINY | {"vocab_size": 512}, seed=0)
    save_hf_directory(model, tmp_path / "m")
    tok = DATA / "tok512.bin"
    if not tok.exists():
        pytest.skip(f"{tok} is absent")
    data = tmp_path / "heldout.txt"
    data.write_text("Once upon a time there was a cat.\nThe cat sat on the mat.\n" * 10)
    args = _parser().parse_args(["eval-exits", "--model", str(tmp_path / "m"), "--data", str(data),
                                 "--tokenizer", str(tok), "--seq-len", "32", "--json"])
    with torch.inference_mode():
        args.run(args)
    result = json.loads(capsys.readouterr().out)
    assert result["exits"][-1]["agreement"] == 1.0
    assert math.isfinite(result["exits"][-1]["perplexity"])


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model = new_model(TINY, seed=0).eval()
    tokens = torch.randint(0, 61, (100,), generator=torch.Generator().manual_seed(0))
    result = evaluate_exits(model, tokens, seq_len=16)
    plot_exits({"before": result, "after": result}, tmp_path / "exits.png")
    assert (tmp_path / "exits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
