"""Checkpoint loaders: Hugging Face Llama directories (or model ids already in the local HF
cache), in-memory transformers models, and llama2.c version-0 files.

Weights are read with safetensors or numpy, never with pickle. Every file is checked before it
is opened (a regular file; index shards confined to the model directory), every config value
before anything is allocated, every config key against what the model implements
(CONFIG_KEYS), the config against the checkpoint's tensor names and shapes (safetensors
headers) before any module is built or tensor read, and every weight for NaN/inf; a refusal is
one ValueError or FileNotFoundError line naming the file or key, and nothing is returned
half-loaded."""
import json
import math
import os
import re
import struct
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..ops._checks import check, fail
from .llama import Llama, LlamaConfig
from .weights import LAYER_WEIGHTS, SIZES, checkpoint_shapes, split_fused, weight_shape

# dtype names load_model accepts (the CLI's --dtype takes these, lowercased, and "float":
# cli.DTYPES); "auto" (the checkpoint's dtype) comes on top.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}
DTYPE_NAMES = (*DTYPES, "auto")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Positions a config may declare (Llama 4 Scout: 10M); past it a RoPE table or a cache sized
# from the config alone could take terabytes.
MAX_POSITIONS = 2 ** 24
LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c versions 1 and later start with it
HF_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The embedded default: a LayerSkip-trained code model (bench/train_default_model.py).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default_model"


def load_model(path=None, dtype=torch.float32, device="cpu", backend="auto", tp=None):
    """A Llama in eval mode without gradients.

    path: an HF Llama directory; its config.json; a .safetensors file or a
        *.safetensors.index.json in one (config.json beside it); a llama2.c version-0 .bin; an
        HF model id ("org/name") already in the local HF cache (nothing is downloaded); an
        in-memory transformers LlamaForCausalLM; None for the embedded default model.
    dtype: torch.float32, torch.bfloat16, torch.float16, a name in DTYPES, or "auto" (the
        checkpoint's: config.json's torch_dtype, else its weights'; llama2.c is float32).
    device: "cpu", "cuda", "cuda:N" or a torch.device, checked before any weight is read.
    tp: tensor-parallel ranks; inside an initialized process group (or under torchrun), this
        rank's shard of the model (model/parallel.py), read slice by slice from safetensors.
    """
    if tp is not None:
        from .parallel import load_model_tp
        return load_model_tp(path, tp, dtype=dtype, device=device, backend=backend)
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    if hasattr(path, "state_dict") and hasattr(path, "config"):
        model = from_transformers(path)
    else:
        model = _load_file(local_path(DEFAULT_MODEL if path is None else path), dtype)
    model = model.to(device=device, dtype=None if dtype == "auto" else dtype)
    model.backend = backend
    weight = model.embed_tokens.weight
    if weight.device.type == "cpu" and weight.dtype != torch.float32:
        # Kept as asked (half the memory), but the C++ kernels take float32: said once here,
        # and in every generate()'s stats["path"].
        name = str(weight.dtype).removeprefix("torch.")
        warnings.warn(f"load_model: {name} weights on a CPU decode in eager torch ops, "
                      "tens of times slower than float32 weights, which run in the C++ kernels "
                      "(dtype=torch.float32; --dtype float32)", stacklevel=2)
    return model.eval().requires_grad_(False)


def resolve_dtype(dtype):
    """A torch dtype from one of float32, bfloat16 and float16 (as torch dtypes or names in
    DTYPES); "auto" stays "auto"."""
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPES.get(dtype, dtype)
    check(dtype in DTYPES.values(), "dtype", f"one of {', '.join(DTYPE_NAMES)} or a torch "
          "dtype among them", dtype)
    return dtype


def resolve_device(device):
    """A torch.device from "cpu", "cuda", "cuda:N" or a torch.device; a CUDA device that this
    torch cannot see is refused."""
    expected = "'cpu', 'cuda', 'cuda:N' or a torch.device"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        fail("device", expected, device)
    check(resolved.type in ("cpu", "cuda"), "device", expected, repr(device))
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        build = "" if torch.version.cuda else ", a CPU-only build"
        check((resolved.index or 0) < count, "device", f"an available device (this torch sees "
              f"{count} CUDA device{'s' * (count != 1)}{build})", repr(device))
    return resolved


