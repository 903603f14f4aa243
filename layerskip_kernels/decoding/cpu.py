"""On a CPU, a greedy decode step or self-speculative round as one C++ call over a DecodeState's
buffers (csrc/cpu/decoder.h): the CPU's counterpart of replaying a captured CUDA graph.

The C++ runs the step of autoregressive.decode_step / self_speculative.greedy_round with the
kernels the Python step calls on a CPU (ops.llama_layer's stack, the CPU draft head), so the
tokens are the same, bit for bit. What it saves is the Python around them: on small models a
round's glue (an embedding, a layer stack, a head, a few index writes per draft) costs as much
as its arithmetic, and a round has k + 1 of them against a step's one.
"""
import contextlib
import math

import torch

from ..ops.llama_layer import CPU_MAX_HEAD_DIM, CPU_MAX_QUERIES, _cpu, cpu_unavailable_reason


class CpuSteps:
    """A model bound to one DecodeState: run(key) does the step a Graphs key names and returns
    the drafts it made (0 for a decode step), or None for a step it does not fuse (then the
    Python step runs)."""

    def __init__(self, model, state, layer_weights):
        """layer_weights: each block's fused_weights(), as cpu_steps() found them."""
        c, cache = model.config, state.cache
        weights = [w for layer in layer_weights for w in layer]
        kv = [cache.layer(i, state.batch) for i in range(c.n_layers)]
        cos, sin = model.rope(cache.max_seq_len)
        head = (model.embed_tokens.weight, model.norm.weight, model.lm_head.weight)
        buffers = (state.tokens, state.cache_seqlens, state.active, state.exit_cache,
                   state.drafts, state.emitted)
        self.model = model
        self._keep = (weights, kv, cos, sin, head, buffers)  # the C++ holds their addresses
        self.calls = 0
        self._decoder = _cpu.Decoder(
            weights=[w.data_ptr() for w in weights], k_caches=[k.data_ptr() for k, _ in kv],
            v_caches=[v.data_ptr() for _, v in kv], k_strides=kv[0][0].stride()[:3],
            v_strides=kv[0][1].stride()[:3], max_seqlen=cache.max_seq_len,
            rotary_cos=cos.data_ptr(), rotary_sin=sin.data_ptr(), cos_stride=cos.stride(0),
            sin_stride=sin.stride(0), rotary_rows=min(len(cos), len(sin)), dim=c.dim,
            heads_q=c.n_heads, heads_kv=c.n_kv_heads, head_dim=c.head_dim,
            hidden=layer_weights[0][5].shape[1], eps=model.layers[0].input_layernorm.eps,
            softmax_scale=1.0 / math.sqrt(c.head_dim), embed=head[0].data_ptr(),
            norm=head[1].data_ptr(), norm_eps=model.norm.eps, lm_head=head[2].data_ptr(),
            vocab=head[2].shape[0], tokens=state.tokens.data_ptr(),
            cache_seqlens=state.cache_seqlens.data_ptr(), active=state.active.data_ptr(),
            exit_cache=state.exit_cache.data_ptr(), drafts=state.drafts.data_ptr(),
            emitted=state.emitted.data_ptr(), batch=state.batch, max_drafts=state.max_drafts,
            emitted_row=state.emitted.stride(0))

    def prefill(self, tokens, lengths, cache, layers):
        """model.prefill's logits in one C++ call: the prompts through the fused layer stack,
        CPU_MAX_QUERIES positions of every row at a time (the C++ layer attends to the cache,
        so a prompt is a few verify-sized steps); the head runs in torch (sampling needs the
        logits). cache is the state's (the decoder holds its addresses)."""
        tokens = tokens.to(torch.int64).contiguous()
        lengths = lengths.to(torch.int32).contiguous()
        hidden = torch.empty(len(tokens), self.model.config.dim, dtype=torch.float32)
        self._decoder.prefill(tokens.data_ptr(), len(tokens), tokens.shape[1], tokens.stride(0),
                              lengths.data_ptr(), list(layers), hidden.data_ptr())
        return self.model.head(hidden)

    def run(self, key, confidence=None):
        """confidence (rounds): draft at most k, stopping after the first draft where no row's
        largest probability reaches it, as sampled_round does when greedy. A key may end in
        shadow exits (the Graphs key of a step or round that shadows them); a layer-skip
        round with some is left to Python, which refuses it."""
        kind, n, *rest = key
        if kind == "step":
            layers, *tail = rest
            self._decoder.step(n, list(layers), list(tail[0]) if tail else [])
            made = 0
        else:
            k, (draft, arg), *tail = rest
            if k + 1 > CPU_MAX_QUERIES or (draft != "exit" and tail):
                return None
            confidence = confidence or 0.0
            made = (self._decoder.exit_round(n, k, arg, confidence, list(tail[0]) if tail else [])
                    if draft == "exit" else self._decoder.skip_round(n, k, list(arg), confidence))
        self.calls += 1
        return made


