"""Checkpoint loading: llama2.c stories260K against its HF export (read by us and by
transformers), greedy output against llama2.c's run.c, the loading conventions (paths, HF ids
in the local cache, dtypes, devices) and every loader error. Hostile files: test_hostile_inputs."""
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import layerskip_kernels as lsk
from layerskip_kernels.model.checkpoint import DEFAULT_MODEL, LLAMA2C_MAGIC

RUN_C = json.loads((Path(__file__).parent / "data" / "run_c_stories260K.json").read_text())
REL_TOL = 1e-4  # max |ours - reference| / max |reference|, float32


def rel_err(ours, ref):
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def write_hf_directory(path, out):
    """Our HF export of a checkpoint: config.json + model.safetensors."""
    lsk.model.save_hf_directory(lsk.load_model(path), out)
    return out


TINY = lsk.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       hidden_dim=48, max_seq_len=64, bos_token_id=1, eos_token_id=[2])


def tiny_hf_dir(out, seed=0, dtype=torch.float32):
    """A random tiny Llama saved as an HF directory (config.json + model.safetensors)."""
    torch.manual_seed(seed)
    model = lsk.Llama(lsk.LlamaConfig(**vars(TINY))).to(dtype)
    lsk.model.save_hf_directory(model, out)
    return out


def weights(model):
    """Loaded weights by HF name (one place to adapt if the model fuses its projections)."""
    return model.state_dict()