def local_path(path, what="model path"):
    """path as a local Path that exists; a string shaped like an HF model id ("org/name") that
    is no local path means that model's snapshot in the local HF cache, found offline."""
    check(isinstance(path, (str, os.PathLike)), what, "a path or a Hugging Face model id",
          repr(path))
    if Path(path).exists() or not (isinstance(path, str) and HF_MODEL_ID.fullmatch(path)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path} does not exist")
        return Path(path)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(path, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):
        raise FileNotFoundError(
            f"{what} {path}: no such file or directory, and no snapshot of the Hugging Face "
            f"model {path} in the local cache {constants.HF_HUB_CACHE}; nothing is downloaded "
            f"(fetch it first, e.g. `hf download {path}`)") from None


def regular_file(path, what="model path"):
    """path if it names a regular file (after symlinks): a FIFO or a device would hang."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    kind = "a directory" if path.is_dir() else "not a regular file (FIFO, device or socket)"
    check(path.is_file(), what, "a regular file", f"{path}: {kind}")
    return path


def read_json_object(path, what="config"):
    """The JSON object in the regular file path."""
    data = regular_file(path, what).read_bytes()
    try:
        value = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        fail(f"{what} {path}", "a JSON object", f"invalid JSON ({e})")
    check(isinstance(value, dict), f"{what} {path}", "a JSON object", type(value).__name__)
    return value


def _load_file(path, dtype):
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model path {path}: a directory without config.json is not a "
                             "Hugging Face Llama checkpoint")
        return load_hf_directory(path, dtype=dtype)
    if path.name == "config.json":
        return load_hf_directory(path.parent, dtype=dtype)
    if path.name.endswith((".safetensors", ".safetensors.index.json")):
        return load_hf_directory(path.parent, path.name, dtype)
    if path.suffix == ".bin":
        return load_llama2c(path)
    raise ValueError(f"model path {path}: unknown format (expected a Hugging Face Llama "
                     "directory, its config.json or .safetensors, or a llama2.c .bin checkpoint)")


# ---------------------------------------------------------------- configs


class _Fields:
    """Typed reads of a config dict: a missing, mistyped or out-of-range value is a ValueError
    naming the source and the key. JSON true is no integer and "false" no bool."""

    def __init__(self, values, source):
        check(isinstance(values, dict), source, "a JSON object", type(values).__name__)
        self.values, self.source = values, source

    def get(self, key, default):
        value = self.values.get(key)
        return default if value is None else value

    def int(self, key, default=None, low=1, high=None, required=False):
        value = self.get(key, default)
        if value is None and not required:
            return None
        ok = type(value) is int and value >= low and (high is None or value <= high)
        check(ok, f"{self.source} {key}", f"an integer >= {low}"
              + (f" and <= {high}" if high is not None else ""), _shown(value))
        return value

    def positive(self, key, default=None):
        value = self.get(key, default)
        ok = type(value) in (int, float) and math.isfinite(value) and value > 0
        check(ok, f"{self.source} {key}", "a finite number > 0", _shown(value))
        return float(value)

    def bool(self, key, default):
        value = self.get(key, default)
        check(type(value) is bool, f"{self.source} {key}", "true or false (a JSON bool)",
              _shown(value))
        return value


def _shown(value):
    return "nothing (missing)" if value is None else repr(value)


# What config_from_hf does with each key of transformers' LlamaConfig (5.x; a test keeps this
# table complete) and with the other keys of a Llama config.json that bear on the outputs:
#   "implemented"    read, checked and applied;
#   a tuple          the values the model implements; any other is refused, naming the key
#                    (absent or null: the first, transformers' default);
#   "ignored: why"   no effect on what this package computes.
CONFIG_KEYS = {
    "vocab_size": "implemented", "hidden_size": "implemented",
    "intermediate_size": "implemented", "num_hidden_layers": "implemented",
    "num_attention_heads": "implemented", "num_key_value_heads": "implemented",
    "head_dim": "implemented", "max_position_embeddings": "implemented",
    "rms_norm_eps": "implemented", "tie_word_embeddings": "implemented",
    "bos_token_id": "implemented", "eos_token_id": "implemented",
    "rope_parameters": "implemented",  # rope_scaling and rope_theta in transformers 4
    "rope_scaling": "implemented", "rope_theta": "implemented", "model_type": "implemented",
    "torch_dtype": "implemented", "dtype": "implemented",  # dtype="auto"
    "layerskip": "implemented",  # ours: the recommended exit_layer and num_speculations
    "hidden_act": ("silu", "swish"),  # transformers' ACT2FN: both are SiLU
    "attention_bias": (False,), "mlp_bias": (False,),
    "partial_rotary_factor": (1.0, 1),  # RoPE over the whole head (also read in the RoPE dict)
    "quantization_config": (None,),  # quantized weights: none are implemented
    "initializer_range": "ignored: initialization only; every weight comes from the checkpoint",
    "use_cache": "ignored: decoding always keeps a KV cache",
    "pad_token_id": "ignored: padding is each row's length, never attended to",
    "attention_dropout": "ignored: transformers applies it only while training; training "
                         "here drops layers (training/layer_dropout.py), not attention",
    "pretraining_tp": "ignored: transformers 5 ignores it; 4.x split each matmul in that many "
                      "slices, the same maths up to float rounding",
}
# The keys of a RoPE dict each rope_type takes (with "type", rope_type's older name).
ROPE_KEYS = {"default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
             "llama3": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
                        "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"}}


def _check_implemented(values, source, keys):
    """Each key of `keys` whose CONFIG_KEYS rule is a tuple of values has one of them (bools
    and numbers compared with their type: 0 is not false)."""
    for key in keys:
        allowed, value = CONFIG_KEYS[key], values.get(key)
        if value is None or not isinstance(allowed, tuple):
            continue
        ok = any(type(value) is type(a) and value == a for a in allowed)
        check(ok, f"{source} {key}", f"{' or '.join(map(repr, allowed))} (this model "
              "implements no other)", repr(value)[:80])


def _rope(f, source):
    """(rope_theta, rope_scaling or None) of a config's RoPE dict (rope_parameters, or
    rope_scaling in transformers 4), every key checked against what rope_tables implements."""
    rope_key = "rope_parameters" if f.get("rope_parameters", None) else "rope_scaling"
    rope = _Fields(f.get(rope_key, {}), f"{source} {rope_key}")
    # An explicit null rope_type is no "default": transformers refuses it (KeyError None).
    name = next((k for k in ("rope_type", "type") if k in rope.values), None)
    rope_type = rope.values[name] if name else "default"
    check(rope_type in ROPE_KEYS, f"{rope.source} {name or 'rope_type'}",
          f"one of {', '.join(map(repr, ROPE_KEYS))}", repr(rope_type))
    for key in rope.values:  # a factor with the default type would change nothing, silently
        check(key in ROPE_KEYS[rope_type], f"{rope.source} {key}", f"only the keys of "
              f"rope_type {rope_type!r}: {', '.join(sorted(ROPE_KEYS[rope_type]))}",
              repr(rope.values[key])[:80])
    _check_implemented(rope.values, rope.source, ("partial_rotary_factor",))
    theta = rope.positive("rope_theta", f.positive("rope_theta", 10000.0))
    if rope_type == "default":
        return theta, None
    # transformers reads every one of these: a missing one is its KeyError (or, for
    # original_max_position_embeddings, a silent fall back to max_position_embeddings).
    low, high = rope.positive("low_freq_factor"), rope.positive("high_freq_factor")
    check(low < high, f"{rope.source} high_freq_factor", f"more than low_freq_factor = {low} "
          "(the blend divides by their difference)", high)
    return theta, dict(rope.values, rope_type="llama3", factor=rope.positive("factor"),
                       low_freq_factor=low, high_freq_factor=high,
                       original_max_position_embeddings=rope.int(
                           "original_max_position_embeddings", high=MAX_POSITIONS,
                           required=True))


def config_from_hf(hf: dict, source="config.json") -> LlamaConfig:
    """Our config from a Hugging Face LlamaConfig dict (transformers 4 or 5 layout), every value
    checked, every key against CONFIG_KEYS; source names the dict in errors."""
    f = _Fields(hf, source)
    check(f.get("model_type", "llama") == "llama", f"{source} model_type", "'llama'",
          repr(hf.get("model_type")))
    _check_implemented(hf, source, CONFIG_KEYS)
    vocab, dim = f.int("vocab_size", required=True), f.int("hidden_size", required=True)
    n_layers = f.int("num_hidden_layers", required=True)
    n_heads = f.int("num_attention_heads", required=True)
    n_kv_heads, head_dim = f.int("num_key_value_heads", n_heads), f.int("head_dim")
    check(n_heads % n_kv_heads == 0, f"{source} num_key_value_heads",
          f"a divisor of num_attention_heads = {n_heads}", n_kv_heads)
    check(head_dim is not None or dim % n_heads == 0, f"{source} num_attention_heads",
          f"a divisor of hidden_size = {dim} (or a head_dim)", n_heads)
    check((head_dim or dim // n_heads) % 2 == 0, f"{source} head_dim", "an even number (RoPE "
          "rotates pairs)", head_dim or f"{dim} // {n_heads} = {dim // n_heads}")
    rope_theta, rope_scaling = _rope(f, source)
    eos = f.get("eos_token_id", [])
    eos = [eos] if type(eos) is int else eos
    check(isinstance(eos, list) and all(type(i) is int and 0 <= i < vocab for i in eos),
          f"{source} eos_token_id", f"null, a token id or a list of token ids in [0, {vocab})",
          repr(hf.get("eos_token_id")))
    extra = _Fields(f.get("layerskip", {}), f"{source} layerskip")
    return LlamaConfig(
        vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, hidden_dim=f.int("intermediate_size", required=True),
        norm_eps=f.positive("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=f.int("max_position_embeddings", 2048, high=MAX_POSITIONS),
        tie_embeddings=f.bool("tie_word_embeddings", False),
        bos_token_id=f.int("bos_token_id", low=0, high=vocab - 1), eos_token_id=list(eos),
        # an exit at layer L would be the whole model: no draft, no early exit
        exit_layer=extra.int("exit_layer", high=n_layers - 1),
        num_speculations=extra.int("num_speculations"))


def _auto_dtype(hf, state, source):
    """config.json's torch_dtype (or dtype), else the dtype of the largest weight."""
    declared = hf.get("torch_dtype") or hf.get("dtype")
    if declared is None:
        return max(state.values(), key=torch.Tensor.numel).dtype
    check(isinstance(declared, str) and declared in DTYPES,
          f"{source} torch_dtype (for dtype='auto')",
          f"one of {', '.join(DTYPES)}", repr(declared))
    return DTYPES[declared]


