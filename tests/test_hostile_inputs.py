"""Hostile and broken files given to the loaders: each is refused with one ValueError or
FileNotFoundError line naming the file or key, before anything is opened or allocated that
could hang or explode; each refusal has a control that loads. Nothing here may hang: a
regression that blocks on a FIFO or loops forever fails after a timeout (no_hang)."""
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoint import shard, tiny_hf_dir, weights, write_index

import layerskip_kernels as lsk


@pytest.fixture
def no_hang(tmp_path):
    """A regression must fail, not hang. After 30 s, SIGALRM raises in a Python loop, and a
    helper process opens every FIFO under tmp_path for writing, so that a reader blocked in
    open() inside native code (holding the GIL, retrying on EINTR) goes on to an EOF."""
    writer = subprocess.Popen(["sh", "-c", 'sleep 30; for f in $(find "$0" -type p); do '
                               ': > "$f"; done', str(tmp_path)], start_new_session=True)

    def hung(*_):
        raise TimeoutError("hung: a FIFO was opened or a loop never ended")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    os.killpg(writer.pid, signal.SIGKILL)
    writer.wait()


def refused(error, *texts):
    """The message is one line and names each of texts."""
    message = str(error.value)
    assert "\n" not in message, message
    for text in texts:
        assert str(text) in message, (text, message)


@pytest.fixture
def sharded(tmp_path):
    """A tiny two-shard HF directory: (directory, weight_map, expected weights)."""
    hf_dir = tiny_hf_dir(tmp_path / "model")
    expected = weights(lsk.load_model(hf_dir))
    return hf_dir, shard(hf_dir), expected


def test_sharded_control(sharded):
    hf_dir, _, expected = sharded
    loaded = weights(lsk.load_model(hf_dir))
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


# ---------------------------------------------------------------- shard confinement


def point_shard_at(hf_dir, weight_map, name):
    """Move every tensor of the second shard to `name` in the index."""
    write_index(hf_dir, {k: name if v == "model-2.safetensors" else v
                         for k, v in weight_map.items()})


@pytest.mark.parametrize("name", ["../outside.safetensors", "{outside}", "/dev/stdin",
                                  "sub/../../outside.safetensors", "model-2.bin", "",
                                  "model-2.safetensors\0x"])
def test_shard_names_outside_the_directory_refused(sharded, tmp_path, no_hang, name):
    """../, absolute paths and devices are refused by name, though ../outside.safetensors is a
    valid shard that would load."""
    hf_dir, weight_map, _ = sharded
    shutil.copy(hf_dir / "model-2.safetensors", tmp_path / "outside.safetensors")
    name = name.format(outside=tmp_path / "outside.safetensors")
    point_shard_at(hf_dir, weight_map, name)
    with pytest.raises(ValueError, match="weight_map") as error:
        lsk.load_model(hf_dir)
    refused(error, "model.safetensors.index.json", repr(name))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/dev/stdin", "/dev/zero"])
def test_tensor_parallel_reader_confines_shards_too(sharded, tmp_path, no_hang, name):
    """load_model(tp=N) reads slices through parallel.SafetensorsSource: the same checks of
    the index as the whole-model loader, and of each shard's tensors against it."""
    from contextlib import ExitStack

    from layerskip_kernels.model.parallel import SafetensorsSource
    hf_dir, weight_map, expected = sharded
    with ExitStack() as stack:  # control
        assert set(SafetensorsSource(hf_dir, stack).shapes()) == {
            k.removeprefix("model.") for k in weight_map}
    shutil.copy(hf_dir / "model-2.safetensors", tmp_path / "outside.safetensors")
    point_shard_at(hf_dir, weight_map, name)
    with ExitStack() as stack, pytest.raises(ValueError, match="weight_map") as error:
        SafetensorsSource(hf_dir, stack)
    refused(error, repr(name))
    write_index(hf_dir, dict(weight_map, **{"model.extra.weight": "model-1.safetensors"}))
    with ExitStack() as stack, pytest.raises(ValueError, match="index lists") as error:
        SafetensorsSource(hf_dir, stack)
    refused(error, "model.extra.weight")


