"""Checkpoint loaders: Hugging Face Llama directories (or model ids already in the local HF
cache), in-memory transformers models, and llama2.c version-0 files.

Weights are read with safetensors or numpy, never with pickle. Every file is checked before it
is opened (a regular file; index shards confined to the model directory), every config value
before anything is allocated, and every weight for NaN/inf; a refusal is one ValueError or
FileNotFoundError line naming the file or key, and nothing is returned half-loaded."""
import json
import math
import os
import re
import struct
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..ops._checks import check, fail
from .llama import Llama, LlamaConfig

# dtype names load_model and the CLI accept; "auto" (the checkpoint's dtype) comes on top.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}
DTYPE_NAMES = (*DTYPES, "auto")
SUPPORTED_DTYPES = DTYPES  # the older name, still read by the CLI
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


def config_from_hf(hf: dict, source="config.json") -> LlamaConfig:
    """Our config from a Hugging Face LlamaConfig dict (transformers 4 or 5 layout), every value
    checked; source names the dict in errors."""
    f = _Fields(hf, source)
    check(f.get("model_type", "llama") == "llama", f"{source} model_type", "'llama'",
          repr(hf.get("model_type")))
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
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = _Fields(f.get(rope_key, {}), f"{source} {rope_key}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    check(rope_type in ("default", "llama3"), f"{source} rope_type", "'default' or 'llama3'",
          repr(rope_type))
    if rope_type == "llama3":
        low, high = rope.positive("low_freq_factor", 1.0), rope.positive("high_freq_factor", 4.0)
        check(low != high, f"{rope.source} high_freq_factor", "a value other than "
              "low_freq_factor", high)
        scaling = dict(rope.values, rope_type="llama3", factor=rope.positive("factor"),
                       low_freq_factor=low, high_freq_factor=high,
                       original_max_position_embeddings=rope.int(
                           "original_max_position_embeddings", high=MAX_POSITIONS))
    eos = f.get("eos_token_id", [])
    eos = [eos] if type(eos) is int else eos
    check(isinstance(eos, list) and all(type(i) is int and 0 <= i < vocab for i in eos),
          f"{source} eos_token_id", f"null, a token id or a list of token ids in [0, {vocab})",
          repr(hf.get("eos_token_id")))
    extra = _Fields(f.get("layerskip", {}), f"{source} layerskip")
    return LlamaConfig(
        vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, hidden_dim=f.int("intermediate_size", required=True),
        norm_eps=f.positive("rms_norm_eps", 1e-6),
        rope_theta=rope.positive("rope_theta", f.positive("rope_theta", 10000.0)),
        rope_scaling=scaling if rope_type == "llama3" else None,
        max_seq_len=f.int("max_position_embeddings", 2048, high=MAX_POSITIONS),
        tie_embeddings=f.bool("tie_word_embeddings", False),
        bos_token_id=f.int("bos_token_id", low=0, high=vocab - 1), eos_token_id=list(eos),
        exit_layer=extra.int("exit_layer", high=n_layers),
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
        shards = _index_shards(path, path / weights)
    else:
        shards = {regular_file(path / weights): None}
    state = {}
    for file, keys in shards.items():
        state.update(_read_safetensors(file, keys))
    model = _from_state_dict(config, state)
    return model.to(_auto_dtype(hf, state, path / "config.json") if dtype == "auto" else dtype)


def _confinement_root(path):
    """Where shards may live: the model directory, or for a snapshot in the HF cache
    (models--org--name/snapshots/<hash>, files linked into ../../blobs) the model's cache folder."""
    root = path.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def _index_shards(path, index):
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


def _read_safetensors(file, keys=None):
    """The tensors of a safetensors file; with keys, exactly those must be in it."""
    try:
        with safe_open(file, framework="pt") as f:
            found = set(f.keys())
            if keys is not None and found != keys:
                listed, unlisted = sorted(keys - found)[:3], sorted(found - keys)[:3]
                fail(f"shard {file}", "the tensors its index lists", f"missing {listed}, "
                     f"unlisted {unlisted}")
            return {k: f.get_tensor(k) for k in found}
    except (SafetensorError, OSError) as e:
        fail(f"safetensors file {file}", "a valid safetensors file", str(e).splitlines()[0])


def from_transformers(hf_model):
    """A Llama with the weights of an in-memory transformers LlamaForCausalLM. Q/K/V and
    gate/up are concatenated into our fused projections (copies); the other tensors are
    shared with hf_model, not copied."""
    return _from_state_dict(config_from_hf(hf_model.config.to_dict(), "transformers config"),
                            hf_model.state_dict())


def _check_weights(state):
    """Every weight a float tensor of finite values: one min/max reduction per tensor."""
    for name, t in state.items():
        check(t.dtype in WEIGHT_DTYPES, f"checkpoint weight {name}",
              "float32, bfloat16, float16 or float64", t.dtype)
        if t.numel() and not torch.stack(torch.aminmax(t)).isfinite().all():
            fail(f"checkpoint weight {name}", "finite values", "NaN or inf")


def _from_state_dict(config, state):
    _check_weights(state)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "lm_head.weight" not in state:
        config.tie_embeddings = True
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Llama(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches, one per line after a title
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"checkpoint weights: {lines[-1] if lines else e}") from None
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"checkpoint weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
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
    dim, hidden, L, hd, kv = c.dim, c.hidden_dim, c.n_layers, c.head_dim, c.n_kv_heads * c.head_dim
    shapes = [("embed_tokens", (c.vocab_size, dim)), ("input_layernorm", (L, dim)),
              ("q_proj", (L, dim, dim)), ("k_proj", (L, kv, dim)), ("v_proj", (L, kv, dim)),
              ("o_proj", (L, dim, dim)), ("post_attention_layernorm", (L, dim)),
              ("gate_proj", (L, hidden, dim)), ("down_proj", (L, dim, hidden)),
              ("up_proj", (L, hidden, dim)), ("norm", (dim,)),
              ("legacy_rope", (2, c.max_seq_len, hd // 2))]
    if not c.tie_embeddings:
        shapes.append(("lm_head", (c.vocab_size, dim)))
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
    for name, heads in (("q_proj", c.n_heads), ("k_proj", c.n_kv_heads)):
        w = weights[name]
        weights[name] = w.view(L, heads, hd // 2, 2, dim).transpose(2, 3).reshape(w.shape)
    state = {"embed_tokens.weight": weights["embed_tokens"], "norm.weight": weights["norm"]}
    if not c.tie_embeddings:
        state["lm_head.weight"] = weights["lm_head"]
    for i in range(L):
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[f"layers.{i}.{name}.weight"] = weights[name][i]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"layers.{i}.self_attn.{name}.weight"] = weights[name][i]
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[f"layers.{i}.mlp.{name}.weight"] = weights[name][i]
    return _from_state_dict(c, state)


def hf_state_dict(model):
    """model's weights under Hugging Face Llama names (fused projections split again)."""
    if hasattr(model, "global_config"):
        raise ValueError("model: expected a whole model, got one tensor-parallel rank's shard "
                         "(export from a tp=1 load)")
    c, state = model.config, {}
    for name, tensor in model.state_dict().items():
        prefix = name.rsplit(".", 2)[0] + "."
        if name.endswith("qkv_proj.weight"):
            parts = tensor.split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim,
                                  c.n_kv_heads * c.head_dim])
            state.update(zip((prefix + p for p in ("q_proj.weight", "k_proj.weight",
                                                    "v_proj.weight")), parts))
        elif name.endswith("gate_up_proj.weight"):
            state.update(zip((prefix + p for p in ("gate_proj.weight", "up_proj.weight")),
                             tensor.chunk(2)))
        else:
            state[name] = tensor
    return state


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