# ---------------------------------------------------------------- Hugging Face directories


def load_hf_directory(path, weights=None, dtype="auto"):
    """A Llama from an HF directory: config.json and weights, the name of a .safetensors file
    or of a *.safetensors.index.json in it (default: model.safetensors.index.json if present,
    else model.safetensors). dtype: a torch dtype or "auto" (the checkpoint's)."""
    path = Path(path)
    hf = read_json_object(path / "config.json")
    config = config_from_hf(hf, str(path / "config.json"))
    if weights is None:
        weights = next((name for name in ("model.safetensors.index.json", "model.safetensors")
                        if (path / name).exists()), None)
        if weights is None:
            raise FileNotFoundError(f"model path {path}: no model.safetensors or model."
                                    "safetensors.index.json (pickled .bin weights are refused)")
    if weights.endswith(".index.json"):
        shards = index_shards(path, path / weights)
    else:
        shards = {regular_file(path / weights): None}
    shapes = {}
    for file, keys in shards.items():
        shapes.update((k.removeprefix("model."), v)
                      for k, v in safetensors_shapes(file, keys).items())
    check_checkpoint(config, shapes, str(path / "config.json"))  # before a tensor is read
    state = {}
    for file in shards:
        state.update(_read_safetensors(file))
    model = _from_state_dict(config, state, str(path / "config.json"))
    return model.to(_auto_dtype(hf, state, path / "config.json") if dtype == "auto" else dtype)