@pytest.mark.parametrize("target", ["{outside}", "/dev/stdin", "/dev/zero"])
def test_shard_symlinks_out_of_the_directory_refused(sharded, tmp_path, no_hang, target):
    hf_dir, weight_map, _ = sharded
    outside = shutil.copy(hf_dir / "model-2.safetensors", tmp_path / "outside.safetensors")
    (hf_dir / "link.safetensors").symlink_to(target.format(outside=outside))
    point_shard_at(hf_dir, weight_map, "link.safetensors")
    with pytest.raises(ValueError, match="weight_map.*resolves to") as error:
        lsk.load_model(hf_dir)
    refused(error, "'link.safetensors'")


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink to a fifo"])
def test_shards_that_are_no_regular_file_refused(sharded, no_hang, kind):
    hf_dir, weight_map, _ = sharded
    special = hf_dir / ("fifo.safetensors" if kind != "directory" else "dir.safetensors")
    os.mkfifo(special) if kind != "directory" else special.mkdir()
    name = special.name
    if kind == "symlink to a fifo":
        (hf_dir / "link.safetensors").symlink_to(special.name)
        name = "link.safetensors"
    point_shard_at(hf_dir, weight_map, name)
    with pytest.raises(ValueError, match="regular file") as error:
        lsk.load_model(hf_dir)
    refused(error, repr(name))


def test_shard_symlink_loop(sharded):
    hf_dir, weight_map, _ = sharded
    (hf_dir / "loop.safetensors").symlink_to("loop.safetensors")
    point_shard_at(hf_dir, weight_map, "loop.safetensors")
    with pytest.raises((ValueError, FileNotFoundError), match="loop.safetensors") as error:
        lsk.load_model(hf_dir)
    refused(error)


def test_missing_shard(sharded):
    hf_dir, weight_map, _ = sharded
    point_shard_at(hf_dir, weight_map, "model-3.safetensors")
    with pytest.raises(FileNotFoundError, match="model-3.safetensors"):
        lsk.load_model(hf_dir)


@pytest.mark.parametrize("index", [
    [1, 2], {"metadata": {}}, {"weight_map": []}, {"weight_map": {}},
    {"weight_map": {"model.norm.weight": 3}}, {"weight_map": "model.safetensors"}])
def test_index_structure(sharded, index):
    hf_dir = sharded[0]
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="index") as error:
        lsk.load_model(hf_dir)
    refused(error, "model.safetensors.index.json")


