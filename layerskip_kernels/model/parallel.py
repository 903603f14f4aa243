"""Megatron-style tensor parallelism on torch.distributed (NCCL on GPUs, gloo on a CPU).

Each rank runs a `ParallelLlama`: the single-GPU Llama built from a *local* config (its query
heads, KV heads and MLP hidden units) with three modules swapped in; the forwards are the
model's own, they only call modules:
  qkv_proj      column-parallel by heads: [q of the rank's heads | its k heads | its v heads];
  gate_up_proj  column-parallel by hidden units: [the rank's gate units | the same up units];
                neither needs communication (a rank's attention / SiLU uses only its outputs);
  o_proj, down_proj  RowParallelLinear: the partial products of the rank's heads / units,
                then ONE all-reduce(sum) per attention block and one per MLP block;
  lm_head       VocabParallelLinear: the rank's vocabulary rows. The greedy head is the fused
                draft head on the local rows, then ONE all-reduce(max) of packed
                (logit, index) int64 keys; top-k merges every rank's k candidates; full logits
                (for sampling) are all-gathered, so every rank holds the same tensor.
The embedding is replicated: a lookup reads only B rows, so sharding it would save memory
(vocab x dim: 0.5 GB for llama-2-70b, 1 GB for llama-3-8b in bf16) at the price of one more
all-reduce per step on a path that communication latency already sets. With tied embeddings
the lm_head shard is a view of the rank's rows of the replicated embedding (no copy).

KV heads. Query head h reads KV head h // (n_heads / n_kv_heads). Each rank holds one KV slot
per aligned block of r of its query heads (r as large as possible, dividing the rank's query
head count, each block inside one KV group), so the local layout is again plain GQA. When tp
divides n_kv_heads that is n_kv_heads / tp slots, nothing replicated (every Llama 2 / 3 at
tp = 2, 4, 8); when tp is a multiple of n_kv_heads, each KV head is replicated on the
tp / n_kv_heads ranks that need it; when a rank's query heads straddle KV groups unevenly
(6 q / 3 kv at tp = 2), r falls as far as 1: one KV copy per query head (correct, but the
cache is as large as multi-head attention's). Each rank's KV cache holds its slots only.

Decisions (greedy tokens, acceptance, rollback, sampling) are computed on every rank from
identical inputs: the all-reduced argmax key and the all-gathered logits are the same tensor
on every rank, and sampling uses the same seeded generator everywhere (a seedless run
broadcasts rank 0's seed), so no accept result is broadcast and a round keeps its single
host sync. Hidden states (and so each rank's exit cache) are replicated.

Sharded loading reads each rank's slices with safetensors' `safe_open(...).get_slice`, from
one file or an indexed set of shards: the whole model never exists on one rank. `reads`
records every slice read (name, rows, columns, bytes).
"""
import atexit
import dataclasses
import os
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from .llama import Llama
from .weights import LAYER_WEIGHTS, fuse_layer

_LOW = 0xFFFFFFFF  # the low 32 bits of a key: the inverted token index


# -- the sharding plan ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `tp` holds of a model with config `config`."""
    config: object  # the whole model's LlamaConfig
    tp: int
    rank: int
    q_heads: range  # global query heads of this rank
    kv_slots: tuple  # the global KV head of each local KV slot (replicas repeat)
    hidden: range  # global MLP hidden units
    vocab: tuple  # (start, stop) of every rank's vocabulary rows

    @property
    def local(self):
        """The rank's config: its heads and hidden units; the rest (dim, vocab) global."""
        c = self.config
        return dataclasses.replace(c, n_heads=len(self.q_heads), n_kv_heads=len(self.kv_slots),
                                   head_dim=c.head_dim, hidden_dim=len(self.hidden))


