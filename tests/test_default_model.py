"""The embedded default model: loads with no path, recommends an exit layer and draft length,
and self-speculates losslessly with them, from Python and from the CLI."""
import json

import pytest

import layerskip_kernels as lsk
from layerskip_kernels.cli import main


@pytest.fixture(scope="module")
def default_model():
    return lsk.load_model()


def test_loads_with_recommendations(default_model):
    c = default_model.config
    assert 1 <= c.exit_layer <= c.n_layers - 1
    assert c.num_speculations >= 1


def test_tokenizer_round_trips_code():
    tok = lsk.load_tokenizer()
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids) == text


def test_self_speculative_with_defaults_equals_autoregressive(default_model):
    tok = lsk.load_tokenizer()
    prompts = [tok.encode("def fib(n):"), tok.encode("import os\n\nclass ")]
    plain = lsk.generate(default_model, prompts, max_new_tokens=40)
    fast = lsk.generate(default_model, prompts, max_new_tokens=40, strategy="self_speculative")
    assert fast.tokens == plain.tokens
    assert fast.stats["exit_layer"] == default_model.config.exit_layer
    assert fast.stats["acceptance_rate"] > 0


def test_cli_generates_without_a_model_path(capsys):
    main(["generate", "--prompt", "def fib(n):", "--max-new-tokens", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert len(out["outputs"][0]["tokens"]) == 8 and isinstance(out["outputs"][0]["text"], str)