def _confinement_root(path):
    """Where shards may live: the model directory, or for a snapshot in the HF cache
    (models--org--name/snapshots/<hash>, files linked into ../../blobs) the model's cache folder."""
    root = path.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def index_shards(path, index):
    """{shard file: the tensor names the index puts in it}, every shard checked by name before
    any is opened: a relative .safetensors name resolving, after symlinks, to a regular file
    inside the model directory."""
    weight_map = read_json_object(index, "index").get("weight_map")
    check(isinstance(weight_map, dict) and weight_map and all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()),
        f"index {index} weight_map", "a non-empty object of tensor name -> shard file name",
        repr(weight_map)[:80])
    names = {}
    for key, name in weight_map.items():
        names.setdefault(name, set()).add(key)
    root, shards = _confinement_root(path), {}
    for name, keys in names.items():
        relative = PurePosixPath(name)
        check(name.endswith(".safetensors") and not relative.is_absolute()
              and ".." not in relative.parts and "\\" not in name and "\0" not in name,
              f"index {index} weight_map", "relative .safetensors file names inside the model "
              "directory", repr(name))
        try:
            file = (path / name).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            fail(f"index {index} weight_map", "shards that resolve to a file", name)
        check(file.is_relative_to(root), f"index {index} weight_map", f"shards inside {root}",
              f"{name!r}, which resolves to {file}")
        shards[regular_file(file, f"index {index} shard {name!r}")] = keys
    return shards


