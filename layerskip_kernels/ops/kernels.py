"""The ops a model calls, bound to its backend preference and resolved once per call shape.

`Kernels(preference)` is built with the model (`model.backend = "triton"` rebuilds it). Each op
picks its backend through `Op.prefer` the first time it sees a key, then it is a dict look-up.
The key holds the op's name, the device, the dtype and the sizes in which one model's calls
differ: rms_norm and silu_mul the last dim, attention the queries per row, the fused layer the
queries and head dim, the draft head the rows and lm_head's shape, greedy_accept every shape.
What stays fixed for a model's life is left out, though limits read it: attention's head dim
and the alignment of the model's own buffers. So a Kernels serves the one model that builds
it; the launchers run without the public ops' argument checks, the model building these
tensors itself. While training (autograd on) every op runs its PyTorch reference, as the
kernels have no backward.

Under torch.compile the chosen backend is called through its torch.library custom op
(ops/library.py), which the compiler sees as one opaque, schema-described call.
"""
import torch

from . import library
from ._checks import check
from .attention_with_kvcache import (ATTENTION, attend, causal_attention, plan_attention,
                                     rotary_factors)
from .draft_head import DRAFT_HEAD_ARGMAX
from .greedy_accept import GREEDY_ACCEPT
from .llama_layer import LLAMA_LAYER, _launch_cpu_layers
from .rms_norm import RMS_NORM
from .silu_mul import SILU_MUL

PREFERENCES = ("auto", "cuda", "triton", "cpu", "torch")


class Kernels:
    def __init__(self, preference="auto"):
        check(preference in PREFERENCES, "backend", f"one of {PREFERENCES}", repr(preference))
        self.preference = preference
        self._picked = {}

    def pick(self, op, key, args, training=False):
        """op's launcher for calls like args(), a function giving an example call's arguments
        (called only when the pick is not known yet); key: the sizes that limit kernels."""
        if training:
            return op.impls["torch"].run
        if torch.compiler.is_compiling():
            example = args()
            return library.custom_op(op, op.prefer(self.preference, example[0].device, example))
        key = (op.name, *key)
        run = self._picked.get(key)
        if run is None:
            example = args()
            name = op.prefer(self.preference, example[0].device, example)
            run = self._picked[key] = op.impls[name].run
        return run

    def rms_norm(self, x, weight, training=False):
        return self.pick(RMS_NORM, (x.device, x.dtype, x.shape[-1]),
                         lambda: (x, weight, 0.0, None), training)

    def silu_mul(self, gate_up, training=False):
        return self.pick(SILU_MUL, (gate_up.device, gate_up.dtype, gate_up.shape[-1]),
                         lambda: (gate_up,), training)

    def draft_head_argmax(self, h, norm_weight, lm_head_weight, training=False):
        rows = h.numel() // h.shape[-1]
        return self.pick(DRAFT_HEAD_ARGMAX, (h.device, h.dtype, rows, *lm_head_weight.shape),
                         lambda: (h, norm_weight, 0.0, lm_head_weight), training)

    def greedy_accept(self, drafts, target, cache_seqlens, active):
        args = (drafts, target, cache_seqlens, active)
        key = (drafts.device, target.dtype, *drafts.shape, *target.shape)
        return self.pick(GREEDY_ACCEPT, key, lambda: args)(*args)

    def step(self, config, rope, cache_seqlens, queries, training=False):
        """What every layer of one forward shares: Decode with cache_seqlens (queries new
        tokens per row at cache_seqlens + i), else Causal (positions 0..queries-1, no cache)."""
        if cache_seqlens is None:
            return Causal(self, rotary_factors(rope[0][:queries], rope[1][:queries]), training)
        return Decode(self, config, rope, cache_seqlens, queries, training)

    def prefill_step(self, rope, length):
        """A prompt of `length` positions from 0, written to the cache (see Causal)."""
        return Causal(self, rotary_factors(rope[0][:length], rope[1][:length]))


class Causal:
    """Positions 0..S-1: a prompt (the layers' kv = cache rows to fill) or a training batch."""

    def __init__(self, kernels, rotary, training=False):
        self.kernels, self.rotary, self.training = kernels, rotary, training

    def attend(self, q, k, v, kv):
        return causal_attention(q, k, v, self.rotary, kv)

    def norm(self, x, weight, eps, residual=None):
        return self.kernels.rms_norm(x, weight, self.training)(x, weight, eps, residual)

    def silu_mul(self, gate_up):
        return self.kernels.silu_mul(gate_up, self.training)(gate_up)

    def layer(self, block, x, residual, kv):
        """The whole block as one fused call, or None: it runs op by op."""
        return None

    def layers(self, model, h, layers, cache):
        """The hidden states after `layers`, all in one fused call, or None."""
        return None


class Decode(Causal):
    """`queries` new tokens per row written at cache_seqlens[b] + i, attending to the cache."""

    def __init__(self, kernels, config, rope, cache_seqlens, queries, training=False):
        super().__init__(kernels, None, training)
        self.config, self.rope, self.cache_seqlens, self.queries = (config, rope, cache_seqlens,
                                                                     queries)
        self.plan = None  # the reference path's shared work, made by the first layer using it

    def attend(self, q, k, v, kv):
        args = (q, kv[0], kv[1], k, v, self.cache_seqlens, *self.rope, None)
        run = self.kernels.pick(ATTENTION, (q.device, q.dtype, self.queries), lambda: args)
        if run is not ATTENTION.impls["torch"].run:
            return run(*args)
        if self.plan is None:
            self.plan = plan_attention(self.cache_seqlens, self.queries, kv[0].shape[1],
                                       *self.rope)
        return attend(q, kv[0], kv[1], k, v, self.plan)

    def _fused(self, block, x, residual, kv):
        """The fused layer's launcher and arguments when its pick for this shape is a kernel
        (the "cpu" backend), else None. Not while training or compiling (no autograd, no
        custom op): the blocks then run op by op."""
        if self.training or torch.compiler.is_compiling():
            return None
        weights = block.fused_weights()
        if weights is None:
            return None
        args = lambda: (x, residual, weights, block.input_layernorm.eps,  # noqa: E731
                        kv[0], kv[1], self.cache_seqlens, *self.rope)
        run = self.kernels.pick(LLAMA_LAYER, (x.device, x.dtype, self.queries, kv[0].shape[3]),
                                args)
        return None if run is LLAMA_LAYER.impls["torch"].run else (run, args())

    def layer(self, block, x, residual, kv):
        fused = self._fused(block, x, residual, kv)
        return None if fused is None else fused[0](*fused[1])

    def layers(self, model, h, layers, cache):
        """A decode step's layers in one C++ call (ops.llama_layer's stack), or None."""
        layers, rows = list(layers), h.shape[0]
        if not layers:
            return h
        weights = model.stack_weights(layers)
        if weights is None:
            return None
        first = model.layers[layers[0]]
        fused = self._fused(first, h, None, cache.layer(layers[0], rows))
        if fused is None:
            return None
        eps = first.input_layernorm.eps
        delta, residual = _launch_cpu_layers(
            h, None, weights, eps,
            [cache.layer(i, rows) for i in layers], self.cache_seqlens, *self.rope)
        return delta + residual