@contextlib.contextmanager
def torch_threads_idle(model):
    """Within it, torch runs on one thread while the model decodes in C++ steps on a team of
    several (lsk.set_num_threads): torch is left only small ops (cache allocation, the
    prefill's head), and after a parallel op its OpenMP threads spin for milliseconds waiting
    for the next one, taking the cores from the team's helpers. Measured on 2 cores: a
    generate() of 128 tokens lost about 6 ms that way, a sixth of its time. torch's thread
    count is process-wide: generate() calls overlapping from several Python threads can leave
    it at one (the C++ kernels run one call at a time anyway)."""
    threads = torch.get_num_threads()
    if threads == 1 or _cpu is None or _cpu.num_threads() == 1 or fused_weights(model) is None:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_steps_refusal(model):
    """None when generate()'s greedy steps on this model can run as C++ calls (CpuSteps: the
    fused layer kernel on every layer, the CPU head), else why not, in words: what the C++
    decoder requires is float32 CPU weights, contiguous, in the plain modules the kernels
    compute exactly (Block.fused_refusal, Llama.head_refusal: no subclass, bias or hook), a backend preference
    that allows "cpu", the C++ module built, no autograd and no compiling."""
    weight, c = model.embed_tokens.weight, model.config
    if (why := cpu_unavailable_reason()) is not None:
        return why
    if weight.device.type != "cpu":
        return f"weights on {weight.device}"
    if model.kernels.preference not in ("auto", "cpu"):
        return f"backend {model.kernels.preference!r}"
    if torch.compiler.is_compiling() or model.training_graph():
        return "compiling or recording gradients"
    if c.head_dim > CPU_MAX_HEAD_DIM or c.head_dim % 2:
        return f"head_dim {c.head_dim} (the C++ layer takes an even one <= {CPU_MAX_HEAD_DIM})"
    if weight.dtype != torch.float32:
        return (f"{str(weight.dtype).removeprefix('torch.')} weights on a CPU (the C++ kernels "
                "take float32)")
    for i, block in enumerate(model.layers):  # the layers run as one stack: block hooks too
        if block._forward_hooks or block._forward_pre_hooks:
            return f"layer {i} has forward hooks"
        if (why := block.fused_refusal()) is not None:
            return f"layer {i} {why}"
    if (why := model.head_refusal()) is not None:
        return why
    layer_weights = model.stack_weights(range(c.n_layers))
    for name, t in (("embed_tokens", weight), ("norm", model.norm.weight),
                    ("lm_head", model.lm_head.weight), *(
                        (f"layer {i} weight {j}", w) for i, layer in enumerate(layer_weights)
                        for j, w in enumerate(layer))):
        if t.dtype != torch.float32 or not t.is_contiguous():
            return (f"{name}: {t.dtype}, strides {t.stride()} (the C++ kernels take float32, "
                    "contiguous)")
    return None


def fused_weights(model):
    """Each block's fused weights when cpu_steps_refusal finds nothing in the way, else None."""
    if cpu_steps_refusal(model) is not None:
        return None
    return model.stack_weights(range(model.config.n_layers))


def cpu_steps(model, state):
    """CpuSteps for this model and state where fused_weights() finds them, else None."""
    layer_weights = fused_weights(model)
    return None if layer_weights is None else CpuSteps(model, state, layer_weights)