def shard(hf_dir, names=("model-1.safetensors", "model-2.safetensors")):
    """Split model.safetensors into two shards and an index; returns {tensor: shard name}."""
    state = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {k: names[i * 2 // len(keys)] for i, k in enumerate(keys)}
    for name in names:
        (hf_dir / name).parent.mkdir(exist_ok=True)
        save_file({k: state[k] for k in keys if weight_map[k] == name}, hf_dir / name)
    write_index(hf_dir, weight_map)
    return weight_map


def write_index(hf_dir, weight_map):
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---------------------------------------------------------------- stories260K


@pytest.mark.parametrize("shape", [(1, 1), (3, 37)])
def test_stories_llama2c_equals_hf_export(stories_path, tmp_path, generator, shape):
    transformers = pytest.importorskip("transformers")
    ours_bin = lsk.load_model(stories_path)
    c = ours_bin.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.hidden_dim) == (
        64, 5, 8, 4, 512, 172)
    assert c.tie_embeddings and ours_bin.lm_head.weight is ours_bin.embed_tokens.weight
    hf_dir = write_hf_directory(stories_path, tmp_path / "hf")
    assert {p.name for p in hf_dir.iterdir()} == {"config.json", "model.safetensors"}
    ours_dir = lsk.load_model(hf_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, shape, generator=generator)
    with torch.no_grad():
        ref = hf(tokens).logits
        from_bin, from_dir = ours_bin(tokens), ours_dir(tokens)
    assert ref.abs().max() > 1  # real logits, not a zero model
    assert rel_err(from_bin, ref) < REL_TOL
    assert rel_err(from_dir, ref) < REL_TOL
    torch.testing.assert_close(from_dir, from_bin, rtol=0, atol=0)  # same tensors, same math


def test_stories_pair_permutation_matters(stories_path, generator):
    """Control for the comparison above: without the q/k row permutation that turns
    llama2.c's adjacent-pair RoPE into half rotation, logits change."""
    model = lsk.load_model(stories_path)
    tokens = torch.randint(0, 512, (2, 9), generator=generator)
    with torch.no_grad():
        ref = model(tokens)
        for layer in model.layers:  # fused rows: 8 q heads, then 4 k heads, of head_dim 8
            w = layer.self_attn.qkv_proj.weight
            for rows in (w[:64], w[64:96]):
                rows.copy_(rows.view(-1, 2, 4, 64).transpose(1, 2).reshape(rows.shape))
        assert rel_err(model(tokens), ref) > 1e-2


@pytest.mark.parametrize("case", [0, 1])
def test_stories_greedy_matches_run_c(stories_path, stories_tokenizer_path, case):
    expected = RUN_C["cases"][case]
    model = lsk.load_model(stories_path)
    tok = lsk.load_tokenizer(stories_tokenizer_path)
    prompt = tok.encode(expected["prompt"]) if expected["prompt"] else [tok.bos_id]
    assert prompt == expected["prompt_ids"]
    res = lsk.generate(model, [prompt], max_new_tokens=len(expected["new_tokens"]))
    assert res.tokens[0] == expected["new_tokens"]
    text = tok.decode(prompt + res.tokens[0])
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
    assert text == expected["prompt"] + expected["text"]


# ---------------------------------------------------------------- errors, each with a control


def test_missing_path(tmp_path, stories_path):
    missing = tmp_path / "nowhere" / "model.bin"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        lsk.load_model(missing)
    assert lsk.load_model(stories_path).config.n_layers == 5


def test_unknown_format(tmp_path, stories_path):
    path = tmp_path / "model.txt"
    shutil.copy(stories_path, path)
    with pytest.raises(ValueError, match="unknown format"):
        lsk.load_model(path)
    assert lsk.load_model(shutil.copy(stories_path, tmp_path / "model.bin")).config.dim == 64


def test_directory_without_config(tmp_path, stories_path):
    hf_dir = write_hf_directory(stories_path, tmp_path / "hf")
    (hf_dir / "config.json").rename(tmp_path / "config.json.bak")
    with pytest.raises(ValueError, match="config.json"):
        lsk.load_model(hf_dir)
    (tmp_path / "config.json.bak").rename(hf_dir / "config.json")
    assert lsk.load_model(hf_dir).config.n_layers == 5
    assert lsk.load_model(hf_dir / "config.json").config.n_layers == 5
    assert lsk.load_model(hf_dir / "model.safetensors").config.n_layers == 5


def test_directory_without_safetensors(tmp_path, stories_path):
    hf_dir = write_hf_directory(stories_path, tmp_path / "hf")
    (hf_dir / "model.safetensors").rename(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        lsk.load_model(hf_dir)


@pytest.mark.parametrize("key, value, match", [
    ("model_type", "mistral", "model_type"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type"),
])
def test_unsupported_hf_config(tmp_path, stories_path, key, value, match):
    hf_dir = write_hf_directory(stories_path, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(config, **{key: value})))
    with pytest.raises(ValueError, match=match):
        lsk.load_model(hf_dir)


@pytest.mark.parametrize("version", [1, 2])
def test_llama2c_new_version_refused(tmp_path, stories_path, version):
    path = tmp_path / f"v{version}.bin"
    path.write_bytes(struct.pack("<Ii", LLAMA2C_MAGIC, version) + bytes(248))
    with pytest.raises(ValueError, match=f"version {version}"):
        lsk.load_model(path)
    assert lsk.load_model(stories_path).config.vocab_size == 512


@pytest.mark.parametrize("cut", [4, 1001, 20])
def test_truncated_llama2c(tmp_path, stories_path, cut):
    """Drop one float (4 bytes), drop a byte count that is no multiple of 4 (1001), or keep
    less than the 28-byte header (20)."""
    data = stories_path.read_bytes()
    path = tmp_path / "truncated.bin"
    path.write_bytes(data[:cut] if cut == 20 else data[:-cut])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        lsk.load_model(path)
    path.write_bytes(data)
    assert lsk.load_model(path).config.n_layers == 5


@pytest.mark.parametrize("dtype", [torch.int8, "float64", torch.float64])
def test_unsupported_dtype(stories_path, dtype):
    with pytest.raises(ValueError, match="dtype"):
        lsk.load_model(stories_path, dtype=dtype)
    with pytest.raises(ValueError, match=re.escape(str(dtype))):
        lsk.load_model(stories_path, dtype=dtype)


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16),
                                             (torch.float16, torch.float16),
                                             ("float32", torch.float32)])
