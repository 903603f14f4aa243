"""Checkpoint loaders: Hugging Face Llama directories, in-memory transformers models, and
llama2.c version-0 files. Weights are read with safetensors or numpy, never with pickle."""
import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .llama import Llama, LlamaConfig, hf_state_dict

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float16}
LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c versions 1 and later start with it
# The embedded default: a LayerSkip-trained code model (bench/train_default_model.py).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default_model"


def load_model(path=None, dtype=torch.float32, device="cpu", backend="auto"):
    """A Llama from an HF directory, an HF model in memory, or a llama2.c .bin file; with no
    path, the embedded default model."""
    dtype = SUPPORTED_DTYPES.get(dtype, dtype)
    if dtype not in SUPPORTED_DTYPES.values():
        raise ValueError(f"dtype: expected one of {list(SUPPORTED_DTYPES)}, got {dtype}")
    if hasattr(path, "state_dict") and hasattr(path, "config"):
        model = from_transformers(path)
    else:
        model = _load_file(Path(DEFAULT_MODEL if path is None else path))
    model = model.to(device=device, dtype=dtype)
    model.backend = backend
    return model.eval().requires_grad_(False)


def _load_file(path):
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model path {path}: a directory without config.json is not a "
                             "Hugging Face Llama checkpoint")
        return load_hf_directory(path)
    if path.name == "config.json" or path.suffix == ".safetensors":
        return load_hf_directory(path.parent)
    if path.suffix == ".bin":
        return load_llama2c(path)
    raise ValueError(f"model path {path}: unknown format (expected a Hugging Face Llama "
                     "directory or a llama2.c .bin checkpoint)")


def config_from_hf(hf: dict) -> LlamaConfig:
    """Our config from a Hugging Face LlamaConfig dict (transformers 4 or 5 layout)."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json: expected model_type 'llama', got {hf['model_type']!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported "
                         "(expected 'default' or 'llama3')")
    eos = hf.get("eos_token_id")
    extra = hf.get("layerskip", {})
    return LlamaConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_scaling=dict(rope, rope_type="llama3") if rope_type == "llama3" else None,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        exit_layer=extra.get("exit_layer"), num_speculations=extra.get("num_speculations"))


def load_hf_directory(path):
    config = config_from_hf(json.loads((path / "config.json").read_text()))
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"model path {path}: no model.safetensors or "
                                "model.safetensors.index.json (pickled .bin weights are refused)")
    state = {}
    for shard in shards:
        state.update(load_file(path / shard))
    return _from_state_dict(config, state)


def from_transformers(hf_model):
    """A Llama with the weights of an in-memory transformers LlamaForCausalLM. Q/K/V and
    gate/up are concatenated into our fused projections (copies); the other tensors are
    shared with hf_model, not copied."""
    return _from_state_dict(config_from_hf(hf_model.config.to_dict()), hf_model.state_dict())


def _from_state_dict(config, state):
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "lm_head.weight" not in state:
        config.tie_embeddings = True
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Llama(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"checkpoint weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def load_llama2c(path):
    """llama2.c "version 0" (legacy) float32 export: a 7-int32 header, then the weights."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 28:
        raise ValueError(f"{path}: too short to be a llama2.c checkpoint")
    magic, version = struct.unpack("<Ii", raw[:8].tobytes())
    if magic == LLAMA2C_MAGIC:
        raise ValueError(f"{path}: llama2.c version {version} checkpoint; only the version 0 "
                         "(legacy float32) format is supported: export it with "
                         "llama2.c's export.py --version 0")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28].tobytes())
    c = LlamaConfig(vocab_size=abs(vocab), dim=dim, n_layers=n_layers, n_heads=n_heads,
                    n_kv_heads=n_kv_heads, hidden_dim=hidden, max_seq_len=seq_len,
                    tie_embeddings=vocab > 0, bos_token_id=1, eos_token_id=[])
    hd, kv, L = c.head_dim, c.n_kv_heads * c.head_dim, n_layers
    shapes = [("embed_tokens", (c.vocab_size, dim)), ("input_layernorm", (L, dim)),
              ("q_proj", (L, dim, dim)), ("k_proj", (L, kv, dim)), ("v_proj", (L, kv, dim)),
              ("o_proj", (L, dim, dim)), ("post_attention_layernorm", (L, dim)),
              ("gate_proj", (L, hidden, dim)), ("down_proj", (L, dim, hidden)),
              ("up_proj", (L, hidden, dim)), ("norm", (dim,)),
              ("legacy_rope", (2, seq_len, hd // 2))]
    if vocab < 0:
        shapes.append(("lm_head", (c.vocab_size, dim)))
    expected = sum(int(np.prod(s)) for _, s in shapes)
    if raw.size - 28 != 4 * expected:
        raise ValueError(f"{path}: {raw.size - 28} bytes after the header, expected "
                         f"{4 * expected} (float32) for a version 0 llama2.c checkpoint of that header")
    weights, floats = {}, raw[28:].view(np.float32)
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        weights[name] = torch.from_numpy(floats[offset:offset + n].reshape(shape).copy())
        offset += n
    # llama2.c rotates adjacent pairs (2j, 2j+1); we rotate halves (j, j + hd/2): reorder rows.
    for name, heads in (("q_proj", n_heads), ("k_proj", n_kv_heads)):
        w = weights[name]
        weights[name] = w.view(L, heads, hd // 2, 2, dim).transpose(2, 3).reshape(w.shape)
    state = {"embed_tokens.weight": weights["embed_tokens"], "norm.weight": weights["norm"]}
    if vocab < 0:
        state["lm_head.weight"] = weights["lm_head"]
    for i in range(L):
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[f"layers.{i}.{name}.weight"] = weights[name][i]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"layers.{i}.self_attn.{name}.weight"] = weights[name][i]
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[f"layers.{i}.mlp.{name}.weight"] = weights[name][i]
    return _from_state_dict(c, state)


def save_hf_directory(model, path):
    """Write config.json + model.safetensors in the Hugging Face Llama layout."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
          "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
          "head_dim": c.head_dim, "intermediate_size": c.hidden_dim, "rms_norm_eps": c.norm_eps,
          "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
          "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
          "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id or None,
          "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
          "torch_dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch.")}
    if c.exit_layer is not None:
        hf["layerskip"] = {"exit_layer": c.exit_layer, "num_speculations": c.num_speculations}
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    state = {f"model.{k}" if k != "lm_head.weight" else k: v.contiguous()
             for k, v in hf_state_dict(model).items()}
    if c.tie_embeddings:
        state.pop("lm_head.weight")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