def test_index_invalid_json(sharded):
    hf_dir = sharded[0]
    (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(ValueError, match="invalid JSON") as error:
        lsk.load_model(hf_dir)
    refused(error, "model.safetensors.index.json")


def test_duplicate_tensor_across_shards_refused(sharded):
    """A tensor in two shards: the index names one, the other holds an unlisted tensor."""
    hf_dir, weight_map, _ = sharded
    first = load_file(hf_dir / "model-1.safetensors")
    key = next(k for k, v in weight_map.items() if v == "model-2.safetensors")
    copy = torch.zeros_like(load_file(hf_dir / "model-2.safetensors")[key])
    save_file(dict(first, **{key: copy}), hf_dir / "model-1.safetensors")
    with pytest.raises(ValueError, match="unlisted") as error:
        lsk.load_model(hf_dir)
    refused(error, "model-1.safetensors", key)


def test_index_lists_a_tensor_its_shard_lacks(sharded):
    hf_dir, weight_map, _ = sharded
    write_index(hf_dir, dict(weight_map, **{"model.norm.weight": "model-1.safetensors"})
                if weight_map["model.norm.weight"] == "model-2.safetensors"
                else dict(weight_map, **{"model.norm.weight": "model-2.safetensors"}))
    with pytest.raises(ValueError, match="missing") as error:
        lsk.load_model(hf_dir)
    refused(error, "model.norm.weight")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_fixed_names_that_are_fifos_refused(tmp_path, no_hang, name):
    hf_dir = tiny_hf_dir(tmp_path / "model")
    (hf_dir / name).unlink()
    os.mkfifo(hf_dir / name)
    with pytest.raises(ValueError, match="regular file") as error:
        lsk.load_model(hf_dir)
    refused(error, hf_dir / name)


@pytest.mark.parametrize("cut", [4, 100, 10_000])
def test_truncated_safetensors(tmp_path, cut):
    hf_dir = tiny_hf_dir(tmp_path / "model")
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(ValueError, match="safetensors") as error:
        lsk.load_model(hf_dir)
    refused(error, hf_dir / "model.safetensors")


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_refused(tmp_path, dtype, value):
    hf_dir = tiny_hf_dir(tmp_path / "model", dtype=dtype)
    state = load_file(hf_dir / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    state[name][3, 5] = value
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(ValueError, match="finite") as error:
        lsk.load_model(hf_dir)
    refused(error, name)
    state[name][3, 5] = 1.0
    save_file(state, hf_dir / "model.safetensors")
    assert lsk.load_model(hf_dir, dtype=dtype).config.n_layers == 2


def test_integer_weights_refused(tmp_path):
    hf_dir = tiny_hf_dir(tmp_path / "model")
    state = load_file(hf_dir / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].int()
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(ValueError, match="float32") as error:
        lsk.load_model(hf_dir)
    refused(error, "model.norm.weight", "int32")


def test_wrong_shape_is_one_line(tmp_path):
    hf_dir = tiny_hf_dir(tmp_path / "model")
    state = load_file(hf_dir / "model.safetensors")
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(ValueError, match="norm.weight") as error:
        lsk.load_model(hf_dir)
    refused(error, "checkpoint weights")


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("update, key", [
    ({"rms_norm_eps": 0}, "rms_norm_eps"), ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"), ({"rms_norm_eps": math.nan}, "rms_norm_eps"),
    ({"rope_theta": 0}, "rope_theta"), ({"rope_theta": -1.0}, "rope_theta"),
    ({"rope_theta": True}, "rope_theta"),
    ({"hidden_size": 0}, "hidden_size"), ({"hidden_size": -32}, "hidden_size"),
    ({"hidden_size": 32.0}, "hidden_size"), ({"hidden_size": "32"}, "hidden_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"), ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": None}, "vocab_size"), ({"intermediate_size": -1}, "intermediate_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_attention_heads": 3, "head_dim": None}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"), ({"head_dim": 7}, "head_dim"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings"),
    ({"bos_token_id": 64}, "bos_token_id"), ({"bos_token_id": -1}, "bos_token_id"),
    ({"bos_token_id": "1"}, "bos_token_id"), ({"eos_token_id": [2, 64]}, "eos_token_id"),
    ({"eos_token_id": "2"}, "eos_token_id"), ({"eos_token_id": True}, "eos_token_id"),
    ({"rope_scaling": "yes"}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "llama3"}}, "factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                       "high_freq_factor": 2.0, "original_max_position_embeddings": 32}},
     "high_freq_factor"),
    ({"max_position_embeddings": 2 ** 40}, "max_position_embeddings"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"max_position_embeddings": True}, "max_position_embeddings"),
    ({"layerskip": {"exit_layer": 0}}, "exit_layer"),
    ({"layerskip": {"exit_layer": 3}}, "exit_layer"),
    ({"layerskip": {"exit_layer": 2}}, "exit_layer"),  # = L: no layer left to verify with
    ({"layerskip": {"exit_layer": 1, "num_speculations": 0}}, "num_speculations"),
    ({"layerskip": [1, 2]}, "layerskip"), ({"model_type": "mistral"}, "model_type"),
    # keys that change the maths, with a value the model does not implement
    ({"hidden_act": "gelu"}, "hidden_act"), ({"hidden_act": "relu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
    ({"mlp_bias": 1}, "mlp_bias"), ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"rope_scaling": {"rope_type": None, "factor": 8.0}}, "rope_type"),
    ({"rope_scaling": {"type": None, "factor": 8.0}}, "type"),
    ({"rope_scaling": {"factor": 8.0}}, "factor"),  # transformers: default RoPE, factor dropped
    ({"rope_scaling": {"rope_type": "default", "factor": 8.0}}, "factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.25}}, "partial_rotary_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}, "low_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 32}}, "high_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}, "factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0, "original_max_position_embeddings": 32}},
     "high_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                       "beta_fast": 32}}, "beta_fast"),
])
def test_nonsensical_config_refused(tmp_path, update, key):
    """Refused with the key named, before weights or RoPE tables are allocated (2^40 positions
    would take terabytes)."""
    hf_dir = tiny_hf_dir(tmp_path / "model")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(config, **update)))
    with pytest.raises(ValueError, match=re.escape(key)) as error:
        lsk.load_model(hf_dir)
    refused(error, hf_dir / "config.json")