def shard_plan(config, tp, rank):
    """The plan of rank `rank`; tp must divide the query heads and the MLP hidden units."""
    H, G = config.n_heads, config.n_heads // config.n_kv_heads
    if not isinstance(tp, int) or tp < 1 or H % tp or config.hidden_dim % tp:
        raise ValueError(f"tp: expected a divisor of the model's n_heads={H} and "
                         f"hidden_dim={config.hidden_dim}, got {tp}")
    per = H // tp

    def fits(r):  # every aligned block of r query heads, on every rank, in one KV group
        return per % r == 0 and all(len({q // G for q in range(s, s + r)}) == 1
                                    for s in range(0, H, r))
    r = max(r for r in range(1, per + 1) if fits(r))
    q = range(rank * per, (rank + 1) * per)
    step = -(-config.vocab_size // tp)
    vocab = tuple((min(i * step, config.vocab_size), min((i + 1) * step, config.vocab_size))
                  for i in range(tp))
    width = config.hidden_dim // tp
    return ShardPlan(config, tp, rank, q, tuple(s // G for s in q[::r]),
                     range(rank * width, (rank + 1) * width), vocab)


# -- packed argmax keys ---------------------------------------------------------------------

def pack(logits, indices):
    """int64 keys ordered as (logit, then the lower index first): the max key over any set is
    torch.argmax's choice (ties to the lowest index). logits: float32-representable values."""
    bits = (logits.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as int order
    return ordered * (1 << 32) + (_LOW - indices.long())


def unpack(keys):
    """(logits float32, indices int64) of pack()'s keys."""
    ordered = keys >> 32
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return bits.view(torch.float32), _LOW - (keys & _LOW)


# -- parallel modules ----------------------------------------------------------------------

class RowParallelLinear(nn.Linear):
    """A Linear over this rank's slice of the input features; the outputs of all ranks are
    summed with one all-reduce, so every rank holds the full output."""

    def __init__(self, in_features, out_features, group=None):
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x):
        out = super().forward(x)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelLinear(nn.Linear):
    """The lm_head rows of this rank's vocabulary (plan.vocab[rank]); forward gives the local
    logits, which gather / argmax combine across ranks."""

    def __init__(self, dim, plan, group=None):
        start, stop = plan.vocab[plan.rank]
        super().__init__(dim, stop - start, bias=False)
        self.start, self.bounds, self.group = start, plan.vocab, group

    def gather(self, local):
        """Full logits (..., vocab), the same tensor on every rank (one all-gather)."""
        width = max(stop - start for start, stop in self.bounds)
        padded = torch.nn.functional.pad(local, (0, width - local.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in self.bounds]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[..., :stop - start] for p, (start, stop) in zip(parts, self.bounds)],
                         dim=-1)

    def argmax(self, tokens, logits):
        """Global argmax from each rank's local (tokens, max logit): one all-reduce(max)."""
        keys = pack(logits, tokens + self.start)
        dist.all_reduce(keys, op=dist.ReduceOp.MAX, group=self.group)
        return unpack(keys)[1]


class ParallelLlama(Llama):
    """One rank's Llama: modules built from plan.local, the row-parallel projections and the
    vocab-parallel head swapped in. `config` is the local config (it sizes the KV cache);
    `global_config` the whole model's."""

    def __init__(self, plan, group=None):
        super().__init__(plan.local)
        self.plan, self.group, self.global_config = plan, group, plan.config
        c = self.config
        for layer in self.layers:
            layer.self_attn.o_proj = RowParallelLinear(c.n_heads * c.head_dim, c.dim, group)
            layer.mlp.down_proj = RowParallelLinear(c.hidden_dim, c.dim, group)
        self.lm_head = VocabParallelLinear(c.dim, plan, group)

    def head(self, h):
        """Full logits (..., vocab), identical on every rank."""
        return self.lm_head.gather(super().head(h))

    def head_argmax(self, h):
        """Greedy tokens, identical on every rank: the fused draft head over the local rows,
        then one all-reduce(max) of packed keys (ties to the lowest index); argmax of head(h)
        (gathered logits) where head_refusal finds a module the fused head would not compute.
        Ranks must take the same path (the collectives differ): hook every rank alike."""
        if self.head_refusal(VocabParallelLinear) is not None:
            return self.head(h).argmax(-1)
        argmax = self.kernels.draft_head_argmax(h, self.norm.weight, self.lm_head.weight,
                                                self.training_graph())
        return self.lm_head.argmax(*argmax(h, self.norm.weight, self.norm.eps,
                                           self.lm_head.weight))

    def shared_seed(self):
        """A seed for sampling that every rank shares: rank 0's, broadcast."""
        seed = torch.randint(0, 1 << 62, (1,), device=self.embed_tokens.weight.device)
        dist.broadcast(seed, group_src=0, group=self.group)
        return int(seed)


# -- reading slices -------------------------------------------------------------------------

class _Source:
    """Named checkpoint tensors (names without "model."), read by slices; `reads` records
    every read: (name, rows, cols, bytes), rows / cols as (start, stop) or None (all)."""

    def __init__(self):
        self.reads = []

    def read(self, name, rows=None, cols=None):
        t = self._slice(name, slice(*rows) if rows else slice(None),
                        slice(*cols) if cols else slice(None))
        self.reads.append((name, rows, cols, t.numel() * t.element_size()))
        return t


class SafetensorsSource(_Source):
    """The tensors of a Hugging Face directory: model.safetensors, or the shards listed by
    model.safetensors.index.json. Only the slices asked for are read."""

    def __init__(self, path, stack):
        from .checkpoint import index_shards, regular_file, safetensors_shapes
        super().__init__()
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.exists():  # shards checked by name, inside the model directory, as load_model's
            shards = index_shards(path, index)
        elif (path / "model.safetensors").exists():
            shards = {regular_file(path / "model.safetensors"): None}
        else:
            raise FileNotFoundError(f"model path {path}: no model.safetensors or "
                                    "model.safetensors.index.json")
        self.tensors, self._shapes = {}, {}
        for file, keys in shards.items():
            shapes = safetensors_shapes(file, keys)  # exactly the tensors the index lists
            f = stack.enter_context(safe_open(file, framework="pt"))
            for key, shape in shapes.items():
                self.tensors[key.removeprefix("model.")] = (f, key)
                self._shapes[key.removeprefix("model.")] = shape

    def shapes(self):
        """{name: shape}, from the files' headers."""
        return dict(self._shapes)

    def _slice(self, name, rows, cols):
        f, key = self.tensors[name]
        part = f.get_slice(key)
        return part[rows] if len(part.get_shape()) == 1 else part[rows, cols]


class StateDictSource(_Source):
    """In-memory tensors (e.g. hf_state_dict of a full model) behind the same interface."""

    def __init__(self, state):
        super().__init__()
        self.tensors = {k.removeprefix("model."): v for k, v in state.items()}

    def shapes(self):
        return {name: tuple(t.shape) for name, t in self.tensors.items()}

    def _slice(self, name, rows, cols):
        t = self.tensors[name]
        return (t[rows] if t.dim() == 1 else t[rows, cols]).clone()


def rank_state(source, plan, dtype=None, device="cpu"):
    """The rank's state dict under our names, fused projections concatenated locally: every
    tensor it needs read once, as slices; dtype None keeps the checkpoint's."""
    c = plan.config
    hd = c.head_dim

    def read(name, rows=None, cols=None):
        t = source.read(name, rows, cols)
        return t.to(device=device, dtype=dtype or t.dtype)

    def heads(name, slots):  # the rank's KV slots of k_proj / v_proj: one read, then copies
        lo, hi = min(slots), max(slots) + 1
        w = read(name, (lo * hd, hi * hd)).view(hi - lo, hd, -1)
        return w[torch.tensor(slots, device=w.device) - lo].flatten(0, 1)

    spans = {"q_heads": (plan.q_heads.start * hd, plan.q_heads.stop * hd),
             "hidden": (plan.hidden.start, plan.hidden.stop)}

    def part(name, tp):  # weights.LayerWeight.tp: which rows or columns this rank holds
        if tp is None:
            return read(name)
        side, what = tp
        if what == "kv_slots":
            return heads(name, plan.kv_slots)
        return read(name, spans[what]) if side == "rows" else read(name, cols=spans[what])

    state = {"embed_tokens.weight": read("embed_tokens.weight"),
             "norm.weight": read("norm.weight")}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        state.update((p + w.name, part(p + w.name, w.tp)) for w in LAYER_WEIGHTS)
        fuse_layer(state, p)
    start, stop = plan.vocab[plan.rank]
    state["lm_head.weight"] = (state["embed_tokens.weight"][start:stop] if c.tie_embeddings
                               else read("lm_head.weight", (start, stop)))
    return state


# -- building a rank's model ----------------------------------------------------------------

def init_distributed(device="cpu"):
    """This rank's device, initializing the default process group from torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) if needed: nccl for CUDA, gloo for a CPU.
    "cuda" without an index means cuda:LOCAL_RANK."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("tp: expected a process group: launch with torchrun "
                             "--nproc-per-node N, or call torch.distributed.init_process_group "
                             "first; got neither")
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(_destroy)  # what we opened, we close (NCCL warns otherwise)
    return device


def _destroy():
    if dist.is_initialized():
        dist.destroy_process_group()


def build(plan, state, group=None, backend="auto"):
    """A ParallelLlama holding `state` (rank_state's), its tensors used as they are."""
    with torch.device("meta"):
        model = ParallelLlama(plan, group)
    model.load_state_dict(state, strict=True, assign=True)
    model.backend = backend
    return model.eval().requires_grad_(False)


def _group_rank(tp, group):
    size = dist.get_world_size(group)
    if tp != size:
        raise ValueError(f"tp: expected the process group's size ({size}), got {tp}")
    return dist.get_rank(group)


def load_model_tp(path=None, tp=None, dtype=torch.float32, device="cpu", backend="auto",
                  group=None):
    """This rank's ParallelLlama of the model at `path` (as load_model takes it: None for the
    embedded default, a Hugging Face directory / its config.json / a .safetensors file in it,
    a llama2.c .bin, or an in-memory transformers model). Hugging Face checkpoints are read
    slice by slice (model.reads lists them); the other formats are loaded whole, then
    sharded. tp: the process group's size (default: all of it). dtype "auto" / None: the
    checkpoint's. Every rank of `group` must call it (the default group is initialized from
    torchrun's environment when needed). tp=1 outside a process group: the plain Llama."""
    from .checkpoint import (DEFAULT_MODEL, check_checkpoint, config_from_hf, load_model,
                             read_json_object, resolve_dtype)
    if tp == 1 and not dist.is_initialized():
        return load_model(path, dtype=dtype, device=device, backend=backend)
    device = init_distributed(device)
    tp = dist.get_world_size(group) if tp is None else tp
    rank = _group_rank(tp, group)
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"device: expected a CUDA device with an nccl process group, got "
                         f"{device}")
    dtype = None if dtype in (None, "auto") else resolve_dtype(dtype)
    path = DEFAULT_MODEL if path is None else path
    if hasattr(path, "state_dict") or Path(path).suffix == ".bin":
        full = load_model(path, dtype=dtype or torch.float32)
        return shard_model(full, tp, group, device, backend)
    path = Path(path)
    path = path.parent if path.name == "config.json" or path.suffix == ".safetensors" else path
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model path {path}: no config.json (expected a Hugging Face "
                                "Llama directory)")
    config = config_from_hf(read_json_object(path / "config.json"), str(path / "config.json"))
    with ExitStack() as stack:
        source = SafetensorsSource(path, stack)
        check_checkpoint(config, source.shapes(), str(path / "config.json"))
        plan = shard_plan(config, tp, rank)
        model = build(plan, rank_state(source, plan, dtype, device), group, backend)
    model.reads = source.reads
    return model


def shard_model(model, tp=None, group=None, device=None, backend=None):
    """This rank's ParallelLlama of a whole in-memory Llama (every rank holds `model`)."""
    from .checkpoint import hf_state_dict
    tp = dist.get_world_size(group) if tp is None else tp
    plan = shard_plan(model.config, tp, _group_rank(tp, group))
    source = StateDictSource(hf_state_dict(model))
    device = device or model.embed_tokens.weight.device
    sharded = build(plan, rank_state(source, plan, None, device), group,
                    backend or model.backend)
    sharded.reads = source.reads
    return sharded


def is_first_rank():
    """The rank that prints: rank 0 of the process group; before a group exists (an error
    found while checking arguments under torchrun), the process whose RANK is 0 or unset."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0").strip() in ("0", "")