def safetensors_shapes(file, keys=None):
    """{name: shape} of a safetensors file, from its header alone; with keys, exactly those
    must be in it."""
    try:
        with safe_open(file, framework="pt") as f:
            found = set(f.keys())
            if keys is not None and found != keys:
                listed, unlisted = sorted(keys - found)[:3], sorted(found - keys)[:3]
                fail(f"shard {file}", "the tensors its index lists", f"missing {listed}, "
                     f"unlisted {unlisted}")
            return {k: tuple(f.get_slice(k).get_shape()) for k in found}
    except (SafetensorError, OSError) as e:
        fail(f"safetensors file {file}", "a valid safetensors file", str(e).splitlines()[0])


def _read_safetensors(file):
    """The tensors of a safetensors file."""
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        fail(f"safetensors file {file}", "a valid safetensors file", str(e).splitlines()[0])


def from_transformers(hf_model):
    """A Llama with the weights of an in-memory transformers LlamaForCausalLM. Q/K/V and
    gate/up are concatenated into our fused projections (copies); the other tensors are
    shared with hf_model, not copied."""
    return _from_state_dict(config_from_hf(hf_model.config.to_dict(), "transformers config"),
                            hf_model.state_dict(), "transformers config")


def _check_weights(state):
    """Every weight a float tensor of finite values: one min/max reduction per tensor."""
    for name, t in state.items():
        check(t.dtype in WEIGHT_DTYPES, f"checkpoint weight {name}",
              "float32, bfloat16, float16 or float64", t.dtype)
        if t.numel() and not torch.stack(torch.aminmax(t)).isfinite().all():
            fail(f"checkpoint weight {name}", "finite values", "NaN or inf")