def test_config_control_with_every_optional_value(tmp_path):
    hf_dir = tiny_hf_dir(tmp_path / "model")
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(rms_norm_eps=1, rope_theta=500000, max_position_embeddings=2 ** 24,
                  eos_token_id=[2, 63], bos_token_id=0, layerskip={"exit_layer": 1},
                  hidden_act="swish", attention_bias=False, mlp_bias=None, pretraining_tp=2,
                  attention_dropout=0.1, use_cache=False, pad_token_id=0, initializer_range=1,
                  partial_rotary_factor=1.0, quantization_config=None,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    del config["head_dim"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    c = lsk.load_model(hf_dir).config
    assert (c.norm_eps, c.eos_token_id, c.exit_layer, c.head_dim, c.n_kv_heads) == (
        1.0, [2, 63], 1, 8, 2)


@pytest.mark.parametrize("update, key", [
    ({"num_hidden_layers": 2 ** 31}, "num_hidden_layers"),
    ({"num_hidden_layers": 200_000}, "num_hidden_layers"),
    ({"num_hidden_layers": 1}, "num_hidden_layers"),
    ({"hidden_size": 2 ** 30, "head_dim": 8}, "hidden_size"),
    ({"intermediate_size": 2 ** 40}, "intermediate_size"),
    ({"vocab_size": 2 ** 40}, "vocab_size"),
    ({"num_attention_heads": 2 ** 20, "head_dim": 8}, "num_attention_heads"),
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ({"head_dim": 2 ** 20}, "head_dim"),
])
def test_config_bounded_by_the_checkpoint_before_building(tmp_path, monkeypatch, update, key):
    """Sizes a config asks for are compared with the checkpoint's tensors, read from the
    safetensors headers, before any module is built or any tensor read (2^31 layers would be
    built for minutes, a vocabulary of 2^40 rows allocated)."""
    from layerskip_kernels.model import checkpoint

    def never(*args, **kwargs):
        raise AssertionError("built or read before the config was bounded")
    hf_dir = tiny_hf_dir(tmp_path / "model")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(config, **update)))
    monkeypatch.setattr(checkpoint, "Llama", never)
    monkeypatch.setattr(checkpoint, "_read_safetensors", never)
    with pytest.raises(ValueError, match=re.escape(key)) as error:
        lsk.load_model(hf_dir)
    refused(error, hf_dir / "config.json")