def test_supported_dtype(stories_path, dtype, expected):
    model = lsk.load_model(stories_path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("dtype", ["fp8", "Float32", None])
def test_unknown_dtype_name(tmp_path, dtype):
    with pytest.raises(ValueError, match="dtype.*bf16.*auto"):
        lsk.load_model(tiny_hf_dir(tmp_path), dtype=dtype)


# ---------------------------------------------------------------- conventions: dtype aliases


@pytest.mark.parametrize("dtype, expected", [
    ("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
    ("half", torch.float16), ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_dtype_aliases(tmp_path, dtype, expected):
    model = lsk.load_model(tiny_hf_dir(tmp_path), dtype=dtype)
    assert {t.dtype for t in weights(model).values()} == {expected}


@pytest.mark.parametrize("declared, stored, expected", [
    ("bfloat16", torch.float32, torch.bfloat16),  # config.json's torch_dtype wins
    (None, torch.float16, torch.float16),  # no torch_dtype: the weights' dtype
    ("float32", torch.bfloat16, torch.float32)])
def test_auto_dtype_from_hf_directory(tmp_path, declared, stored, expected):
    hf_dir = tiny_hf_dir(tmp_path, dtype=stored)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(config, torch_dtype=declared)))
    model = lsk.load_model(hf_dir, dtype="auto")
    assert {t.dtype for t in weights(model).values()} == {expected}


def test_auto_dtype_transformers_key_and_refusal(tmp_path):
    """transformers 5 writes "dtype"; a dtype we cannot run is refused, naming it."""
    hf_dir = tiny_hf_dir(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    del config["torch_dtype"]
    (hf_dir / "config.json").write_text(json.dumps(dict(config, dtype="float16")))
    assert weights(lsk.load_model(hf_dir, dtype="auto"))["norm.weight"].dtype == torch.float16
    (hf_dir / "config.json").write_text(json.dumps(dict(config, dtype="float64")))
    with pytest.raises(ValueError, match="torch_dtype.*float64"):
        lsk.load_model(hf_dir, dtype="auto")
    assert weights(lsk.load_model(hf_dir))["norm.weight"].dtype == torch.float32


def test_auto_dtype_llama2c_is_float32(stories_path):
    model = lsk.load_model(stories_path, dtype="auto")
    assert {t.dtype for t in weights(model).values()} == {torch.float32}


# ---------------------------------------------------------------- conventions: devices


@pytest.mark.parametrize("device", ["cuda:{n}", "tpu", "cuda:x", "mps", 3.5, "cpu, cuda"])
def test_unavailable_or_unknown_device_refused_before_reading(tmp_path, device):
    """A nonexistent path: the device error must come first, before any file is touched."""
    device = device.format(n=torch.cuda.device_count()) if isinstance(device, str) else device
    with pytest.raises(ValueError, match="device") as error:
        lsk.load_model(tmp_path / "nowhere", device=device)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0"])
def test_cpu_devices(tmp_path, device):
    model = lsk.load_model(tiny_hf_dir(tmp_path), device=device)
    assert {t.device.type for t in weights(model).values()} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 0)])
def test_cuda_devices(tmp_path, device):
    model = lsk.load_model(tiny_hf_dir(tmp_path), device=device)
    assert {t.device.type for t in weights(model).values()} == {"cuda"}


# ---------------------------------------------------------------- conventions: paths


def test_named_safetensors_file_is_the_one_loaded(tmp_path):
    """dir/other.safetensors loads that file (with dir/config.json), not dir/model.safetensors."""
    hf_dir = tiny_hf_dir(tmp_path)
    other = tiny_hf_dir(tmp_path / "other", seed=1) / "model.safetensors"
    shutil.copy(other, hf_dir / "other.safetensors")
    expected = load_file(other)["model.embed_tokens.weight"]
    loaded = weights(lsk.load_model(hf_dir / "other.safetensors"))["embed_tokens.weight"]
    assert torch.equal(loaded, expected)
    default = weights(lsk.load_model(hf_dir))["embed_tokens.weight"]
    assert not torch.equal(default, expected)  # control: the two files differ
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        lsk.load_model(hf_dir / "absent.safetensors")


