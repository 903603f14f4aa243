"""The weight contract: the one table of what a checkpoint holds per layer and for the model
(Hugging Face Llama names and shapes), and of how our fused parameters are made from it.

Every path that reads, writes or splits weights takes them from here: the load hook
(llama.Block, fuse_layer), the export (checkpoint.hf_state_dict, split_fused), the llama2.c
loader, the shape check before anything is built (checkpoint.check_checkpoint,
checkpoint_shapes) and tensor parallelism (parallel.rank_state, LayerWeight.tp). A fused
kernel takes the fused parameters' weights only: what it requires of the modules holding
them is plain_refusal's (below), applied by llama.Block.fused_weights and
llama.Llama.head_refusal.
"""
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerWeight:
    """One weight of a decoder layer: its Hugging Face name under "model.layers.N.", the
    parameter of ours that holds it (a fused one holds its parts in LAYER_WEIGHTS' order), its
    shape in sizes of the config (SIZES) and how tensor parallelism splits it (parallel.py):
    "rows" / "cols" of the rank's query heads, KV slots or MLP units, or None (replicated).
    No weight has a bias: the model implements none (checkpoint.CONFIG_KEYS refuses
    attention_bias / mlp_bias, and a fused kernel takes weights only)."""
    name: str
    fused: str
    shape: tuple
    tp: tuple | None


LAYER_WEIGHTS = (
    LayerWeight("input_layernorm.weight", "input_layernorm.weight", ("dim",), None),
    LayerWeight("self_attn.q_proj.weight", "self_attn.qkv_proj.weight", ("q", "dim"),
                ("rows", "q_heads")),
    LayerWeight("self_attn.k_proj.weight", "self_attn.qkv_proj.weight", ("kv", "dim"),
                ("rows", "kv_slots")),
    LayerWeight("self_attn.v_proj.weight", "self_attn.qkv_proj.weight", ("kv", "dim"),
                ("rows", "kv_slots")),
    LayerWeight("self_attn.o_proj.weight", "self_attn.o_proj.weight", ("dim", "q"),
                ("cols", "q_heads")),
    LayerWeight("post_attention_layernorm.weight", "post_attention_layernorm.weight", ("dim",),
                None),
    LayerWeight("mlp.gate_proj.weight", "mlp.gate_up_proj.weight", ("hidden", "dim"),
                ("rows", "hidden")),
    LayerWeight("mlp.up_proj.weight", "mlp.gate_up_proj.weight", ("hidden", "dim"),
                ("rows", "hidden")),
    LayerWeight("mlp.down_proj.weight", "mlp.down_proj.weight", ("dim", "hidden"),
                ("cols", "hidden")),
)
# The weights outside the layers; lm_head.weight only when the embeddings are untied.
MODEL_WEIGHTS = {"embed_tokens.weight": ("vocab", "dim"), "norm.weight": ("dim",),
                 "lm_head.weight": ("vocab", "dim")}
# Each fused parameter and the checkpoint weights it concatenates, in order.
FUSED = {f: tuple(w.name for w in LAYER_WEIGHTS if w.fused == f)
         for f in dict.fromkeys(w.fused for w in LAYER_WEIGHTS if w.fused != w.name)}
# Our parameters of a layer, in order: the weights a fused layer kernel takes
# (ops.llama_layer.WEIGHT_NAMES).
FUSED_ORDER = tuple(dict.fromkeys(w.fused for w in LAYER_WEIGHTS))
SIZES = {"vocab": lambda c: c.vocab_size, "dim": lambda c: c.dim,
         "q": lambda c: c.n_heads * c.head_dim, "kv": lambda c: c.n_kv_heads * c.head_dim,
         "hidden": lambda c: c.hidden_dim}
_LAYER_NAME = re.compile(r"(layers\.\d+\.)(.+)")


def weight_shape(config, shape):
    """A shape of LAYER_WEIGHTS / MODEL_WEIGHTS (size names) in numbers for config."""
    return tuple(SIZES[size](config) for size in shape)


def checkpoint_shapes(config):
    """{name: shape} of every weight a checkpoint of config holds, under Hugging Face names
    without "model." (lm_head.weight only when untied)."""
    shapes = {name: weight_shape(config, shape) for name, shape in MODEL_WEIGHTS.items()
              if name != "lm_head.weight" or not config.tie_embeddings}
    for i in range(config.n_layers):
        shapes.update((f"layers.{i}.{w.name}", weight_shape(config, w.shape))
                      for w in LAYER_WEIGHTS)
    return shapes


def fuse_layer(state, prefix):
    """The load_state_dict pre-hook of a Block: Hugging Face's separate projections under
    prefix ("layers.N.") concatenated into our fused ones, where all parts are present."""
    for fused, parts in FUSED.items():
        names = [prefix + p for p in parts]
        if all(n in state for n in names):
            state[prefix + fused] = torch.cat([state.pop(n) for n in names])


def split_fused(config, name, tensor):
    """[(Hugging Face name, tensor)] of one of our parameters: a fused one split into views of
    its parts, any other as it is."""
    match = _LAYER_NAME.fullmatch(name)
    prefix, local = match.groups() if match else ("", name)
    parts = FUSED.get(local)
    if parts is None:
        return [(name, tensor)]
    rows = {w.name: SIZES[w.shape[0]](config) for w in LAYER_WEIGHTS}
    return list(zip((prefix + p for p in parts), tensor.split([rows[p] for p in parts])))


def plain_refusal(module, cls, name):
    """None when module is exactly a cls (a subclass may compute anything: a tensor-parallel
    all-reduce, a quantized matmul) without hooks or (an nn.Linear) a bias: what a fused
    kernel computes from the module's weight alone. Else why not, naming the module."""
    if type(module) is not cls:
        return f"{name} is a {type(module).__name__}, not {cls.__name__}"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{name} has forward hooks"
    if module._parameters.get("bias") is not None:
        return f"{name} has a bias"
    return None