def test_untied_config_without_lm_head_refused(tmp_path):
    """transformers would start from a random lm_head; tying it silently decoded wrongly."""
    hf_dir = tiny_hf_dir(tmp_path / "model")
    assert not json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"]
    state = load_file(hf_dir / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(ValueError, match="tie_word_embeddings") as error:
        lsk.load_model(hf_dir)
    refused(error, "lm_head.weight")
    config = json.loads((hf_dir / "config.json").read_text())  # control: tied, it loads
    (hf_dir / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    model = lsk.load_model(hf_dir)
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("text", ['{"vocab_size": ', "[1, 2]", "\xff\xfe"])
def test_config_json_not_an_object(tmp_path, text):
    hf_dir = tiny_hf_dir(tmp_path / "model")
    (hf_dir / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="JSON object") as error:
        lsk.load_model(hf_dir)
    refused(error, hf_dir / "config.json")


# ---------------------------------------------------------------- llama2.c checkpoints


def write_llama2c(path, dim=16, hidden=24, layers=2, heads=4, kv_heads=2, vocab=32, seq_len=8,
                  size=None, fill=0.01):
    """A llama2.c version-0 file of that header, its weights all `fill` (size: float count)."""
    kv = kv_heads * (dim // heads) if heads and kv_heads and dim % heads == 0 else 0
    if size is None:
        size = (abs(vocab) * dim * (1 + (vocab < 0)) + layers * (2 * dim + 2 * dim * dim
                + 2 * kv * dim + 3 * hidden * dim) + dim + seq_len * (dim // heads))
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len)
    path.write_bytes(header + struct.pack("<f", fill) * size)
    return path


@pytest.mark.parametrize("vocab", [32, -32])
def test_llama2c_control(tmp_path, vocab):
    c = lsk.load_model(write_llama2c(tmp_path / "m.bin", vocab=vocab)).config
    assert (c.dim, c.n_layers, c.n_kv_heads, c.vocab_size, c.tie_embeddings) == (
        16, 2, 2, 32, vocab > 0)


@pytest.mark.parametrize("header, field", [
    ({"dim": 0}, "dim"), ({"dim": -16}, "dim"), ({"hidden": 0}, "hidden_dim"),
    ({"layers": -1}, "n_layers"), ({"heads": 0}, "n_heads"), ({"heads": 3}, "n_heads"),
    ({"heads": 16, "kv_heads": 16}, "n_heads"), ({"kv_heads": 3}, "n_kv_heads"),
    ({"kv_heads": 0}, "n_kv_heads"), ({"vocab": 0}, "vocab_size"), ({"seq_len": 0}, "seq_len"),
    ({"seq_len": 2 ** 30}, "seq_len")])
def test_llama2c_header_refused(tmp_path, header, field):
    path = write_llama2c(tmp_path / "m.bin", size=64, **header)
    with pytest.raises(ValueError, match=f"header {field}") as error:
        lsk.load_model(path)
    refused(error, path)


def test_llama2c_size_checked_before_reading(tmp_path):
    """A header promising more than the file holds: refused by size, not read."""
    path = write_llama2c(tmp_path / "m.bin", size=64, dim=4096, layers=32, heads=32, kv_heads=8,
                         hidden=11008, vocab=32000, seq_len=4096)
    with pytest.raises(ValueError, match="bytes after the header") as error:
        lsk.load_model(path)
    refused(error, path)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_llama2c_non_finite_refused(tmp_path, value):
    with pytest.raises(ValueError, match="finite"):
        lsk.load_model(write_llama2c(tmp_path / "m.bin", fill=value))


@pytest.mark.parametrize("start", [b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95"])
def test_pickle_never_loaded(tmp_path, start):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(start + bytes(200))
    with pytest.raises(ValueError, match="pickle") as error:
        lsk.load_model(path)
    refused(error, path)


def test_llama2c_fifo_refused(tmp_path, no_hang):
    os.mkfifo(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="regular file"):
        lsk.load_model(tmp_path / "model.bin")


# ---------------------------------------------------------------- llama2.c tokenizers


def tokenizer_bytes(pieces=(b" ", b"a", b"b", b"ab"), scores=None, max_length=None):
    """A llama2.c tokenizer file: <unk>, BOS, EOS, the 256 byte pieces, then `pieces`."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)] + list(
        pieces)
    scores = [0.0] * 259 + list(scores or [-float(i) for i in range(len(pieces) - 259)])
    max_length = max(len(p) for p in pieces) if max_length is None else max_length
    return struct.pack("<I", max_length) + b"".join(
        struct.pack("<fi", s, len(p)) + p for s, p in zip(scores, pieces))


def piece(length, text=b"", score=0.0):
    return struct.pack("<fi", score, length) + text


TOKENIZER_CASES = {  # name: (file bytes, what the error says)
    "negative length": (tokenizer_bytes() + piece(-8), "length"),  # the old parser hung on it
    "very negative length": (tokenizer_bytes() + piece(-1_000_000), "length"),
    "length over max": (tokenizer_bytes() + piece(7, b"abcdefg"), "max_token_length"),
    "length past the end": (tokenizer_bytes() + piece(5, b"ab"), "bytes of text"),
    "trailing bytes": (tokenizer_bytes() + b"\x00\x00\x00", "trailing bytes"),
    "NaN score": (tokenizer_bytes() + piece(1, b"c", score=math.nan), "finite score"),
    "max length 0": (tokenizer_bytes(max_length=0), "max_token_length"),
    "max length huge": (struct.pack("<I", 2 ** 32 - 1) + tokenizer_bytes()[4:],
                        "max_token_length"),
    "2 bytes": (b"\x07\x00", "max_token_length"), "empty": (b"", "max_token_length"),
    "3 pieces": (tokenizer_bytes()[:4 + 13 + 13 + 14], "byte pieces"),
    "bad byte piece": (tokenizer_bytes().replace(b"<0x41>", b"<0x4X>"), "byte pieces"),
    "no space piece": (tokenizer_bytes(pieces=(b"a", b"b")), "' '"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_llama2c_tokenizer_file_refused(tmp_path, no_hang, case):
    data, what = TOKENIZER_CASES[case]
    path = tmp_path / "tok.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(what)) as error:
        lsk.load_tokenizer(path)
    refused(error, path)


def test_llama2c_tokenizer_control(tmp_path):
    path = tmp_path / "tok.bin"
    path.write_bytes(tokenizer_bytes())
    tok = lsk.load_tokenizer(path)
    assert tok.vocab_size == 263
    assert tok.encode("ab ba") == [1, 259, 262, 259, 261, 260]  # " ", "ab", " ", "b", "a"
    assert tok.decode(tok.encode("ab ba")) == "ab ba"


@pytest.mark.parametrize("name", ["tok.bin", "tokenizer.json"])
def test_tokenizer_fifo_refused(tmp_path, no_hang, name):
    os.mkfifo(tmp_path / name)
    with pytest.raises(ValueError, match="regular file"):
        lsk.load_tokenizer(tmp_path / name)


@pytest.mark.parametrize("ids", [[1, 263], [-1], [5, 10 ** 9]])
def test_llama2c_decode_out_of_range(tmp_path, ids):
    path = tmp_path / "tok.bin"
    path.write_bytes(tokenizer_bytes())
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 263\)"):
        lsk.load_tokenizer(path).decode(ids)