# Which config key sets each size of weights.SIZES, and the checkpoint weight that shows it
# (its name and dimension): a config that disagrees with its checkpoint is refused naming the
# key, before anything is built (a num_hidden_layers of 2**31 would build layers for minutes).
SIZE_KEYS = {"vocab": ("vocab_size", "embed_tokens.weight", 0),
             "dim": ("hidden_size", "embed_tokens.weight", 1),
             "q": ("num_attention_heads x head_dim", "layers.0.self_attn.q_proj.weight", 0),
             "kv": ("num_key_value_heads x head_dim", "layers.0.self_attn.k_proj.weight", 0),
             "hidden": ("intermediate_size", "layers.0.mlp.gate_proj.weight", 0)}
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def check_checkpoint(config, shapes, source):
    """The checkpoint's weights ({name: shape}, names without "model.") are exactly those of
    weights.checkpoint_shapes(config): checked from shapes alone (safetensors headers), so
    that a config asking for more than its checkpoint holds is refused before anything is
    built or read. A checkpoint that has an lm_head.weight while its config ties it is
    accepted (the embedding is the head, as transformers does); an untied config without one
    is refused (transformers would start from a random head)."""
    shapes = {k: v for k, v in shapes.items() if not k.endswith("rotary_emb.inv_freq")}
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER_INDEX.match(name))}
    check(config.n_layers == len(layers), f"{source} num_hidden_layers",
          f"the checkpoint's number of layers, {len(layers)}", config.n_layers)
    for size, (key, name, dim) in SIZE_KEYS.items():
        shape, value = shapes.get(name), SIZES[size](config)
        if shape is not None and len(shape) == 2 and shape[dim] != value:
            fail(f"{source} {key}", f"{shape[dim]}, as the checkpoint's {name} of shape "
                 f"{shape}", value)
    check(config.tie_embeddings or "lm_head.weight" in shapes, f"{source} tie_word_embeddings",
          "true for a checkpoint without lm_head.weight (or an lm_head.weight in it)",
          config.tie_embeddings)
    expected = checkpoint_shapes(config)
    unexpected = set(shapes) - set(expected) - {"lm_head.weight"}
    missing = set(expected) - set(shapes)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights: missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}")
    wrong = [(n, shapes[n], s) for n, s in expected.items() if tuple(shapes[n]) != s]
    if wrong:
        name, got, want = wrong[0]
        fail(f"checkpoint weights: {name}", f"shape {want}", tuple(got))


