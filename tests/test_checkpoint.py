"""Checkpoint loading: llama2.c stories260K against its HF export (read by us and by
transformers), greedy output against llama2.c's run.c, and every loader error."""
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

import layerskip_kernels as lsk
from layerskip_kernels.model.checkpoint import LLAMA2C_MAGIC

RUN_C = json.loads((Path(__file__).parent / "data" / "run_c_stories260K.json").read_text())
REL_TOL = 1e-4  # max |ours - reference| / max |reference|, float32


def rel_err(ours, ref):
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def write_hf_directory(path, out):
    """Our HF export of a checkpoint: config.json + model.safetensors."""
    lsk.model.save_hf_directory(lsk.load_model(path), out)
    return out


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
