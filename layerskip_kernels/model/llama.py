"""A minimal Llama whose forward can stop after any layer and apply the shared head.

Q, K and V share one projection (qkv_proj), gate and up another (gate_up_proj), as in
gpt-fast: one GEMM each. Checkpoints keep Hugging Face's names (model/weights.py: the one
table of a layer's weights): a Block's load_state_dict pre-hook fuses them.
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.kernels import Kernels
from .rope import rope_tables
from .weights import FUSED_ORDER, fuse_layer, plain_refusal


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3: {"rope_type": "llama3", "factor": ..., ...}
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=list)
    # What a LayerSkip-trained checkpoint recommends for self-speculation.
    exit_layer: int | None = None
    num_speculations: int | None = None

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads


class KVCache:
    """Preallocated keys and values of every layer: (n_layers, batch, max_seq_len, n_kv_heads,
    head_dim). How much of each row is valid lives with the caller (cache_seqlens), so a
    rollback is a smaller number and stale slots are simply never read."""

    def __init__(self, config, batch_size, max_seq_len, dtype, device):
        shape = (config.n_layers, batch_size, max_seq_len, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._views = {}  # rows -> every layer's (k, v) views: made once, as steps ask per layer

    @property
    def max_seq_len(self):
        return self.k.shape[2]

    def layer(self, i, rows=None):
        """Layer i's (k, v), (batch, max_seq_len, n_kv_heads, head_dim), of the first `rows`
        rows: a contiguous view, so a smaller batch runs in the same buffers."""
        views = self._views.get(rows)
        if views is None:
            views = self._views[rows] = list(zip(self.k[:, :rows].unbind(0),
                                                 self.v[:, :rows].unbind(0)))
        return views[i]

    def move_rows(self, index):
        """Rows `index` (1-D, on the cache's device) become rows 0..len(index)-1."""
        n = len(index)
        self.k[:, :n], self.v[:, :n] = self.k[:, index], self.v[:, index]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None, norm=None):
        """(norm(h), h) with h = x + residual (h = x without one); `norm` is the forward's
        ops.rms_norm, which fuses the add."""
        if residual is None:
            return norm(x, self.weight, self.eps), x
        return norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.qkv_proj = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x, step, kv):
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim,
                                          self.n_kv_heads * self.head_dim,
                                          self.n_kv_heads * self.head_dim], dim=-1)
        out = step.attend(q.view(B, S, self.n_heads, self.head_dim),
                          k.view(B, S, self.n_kv_heads, self.head_dim),
                          v.view(B, S, self.n_kv_heads, self.head_dim), kv)
        return self.o_proj(out.reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_up_proj = nn.Linear(c.dim, 2 * c.hidden_dim, bias=False)
        self.down_proj = nn.Linear(c.hidden_dim, c.dim, bias=False)

    def forward(self, x, step):
        return self.down_proj(step.silu_mul(self.gate_up_proj(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = FeedForward(c)
        self._register_load_state_dict_pre_hook(lambda state, prefix, *_: fuse_layer(state,
                                                                                      prefix))

    def fused_weights(self):
        """The weights a fused layer kernel (ops.llama_layer) takes, in weights.FUSED_ORDER,
        or None when the block holds anything the kernel would not compute (fused_refusal
        says what): then the block runs its modules. Read through _modules / _parameters: a
        CPU decode step asks once per layer, and nn.Module.__getattr__'s hops or a call per
        module would cost more than the layer's norms."""
        m = self._modules
        attn, mlp = m["self_attn"], m["mlp"]
        modules = (attn, mlp, m["input_layernorm"], attn._modules["qkv_proj"],
                   attn._modules["o_proj"], m["post_attention_layernorm"],
                   mlp._modules["gate_up_proj"], mlp._modules["down_proj"])
        for module, cls in zip(modules, _FUSED_CLASSES):  # plain_refusal's rule, inlined
            if (type(module) is not cls or module._forward_hooks or module._forward_pre_hooks
                    or module._parameters.get("bias") is not None):
                return None
        return tuple(modules[i]._parameters["weight"] for i in _WEIGHT_HOLDERS)

    def fused_refusal(self):
        """None when fused_weights() has the weights, else what stands in the way."""
        for name, cls in zip(_FUSED_MODULES, _FUSED_CLASSES):
            module = self.get_submodule(name)
            if (why := plain_refusal(module, cls, name)) is not None:
                return why
        return None

    def forward(self, x, residual, step, kv=None):
        """The block's output is delta + residual, returned apart so that the next norm fuses
        the add. residual None: x is the whole input."""
        fused = step.layer(self, x, residual, kv) if kv is not None else None
        if fused is not None:
            return fused
        y, residual = self.input_layernorm(x, residual, step.norm)
        a = self.self_attn(y, step, kv)
        y, residual = self.post_attention_layernorm(a, residual, step.norm)
        return self.mlp(y, step), residual


# What a fused layer computes, module by module, in the order fused_weights reads them; each
# must pass plain_refusal. _WEIGHT_HOLDERS: those whose weights it takes, in FUSED_ORDER.
_FUSED_MODULES = ("self_attn", "mlp", "input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
                  "post_attention_layernorm", "mlp.gate_up_proj", "mlp.down_proj")
_FUSED_CLASSES = (Attention, FeedForward, RMSNorm, nn.Linear, nn.Linear, RMSNorm, nn.Linear,
                  nn.Linear)
_WEIGHT_HOLDERS = tuple(_FUSED_MODULES.index(name.removesuffix(".weight"))
                        for name in FUSED_ORDER)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.kernels = Kernels()  # the backend preference: ops.kernels.PREFERENCES
        self._rope = None

    @property
    def backend(self):
        return self.kernels.preference

    @backend.setter
    def backend(self, preference):
        self.kernels = Kernels(preference)

    def rope(self, n):
        """RoPE cos / sin tables (>= n rows, float32) on the weights' device, grown on demand
        (doubling, at most max_seq_len rows): a config's context can be far longer than any
        call needs."""
        device, cos = self.embed_tokens.weight.device, self._rope and self._rope[0]
        if cos is None or len(cos) < n or cos.device != device:
            rows = max(n, min(self.config.max_seq_len, 2 * len(cos) if cos is not None else 256))
            self._rope = rope_tables(self.config, rows, device)
        return self._rope

    def new_cache(self, batch_size, max_seq_len=None):
        max_seq_len = max_seq_len or self.config.max_seq_len
        weight = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_seq_len, weight.dtype, weight.device)

    def training_graph(self):
        """Autograd is recording through weights that want gradients: the kernels, which have
        no backward, give way to the references."""
        return torch.is_grad_enabled() and self.embed_tokens.weight.requires_grad

    def step(self, cache=None, cache_seqlens=None, queries=1):
        """What the layers of one forward share: see ops.kernels.Kernels.step."""
        n = cache.max_seq_len if cache is not None else queries
        return self.kernels.step(self.config, self.rope(n), cache_seqlens, queries,
                                 self.training_graph())

    def run_layers(self, h, layers, step=None, cache=None, each=None):
        """The given layers (e.g. range(E), or a skip set) on hidden states h (B, S, dim).
        step: from self.step() (default: positions 0..S-1, no cache). With `cache`, layer i
        reads and writes cache.layer(i) for the first B rows. each(i, run, h), if given,
        applies layer i as it likes: run(h) is the layer's output on h (layer dropout runs it
        on some rows; exit evaluation keeps every hidden state)."""
        step = step or self.step(queries=h.shape[1])
        if each is None and cache is not None:
            fused = step.layers(self, h, layers, cache)
            if fused is not None:
                return fused
        rows = h.shape[0]
        kv = (lambda i: cache.layer(i, rows)) if cache is not None else (lambda i: None)
        if each is not None:
            for i in layers:
                run = lambda x, i=i: torch.add(*self.layers[i](x, None, step, kv(i)))  # noqa: E731
                h = each(i, run, h)
            return h
        delta, residual = h, None
        for i in layers:
            delta, residual = self.layers[i](delta, residual, step, kv(i))
        return delta if residual is None else delta + residual

    def stack_weights(self, layers):
        """Block.fused_weights() of each of `layers`, for a kernel that runs them in one call;
        None when one has none or is watched (hooks: then the blocks run one by one)."""
        blocks = list(self.layers)
        blocks = [blocks[i] for i in layers]
        if any(b._forward_hooks or b._forward_pre_hooks for b in blocks):
            return None
        weights = [b.fused_weights() for b in blocks]
        return None if None in weights else weights

    def head_refusal(self, lm_head=nn.Linear):
        """None when a fused head (the draft head kernels; the C++ decoder's embedding, norm
        and lm_head) computes exactly embed_tokens, norm and lm_head from their weights: our
        classes, no hooks, no bias, no max_norm; else why not. lm_head: the class the head
        must be (ParallelLlama.head_argmax: its vocab-parallel head's local rows)."""
        for name, module, cls in (("embed_tokens", self.embed_tokens, nn.Embedding),
                                  ("norm", self.norm, RMSNorm),
                                  ("lm_head", self.lm_head, lm_head)):
            if (why := plain_refusal(module, cls, name)) is not None:
                return why
        if self.embed_tokens.max_norm is not None:
            return "embed_tokens has a max_norm"
        return None

    def head(self, h):
        """The head every exit shares: final RMSNorm, then lm_head."""
        norm = self.kernels.rms_norm(h, self.norm.weight, self.training_graph())
        return self.lm_head(self.norm(h, norm=norm)[0])

    def head_argmax(self, h):
        """The shared head's greedy tokens of h (..., dim); fused on a GPU, so the
        full-vocabulary logits are never written (unless head_refusal() finds a module the
        fused head would not compute: then argmax of head(h))."""
        if self.head_refusal() is not None:
            return self.head(h).argmax(-1)
        argmax = self.kernels.draft_head_argmax(h, self.norm.weight, self.lm_head.weight,
                                                self.training_graph())
        return argmax(h, self.norm.weight, self.norm.eps, self.lm_head.weight)[0]

    def forward(self, tokens, cache=None, cache_seqlens=None, exit_layer=None):
        """Logits (B, S, vocab) of tokens (B, S) after layers [0, exit_layer) (all by default).
        With a cache, row b's tokens go to positions cache_seqlens[b] + i; the caller advances
        cache_seqlens."""
        layers = range(self.config.n_layers if exit_layer is None else exit_layer)
        step = self.step(cache, cache_seqlens, tokens.shape[1])
        return self.head(self.run_layers(self.embed_tokens(tokens), layers, step, cache))

    def prefill(self, tokens, lengths, cache, layers=None):
        """A right-padded ragged batch of prompts (B, S) written to cache rows [0, B) at
        positions 0..S-1 (causal attention over the prompt, SDPA); returns each row's last
        logits (B, vocab). Padding fills cache slots past a row's length, never read."""
        layers = range(self.config.n_layers) if layers is None else layers
        step = self.kernels.prefill_step(self.rope(tokens.shape[1]), tokens.shape[1])
        h = self.run_layers(self.embed_tokens(tokens), layers, step, cache)
        last = h[torch.arange(len(h), device=h.device), lengths.long() - 1]
        return self.head(last)
