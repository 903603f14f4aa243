"""The LayerSkip training recipe: layer dropout, early-exit loss, curricula, trainer, CLI."""
import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA
from test_hostile_inputs import no_hang  # noqa: F401 (a fixture)
from layerskip_kernels import Llama, load_model, load_tokenizer
from layerskip_kernels.training import (TrainConfig, Trainer, depth_schedule, dropout_rates,
                                        early_exit_loss, enabled_exits, evaluate_exits,
                                        exit_scales, load_config, new_model,
                                        run_layers_with_dropout, time_schedule, tokenize_text)
from layerskip_kernels.training.cli import add_training_commands

TINY = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=48,
            max_seq_len=64)


@pytest.fixture
def tiny_model():
    return new_model(TINY, seed=0).train()


def _hidden(model, batch_size=3, seq_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, seq_len, model.config.dim, generator=g)


# --- layer dropout ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, expected", [
    ("exp", [0.0, 2 ** 0.25 - 1, 2 ** 0.5 - 1, 2 ** 0.75 - 1, 1.0]),
    ("linear", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("uniform", [1.0] * 5),
])
def test_depth_schedule_table(kind, expected):
    torch.testing.assert_close(depth_schedule(5, kind), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("step, total, expected", [
    (0, 9, 0.0), (8, 9, 1.0), (4, 9, math.sqrt(2) - 1), (3, 7, math.sqrt(2) - 1), (20, 9, 1.0)])
def test_time_schedule_exp(step, total, expected):
    assert time_schedule(step, total, "exp") == pytest.approx(expected)
    assert time_schedule(step, total, "constant") == 1.0


@pytest.mark.parametrize("n_layers", [1, 3, 8])
def test_dropout_rates_formula(n_layers):
    for step in (0, 5, 9):
        rates = dropout_rates(n_layers, 0.2, step, 10, "exp", "exp")
        expected = [(math.exp(step * math.log(2) / 9) - 1)
                    * ((math.exp(l * math.log(2) / (n_layers - 1)) - 1) if n_layers > 1 else 0)
                    * 0.2 for l in range(n_layers)]
        torch.testing.assert_close(rates, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("call, arg", [
    (lambda: dropout_rates(4, 1.5), "p_max"),
    (lambda: depth_schedule(4, "cubic"), "depth schedule"),
    (lambda: time_schedule(0, 4, "linear"), "time schedule"),
    (lambda: enabled_exits(4, 0, 4, "random"), "exit curriculum"),
    (lambda: enabled_exits(4, 0, 4, "rotational", rotation=0), "rotation"),
    (lambda: exit_scales(4, "square"), "exit scale"),
])
def test_guards_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
    dropout_rates(4, 0.5), exit_scales(4, "sum"), enabled_exits(4, 0, 4, "rotational")  # controls


def test_dropped_layer_is_identity(tiny_model):
    h = _hidden(tiny_model)
    out, _ = run_layers_with_dropout(tiny_model, h, [0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(out, tiny_model.run_layers(h, [0, 2, 3]), rtol=0, atol=0)
    out, _ = run_layers_with_dropout(tiny_model, h, [1.0] * 4)
    assert torch.equal(out, h)


def test_eval_drops_nothing(tiny_model):
    h = _hidden(tiny_model)
    tiny_model.eval()
    out, hidden = run_layers_with_dropout(tiny_model, h, [1.0] * 4, keep_hidden={1, 3})
    torch.testing.assert_close(out, tiny_model.run_layers(h, range(4)), rtol=0, atol=0)
    torch.testing.assert_close(hidden[1], tiny_model.run_layers(h, range(2)), rtol=0, atol=0)


def test_dropout_per_sample_independent(tiny_model):
    """Each row keeps or drops a layer on its own draw; kept rows see the block as if alone."""
    h = _hidden(tiny_model, batch_size=32, seq_len=5)
    g = torch.Generator().manual_seed(7)
    out, _ = run_layers_with_dropout(tiny_model, h, [0.5, 0.0, 0.0, 0.0], g)
    skipped, full = tiny_model.run_layers(h, [1, 2, 3]), tiny_model.run_layers(h, range(4))
    dropped = [torch.allclose(out[b], skipped[b], atol=1e-6) for b in range(32)]
    kept = [torch.allclose(out[b], full[b], atol=1e-5) for b in range(32)]
    assert all(d != k for d, k in zip(dropped, kept))  # every row is exactly one of the two
    assert 4 < sum(dropped) < 28  # p = 0.5 for each row: both outcomes occur in one batch
    draws = torch.rand(4, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert dropped == (draws[0] < 0.5).tolist()  # the documented draw order


def test_dropout_rate_is_the_drop_frequency(tiny_model):
    h, g = _hidden(tiny_model, batch_size=400, seq_len=1), torch.Generator().manual_seed(3)
    tiny_model.layers = tiny_model.layers[:1]
    out, _ = run_layers_with_dropout(tiny_model, h, [0.3], g)
    dropped = (out == h).all(-1).all(-1).float().mean().item()
    assert abs(dropped - 0.3) < 0.08


# --- early-exit loss and curricula ------------------------------------------------------------

def test_exit_scales():
    torch.testing.assert_close(exit_scales(4, "sum"), torch.tensor([1, 3, 6, 10]) / 20,
                               check_dtype=False)
    torch.testing.assert_close(exit_scales(4, "linear"), torch.tensor([1, 2, 3, 4]) / 10,
                               check_dtype=False)
    torch.testing.assert_close(exit_scales(4, "uniform"), torch.full((4,), 0.25),
                               check_dtype=False)
    torch.testing.assert_close(exit_scales(4, "sum", [True, False, False, True]),
                               torch.tensor([1, 0, 0, 10]) / 11, check_dtype=False)


@pytest.mark.parametrize("enabled", [[True] * 4, [False, True, False, True]])
def test_early_exit_loss_equals_hand_computed_sum(tiny_model, enabled):
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    tiny_model.eval()
    h = F.embedding(tokens[:, :-1], tiny_model.embed_tokens.weight)
    exits = {l for l, on in enumerate(enabled) if on}
    _, hidden = run_layers_with_dropout(tiny_model, h, keep_hidden=exits)
    total, per_exit = early_exit_loss(tiny_model, hidden, tokens[:, 1:],
                                      exit_scales(4, "sum", enabled))
    weights = {l: (l + 1) * (l + 2) / 2 for l in exits}
    expected, norm = 0.0, sum(weights.values())
    for l in exits:
        logits = tiny_model(tokens[:, :-1], exit_layer=l + 1)
        ce = F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
        torch.testing.assert_close(per_exit[l], ce)
        expected = expected + weights[l] / norm * ce
    assert sorted(per_exit) == sorted(exits)
    torch.testing.assert_close(total, expected)


def test_early_exit_loss_uses_one_shared_head(tiny_model):
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    h = F.embedding(tokens[:, :-1], tiny_model.embed_tokens.weight)
    _, hidden = run_layers_with_dropout(tiny_model, h, keep_hidden={0, 1, 2, 3})
    total, _ = early_exit_loss(tiny_model, hidden, tokens[:, 1:], exit_scales(4))
    total.backward()
    assert tiny_model.lm_head.weight.grad is not None and tiny_model.norm.weight.grad is not None
    assert sum(1 for n, _ in tiny_model.named_parameters() if "lm_head" in n or n.startswith("norm")) == 2


@pytest.mark.parametrize("curriculum, step, expected", [
    ("none", 3, [0, 1, 2, 3, 4]),
    ("rotational", 0, [0, 2, 4]), ("rotational", 1, [1, 3, 4]), ("rotational", 2, [0, 2, 4]),
    ("gradual", 0, [4]), ("gradual", 1, [3, 4]), ("gradual", 2, [2, 3, 4]),
    ("gradual", 3, [1, 2, 3, 4]), ("gradual", 4, [0, 1, 2, 3, 4]), ("gradual", 7, [0, 1, 2, 3, 4]),
])
def test_curricula(curriculum, step, expected):
    enabled = enabled_exits(5, step, 8, curriculum, rotation=2)
    assert [l for l, on in enumerate(enabled) if on] == expected


def test_rotational_every_third_layer():
    got = [[l for l, on in enumerate(enabled_exits(7, t, 100, "rotational", 3)) if on]
           for t in range(4)]
    assert got == [[0, 3, 6], [1, 4, 6], [2, 5, 6], [0, 3, 6]]


# --- trainer ------------------------------------------------------------------------------------

def _sample_tokens():
    sample, tok = DATA / "tinystories_sample.txt", DATA / "tok512.bin"
    if sample.exists() and tok.exists():
        return tokenize_text(load_tokenizer(tok), sample.read_text()), 512
    # synthetic text over a 64-token vocabulary: a repeated pattern with noise
    g = torch.Generator().manual_seed(0)
    base = torch.arange(64).repeat(40)
    noise = torch.randint(0, 64, base.shape, generator=g)
    return torch.where(torch.rand(base.shape, generator=g) < 0.1, noise, base), 64


def _config(tmp_path, **kw):
    base = dict(seq_len=32, batch_size=8, steps=20, lr=3e-3, warmup_steps=3, seed=0,
                p_max=0.2, dropout_time="exp", exit_curriculum="rotational", output=str(tmp_path))
    return TrainConfig(**(base | kw))


def test_twenty_steps_lower_the_loss(tmp_path):
    tokens, vocab = _sample_tokens()
    model = new_model(TINY | {"vocab_size": vocab, "dim": 64, "hidden_dim": 128}, seed=0)
    before = evaluate_exits(model, tokens, seq_len=32, max_windows=8)["exits"]
    trainer = Trainer(model, tokens, _config(tmp_path, steps=20))
    history = trainer.train(progress=False)
    after = evaluate_exits(model, tokens, seq_len=32, max_windows=8)["exits"]
    assert len(history) == 20 and all(math.isfinite(r["loss"]) for r in history)
    assert after[-1]["loss"] < before[-1]["loss"] - 0.5
    assert after[0]["loss"] < before[0]["loss"]  # the early exit trains too
    assert history[-1]["loss"] < history[0]["loss"]


def test_save_resume_is_bit_identical(tmp_path):
    tokens, vocab = _sample_tokens()
    make = lambda: new_model(TINY | {"vocab_size": vocab}, seed=1)  # noqa: E731
    config = _config(tmp_path / "run", steps=6, p_max=0.5, exit_curriculum="rotational")
    straight = Trainer(make(), tokens, config)
    straight.train(progress=False)

    first = Trainer(make(), tokens, config)
    first.train(steps=3, progress=False)
    first.save(tmp_path / "ckpt")
    resumed = Trainer(load_model(tmp_path / "ckpt"), tokens, config)
    resumed.load_state(tmp_path / "ckpt")
    assert resumed.step == 3
    resumed.train(progress=False)

    assert [r["loss"] for r in first.history + resumed.history] == \
        [r["loss"] for r in straight.history]
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    saved = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())
    assert saved["step"] == 3 and saved["config"]["p_max"] == 0.5


def test_seed_determinism_and_lr_schedule(tmp_path):
    tokens, vocab = _sample_tokens()
    runs = [Trainer(new_model(TINY | {"vocab_size": vocab}, seed=2), tokens,
                    _config(tmp_path, steps=4, warmup_steps=2)).train(progress=False)
            for _ in range(2)]
    assert runs[0] == runs[1]
    lrs = [r["lr"] for r in runs[0]]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)
    assert lrs[2] > lrs[3] >= 3e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint saved after one step: (directory, the model, the tokens, the config)."""
    path = tmp_path_factory.mktemp("checkpoint")
    tokens, vocab = _sample_tokens()
    config = _config(path, steps=2)
    trainer = Trainer(new_model(TINY | {"vocab_size": vocab}, seed=0), tokens, config)
    trainer.train(steps=1, progress=False)
    trainer.save(path)
    return path, tokens, config


def _resume(checkpoint, path):
    _, tokens, config = checkpoint
    Trainer(load_model(checkpoint[0]), tokens, config).load_state(path)


@pytest.mark.parametrize("step", [-5, "3", True, 1.5, None])
def test_trainer_state_step_checked(checkpoint, tmp_path, step):
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (tmp_path / name).write_bytes((checkpoint[0] / name).read_bytes())
    meta = json.loads((tmp_path / "trainer_state.json").read_text())
    meta["step"] = step
    if step is None:
        del meta["step"]
    (tmp_path / "trainer_state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"trainer_state.json step: expected an integer >= 0"):
        _resume(checkpoint, tmp_path)
    meta["step"] = 1  # the control
    (tmp_path / "trainer_state.json").write_text(json.dumps(meta))
    _resume(checkpoint, tmp_path)


@pytest.mark.parametrize("name", ["trainer_state.json", "trainer_state.safetensors"])
def test_trainer_state_fifo_refused(checkpoint, tmp_path, no_hang, name):
    for other in ("trainer_state.json", "trainer_state.safetensors"):
        if other != name:
            (tmp_path / other).write_bytes((checkpoint[0] / other).read_bytes())
    os.mkfifo(tmp_path / name)
    with pytest.raises(ValueError, match=f"{name}: expected a regular file"):
        _resume(checkpoint, tmp_path)


@pytest.mark.parametrize("update, needle", [
    ({"dim": 1e9}, "model_config dim: expected an integer"),
    ({"dim": True}, "model_config dim: expected an integer"),
    ({"n_layers": 0}, "model_config n_layers: expected an integer"),
    ({"max_seq_len": 2 ** 40}, "model_config max_seq_len"),
    ({"dim": 10 ** 9}, "model_config: expected a model whose training state"),
    ({"n_layers": 2 ** 31}, "model_config: expected a model whose training state"),
    ({"hidden_dim": 10 ** 12}, "model_config: expected a model whose training state"),
    ({"dimm": 32}, "model_config: expected keys among")])
def test_model_config_bombs_refused_before_allocating(monkeypatch, update, needle):
    from layerskip_kernels.training import trainer
    monkeypatch.setattr(trainer, "Llama", lambda config: pytest.fail("allocated"))
    with pytest.raises(ValueError, match=needle):
        new_model(TINY | update)


def test_load_config_json_toml_and_unknown_keys(tmp_path):
    (tmp_path / "c.toml").write_text('data = "x.txt"\nsteps = 5\nbetas = [0.9, 0.99]\n'
                                     '[model_config]\ndim = 32\n')
    c = load_config(tmp_path / "c.toml", steps=7)
    assert (c.data, c.steps, c.betas, c.model_config) == ("x.txt", 7, (0.9, 0.99), {"dim": 32})
    (tmp_path / "c.json").write_text(json.dumps({"data": "x.txt", "stepz": 3}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(tmp_path / "c.json")


def test_train_command_resumes(tmp_path):
    """`layerskip train --config`, run as cli.main runs commands (under inference_mode)."""
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 60)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"data": str(text), "tokenizer": str(tmp_path / "tokenizer.json"), "seq_len": 16,
              "batch_size": 4, "steps": 4, "warmup_steps": 1, "save_every": 2,
              "output": str(tmp_path / "out"), "model_config": TINY | {"vocab_size": 300}}
    (tmp_path / "train.json").write_text(json.dumps(config))
    parser = argparse.ArgumentParser()
    add_training_commands(parser.add_subparsers(dest="command"))
    for steps in (2, 4):
        args = parser.parse_args(["train", "--config", str(tmp_path / "train.json"),
                                  "--steps", str(steps), "--quiet"])
        with torch.inference_mode():
            args.run(args)
        assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["step"] == steps
    model = load_model(tmp_path / "out")
    assert isinstance(model, Llama) and model.config.n_layers == 4
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_exit_weights_replace_the_scale_kind():
    w = exit_scales(4, "sum", weights=[0.0, 2.0, 0.0, 2.0])
    assert w.tolist() == [0.0, 0.5, 0.0, 0.5]
    assert exit_scales(4, "sum", [True, False, True, True], [1.0, 1.0, 1.0, 1.0]).tolist() == [
        1 / 3, 0.0, 1 / 3, 1 / 3]
    for bad in ([1.0, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]):
        with pytest.raises(ValueError, match="exit weights"):
            exit_scales(4, "sum", weights=bad)
