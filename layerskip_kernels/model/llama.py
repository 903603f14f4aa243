"""A minimal Llama whose forward can stop after any layer and apply the shared head.

Module names follow Hugging Face's LlamaForCausalLM (without its "model." prefix), so an HF
state dict loads as is and an in-memory transformers model can lend us its tensors.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.attention_with_kvcache import rotary_factors, rotate


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

    @property
    def max_seq_len(self):
        return self.k.shape[2]

    def keep_rows(self, rows):
        """Shrink the batch to `rows` (a 1-D index): one copy, after which finished rows
        cost nothing."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


def rope_tables(config, max_seq_len, device=None):
    """cos and sin of shape (max_seq_len, head_dim / 2), float32, half-rotation layout."""
    exponents = torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim
    inv_freq = 1.0 / config.rope_theta ** exponents
    if config.rope_scaling and config.rope_scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def _llama3_scaled(inv_freq, s):
    """Llama 3.1: slow down long wavelengths by `factor`, keep short ones, blend between."""
    old_context = s["original_max_position_embeddings"]
    low_wavelen = old_context / s.get("low_freq_factor", 1.0)
    high_wavelen = old_context / s.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - s.get("low_freq_factor", 1.0)) / (
        s.get("high_freq_factor", 4.0) - s.get("low_freq_factor", 1.0))
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], blended)
    return torch.where(wavelen < high_wavelen, inv_freq, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None, norm=ops.rms_norm_reference):
        """norm(x [+ residual]); with a residual, also returns the sum (the new residual
        stream). `norm` is the ops.rms_norm bound to the model's backend."""
        return norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x, rope, kv=None, plan=None):
        B, S, _ = x.shape
        # F.linear on the weights: the Linear modules only name them as HF does (and a module
        # call costs more than the matmul of a small model's decode step).
        q = F.linear(x, self.q_proj.weight).view(B, S, self.n_heads, self.head_dim)
        k = F.linear(x, self.k_proj.weight).view(B, S, self.n_kv_heads, self.head_dim)
        v = F.linear(x, self.v_proj.weight).view(B, S, self.n_kv_heads, self.head_dim)
        if kv is None:  # training and evaluation: no cache, positions 0..S-1
            factors = rotary_factors(rope[0][:S], rope[1][:S])
            q, k = rotate(q, factors), rotate(k, factors)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=self.n_kv_heads != self.n_heads).transpose(1, 2)
        else:
            out = ops.attend(q, kv[0], kv[1], k, v, plan)
        return F.linear(out.reshape(B, S, -1), self.o_proj.weight)


class FeedForward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.up_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.down_proj = nn.Linear(c.hidden_dim, c.dim, bias=False)

    def forward(self, x):
        gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = FeedForward(c)

    def forward(self, x, rope, kv=None, plan=None, norm=ops.rms_norm_reference):
        a = self.self_attn(self.input_layernorm(x, norm=norm), rope, kv, plan)
        y, h = self.post_attention_layernorm(a, residual=x, norm=norm)  # h = x + a, fused
        return h + self.mlp(y)


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
        cos, sin = rope_tables(config, config.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.backend = "auto"  # the ops backend of attention, norms and the draft head

    def _ops_backend(self):
        """The kernels have no backward: while training (autograd on, weights that want
        gradients), the references run."""
        training = torch.is_grad_enabled() and self.embed_tokens.weight.requires_grad
        return "torch" if training else self.backend

    def new_cache(self, batch_size, max_seq_len=None):
        max_seq_len = max_seq_len or self.config.max_seq_len
        return KVCache(self.config, batch_size, max_seq_len, self.embed_tokens.weight.dtype,
                       self.embed_tokens.weight.device)

    def run_layers(self, h, layers, cache=None, cache_seqlens=None):
        """The given layers (e.g. range(E), or a skip set) on hidden states h (B, S, dim). With
        a cache, row b's S positions are cache_seqlens[b] + i; the caller advances it."""
        rope = (self.rope_cos, self.rope_sin)
        c = self.config
        plan = None if cache is None else ops.plan_attention(
            cache_seqlens, h.shape[1], cache.max_seq_len, c.n_heads, c.n_kv_heads, *rope,
            backend=self._ops_backend())
        norm = ops.bound_rms_norm(self._ops_backend(), h.device)
        for i in layers:
            kv = None if cache is None else (cache.k[i], cache.v[i])
            h = self.layers[i](h, rope, kv, plan, norm)
        return h

    def head(self, h):
        """The head every exit shares: final RMSNorm, then lm_head."""
        norm = ops.bound_rms_norm(self._ops_backend(), h.device)
        return F.linear(self.norm(h, norm=norm), self.lm_head.weight)

    def head_argmax(self, h):
        """The shared head's greedy tokens of h (..., dim); fused on a GPU, so the
        full-vocabulary logits are never written."""
        draft_head = ops.bound_draft_head_argmax(self._ops_backend(), h.device)
        return draft_head(h, self.norm.weight, self.norm.eps, self.lm_head.weight)[0]

    def forward(self, tokens, cache=None, cache_seqlens=None, exit_layer=None):
        """Logits (B, S, vocab) of tokens (B, S) after layers [0, exit_layer) (all by default)."""
        layers = range(self.config.n_layers if exit_layer is None else exit_layer)
        h = F.embedding(tokens, self.embed_tokens.weight)
        return self.head(self.run_layers(h, layers, cache, cache_seqlens))