def test_index_file_and_config_json_name_their_directory(tmp_path):
    hf_dir = tiny_hf_dir(tmp_path)
    expected = weights(lsk.load_model(hf_dir))
    shard(hf_dir)
    for path in (hf_dir, hf_dir / "config.json", hf_dir / "model.safetensors.index.json"):
        loaded = weights(lsk.load_model(path))
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("path", [3, b"dir", ["a"]])
def test_path_of_the_wrong_type(path):
    with pytest.raises(ValueError, match="model path"):
        lsk.load_model(path)


# ---------------------------------------------------------------- conventions: HF model ids


def fake_hf_cache(monkeypatch, cache, repo_id, files):
    """The HF hub cache layout: blobs, a snapshot of symlinks into them, refs/main. files maps
    a name in the snapshot to the file whose bytes it holds."""
    import huggingface_hub.constants
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    for i, (name, source) in enumerate(files.items()):
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        shutil.copy(source, repo / "blobs" / f"blob{i}")
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / f"blob{i}")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads the variable once, at import: set what it read too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def test_hf_model_id_in_local_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    hf_dir = tiny_hf_dir(tmp_path / "src")
    shutil.copy(DEFAULT_MODEL / "tokenizer.json", hf_dir / "tokenizer.json")
    files = {name: hf_dir / name for name in ("config.json", "model.safetensors",
                                               "tokenizer.json")}
    fake_hf_cache(monkeypatch, tmp_path / "hub", "org/tiny-llama", files)
    expected = weights(lsk.load_model(hf_dir))
    loaded = weights(lsk.load_model("org/tiny-llama"))
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    tok = lsk.load_tokenizer("org/tiny-llama")
    assert tok.decode(tok.encode("def f(): pass")) == "def f(): pass"


def test_cli_finds_the_tokenizer_of_a_model_id(tmp_path, monkeypatch, capsys):
    """`layerskip generate --model org/name --prompt TEXT` without --tokenizer: the
    tokenizer.json of the model's snapshot in the local HF cache, as beside a directory."""
    pytest.importorskip("huggingface_hub")
    from layerskip_kernels import cli
    files = {name: DEFAULT_MODEL / name for name in ("config.json", "model.safetensors",
                                                      "tokenizer.json")}
    fake_hf_cache(monkeypatch, tmp_path / "hub", "org/default", files)
    outputs = []
    for model in ("org/default", str(DEFAULT_MODEL)):
        code = cli.main(["generate", "--model", model, "--prompt", "def fib(n):",
                         "--max-new-tokens", "4", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        outputs.append(json.loads(out)["outputs"])
    assert outputs[0] == outputs[1] and outputs[0][0]["text"]


def test_hf_model_id_sharded_in_local_cache(tmp_path, monkeypatch):
    """Shards in the cache are symlinks into ../../blobs: still inside the model's cache folder."""
    pytest.importorskip("huggingface_hub")
    hf_dir = tiny_hf_dir(tmp_path / "src")
    expected = weights(lsk.load_model(hf_dir))
    weight_map = shard(hf_dir, names=("model-1.safetensors", "sub/model-2.safetensors"))
    files = {name: hf_dir / name for name in ("config.json", "model.safetensors.index.json",
                                               *set(weight_map.values()))}
    fake_hf_cache(monkeypatch, tmp_path / "hub", "org/sharded", files)
    loaded = weights(lsk.load_model("org/sharded"))
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("repo_id", ["org/absent", "absent-org/name.v2"])
def test_hf_model_id_not_in_cache(tmp_path, monkeypatch, repo_id):
    pytest.importorskip("huggingface_hub")
    fake_hf_cache(monkeypatch, tmp_path / "hub", "org/present", {})
    for load, what in ((lsk.load_model, "model path"), (lsk.load_tokenizer, "tokenizer path")):
        with pytest.raises(FileNotFoundError, match=f"{what} {repo_id}.*local cache.*nothing "
                           "is downloaded") as error:
            load(repo_id)
        assert "\n" not in str(error.value)