def _from_state_dict(config, state, source):
    _check_weights(state)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    check_checkpoint(config, {k: tuple(v.shape) for k, v in state.items()}, source)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Llama(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:  # check_checkpoint's names and the load hook's disagree: a bug
        raise RuntimeError(f"checkpoint weights: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]} after the load hook")
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


# ---------------------------------------------------------------- llama2.c


def _llama2c_config(path, header):
    """The config of a llama2.c header (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size, seq_len; a negative vocab_size means an unshared classifier)."""
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    for name, value in zip(names, header):
        check(value > 0 or (name == "vocab_size" and value < 0), f"{path} header {name}",
              "a positive integer" + (" (negative: unshared classifier)" if name ==
                                      "vocab_size" else ""), value)
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    check(dim % n_heads == 0, f"{path} header n_heads", f"a divisor of dim = {dim}", n_heads)
    check(n_heads % n_kv_heads == 0, f"{path} header n_kv_heads",
          f"a divisor of n_heads = {n_heads}", n_kv_heads)
    check(dim // n_heads % 2 == 0, f"{path} header n_heads", f"an even head dim dim / n_heads "
          f"(RoPE rotates pairs), dim = {dim}", n_heads)
    check(seq_len <= MAX_POSITIONS, f"{path} header seq_len", f"at most {MAX_POSITIONS}", seq_len)
    return LlamaConfig(vocab_size=abs(vocab), dim=dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, hidden_dim=hidden, max_seq_len=seq_len,
                       tie_embeddings=vocab > 0, bos_token_id=1, eos_token_id=[])


# llama2.c's version-0 file: the embedding, each layer weight of weights.LAYER_WEIGHTS stacked
# over the layers in this order (its rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3), the final
# norm, its RoPE tables (unused: rope_tables makes them), then the classifier if unshared.
LLAMA2C_LAYER_ORDER = ("input_layernorm.weight", "self_attn.q_proj.weight",
                       "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                       "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                       "mlp.gate_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight")


def load_llama2c(path):
    """llama2.c "version 0" (legacy) float32 export: a 7-int32 header, then the weights. The
    header is checked, and the file size against it, before the weights are read."""
    path = regular_file(Path(path))
    with open(path, "rb") as f:
        head = f.read(28)
    if head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise ValueError(f"{path}: a pickled PyTorch file, not a llama2.c checkpoint "
                         "(pickle is never loaded: convert it to safetensors)")
    if len(head) < 28:
        raise ValueError(f"{path}: too short to be a llama2.c checkpoint")
    magic, version = struct.unpack("<Ii", head[:8])
    if magic == LLAMA2C_MAGIC:
        raise ValueError(f"{path}: llama2.c version {version} checkpoint; only the version 0 "
                         "(legacy float32) format is supported: export it with "
                         "llama2.c's export.py --version 0")
    c = _llama2c_config(path, struct.unpack("<7i", head))
    layer_shapes = {w.name: weight_shape(c, w.shape) for w in LAYER_WEIGHTS}
    shapes = [("embed_tokens.weight", (c.vocab_size, c.dim)),
              *((name, (c.n_layers, *layer_shapes[name])) for name in LLAMA2C_LAYER_ORDER),
              ("norm.weight", (c.dim,)), ("legacy_rope", (2, c.max_seq_len, c.head_dim // 2))]
    if not c.tie_embeddings:
        shapes.append(("lm_head.weight", (c.vocab_size, c.dim)))
    expected = sum(math.prod(s) for _, s in shapes)  # Python ints: nothing allocated yet
    size = path.stat().st_size - 28
    if size != 4 * expected:
        raise ValueError(f"{path}: {size} bytes after the header, expected {4 * expected} "
                         "(float32) for a version 0 llama2.c checkpoint of that header")
    weights, floats = {}, np.fromfile(path, dtype=np.float32, offset=28)
    offset = 0
    for name, shape in shapes:
        n = math.prod(shape)
        weights[name] = torch.from_numpy(floats[offset:offset + n].reshape(shape).copy())
        offset += n
    # llama2.c rotates adjacent pairs (2j, 2j+1); we rotate halves (j, j + hd/2): reorder rows.
    hd = c.head_dim
    for name, heads in (("self_attn.q_proj.weight", c.n_heads),
                        ("self_attn.k_proj.weight", c.n_kv_heads)):
        w = weights[name]
        weights[name] = w.view(c.n_layers, heads, hd // 2, 2, c.dim).transpose(2, 3).reshape(
            w.shape)
    state = {name: weights[name] for name in ("embed_tokens.weight", "norm.weight",
                                              "lm_head.weight") if name in weights}
    for i in range(c.n_layers):
        state.update((f"layers.{i}.{name}", weights[name][i]) for name in LLAMA2C_LAYER_ORDER)
    return _from_state_dict(c, state, f"{path} header")


def hf_state_dict(model):
    """model's weights under Hugging Face Llama names (fused projections split again)."""
    if hasattr(model, "global_config"):
        raise ValueError("model: expected a whole model, got one tensor-parallel rank's shard "
                         "(export from a tp=1 load)")
    return {hf_name: part for name, tensor in model.state_dict().items()
            for hf_name, part in split_fused(model.config, name, tensor)}


def save_hf_directory(model, path):
    """Write config.json + model.safetensors in the Hugging Face Llama layout, each through
    files.atomic_path (the directory made if missing; a name there that is no regular file
    refused)."""
    from safetensors.torch import save_file

    from ..files import atomic_path, check_replaceable, write_text
    path = Path(path)
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
    state = {f"model.{k}" if k != "lm_head.weight" else k: v.contiguous()
             for k, v in hf_state_dict(model).items()}
    if c.tie_embeddings:
        state.pop("lm_head.weight")
    for name in ("config.json", "model.safetensors"):  # both, before either is written
        check_replaceable(path / name)
    write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
