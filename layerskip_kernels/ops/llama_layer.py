"""One Llama decoder layer of a decode / verify step, fused: the CPU path of the model.

    h = x + residual                                  (h = x without a residual)
    y = rms_norm(h, input_norm, eps)
    q, k, v = split(y @ qkv^T)                        (fused projection: Hq*D | Hkv*D | Hkv*D)
    a = attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)
    h = h + a @ o^T
    y = rms_norm(h, post_norm, eps)
    g, u = chunk(y @ gate_up^T, 2)
    delta = (silu(g) * u) @ down^T                    returns (delta, h): the layer's output is
                                                      delta + h, kept apart so the next norm fuses
                                                      the add (as model/llama.py's Block.forward)

The cache write and the attention follow ops.attention_with_kvcache (flash-attn's
``flash_attn_with_kvcache(..., causal=True)``, half rotation): k_cache / v_cache get the new
rows at cache_seqlens[b] + i (k after RoPE) in place; query i of row b sees positions
[0, cache_seqlens[b] + i]; cache_seqlens is not modified.

Backends: "cpu" (csrc/cpu/, the module layerskip_kernels._cpu: CPU tensors, float32,
contiguous weights, S <= 16, an even head_dim <= 256) and "torch" (the reference, built from
the ops' references: the oracle). The C++ kernel streams each weight matrix once for all B * S
positions (one panel of rows at a time, served from L1 to every position), keeps the
activations in L1, and runs the attention of a KV head's G query heads x S queries together.
_launch_cpu_layers runs a decode step's stack of layers in one call (llama_layers_reference is
its oracle). The kernels run on the calling thread; `_cpu.set_num_threads(n)` adds n - 1
persistent pool threads (see csrc/cpu/llama_layer.cpp for why one is the default).
"""
import math
import operator
import os

import torch
import torch.nn.functional as F

from ._checks import as_float, check, fail
from .attention_with_kvcache import attention_with_kvcache_reference, check_caches, check_rotary
from .backend import Impl, Op
from .rms_norm import rms_norm_reference

try:
    from .. import _cpu
except ImportError:  # built without the CPU kernels
    _cpu = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_MAX_QUERIES = 16
CPU_MAX_HEAD_DIM = 256
WEIGHT_NAMES = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")
# More threads than logical CPUs never help, and a count such as 100000 would have the C++
# pool (and torch) try to spawn them all.
MAX_THREADS = os.cpu_count() or 1


def cpu_unavailable_reason():
    """None when the "cpu" backend can run, else a sentence saying why not."""
    if _cpu is None:
        return "layerskip_kernels._cpu is not built (setup.py build_ext)"
    return None


def check_num_threads(n, arg="n"):
    """n as an int in [1, MAX_THREADS] (numpy and torch integers accepted, bools refused); arg
    names it in the error."""
    try:
        value = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        value = None
    check(value is not None and 1 <= value <= MAX_THREADS, arg,
          f"an integer in [1, {MAX_THREADS}] (this machine's logical CPUs)", repr(n))
    return value


def set_num_threads(n):
    """CPU threads for torch's ops and for the C++ kernels' team (`_cpu.set_num_threads`),
    which is otherwise one thread: set both when the process owns n cores (at most
    MAX_THREADS, the machine's logical CPUs)."""
    n = check_num_threads(n)
    torch.set_num_threads(n)
    if _cpu is not None:
        _cpu.set_num_threads(n)


def _layer_shapes(x, weights, k_cache):
    """(Hq, Hkv, D, hidden) of a call, read off the weights and the cache."""
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    qkv, down = weights[1], weights[5]
    return (qkv.shape[0] - 2 * Hkv * D) // D, Hkv, D, down.shape[1]


def _check_llama_layer(x, residual, weights, eps, k_cache, v_cache, cache_seqlens,
                       rotary_cos, rotary_sin):
    check(x.dim() == 3 and x.shape[2] > 0, "x", "3 dims (B, S, dim) with dim >= 1",
          tuple(x.shape))
    B, S, dim = x.shape
    check(x.dtype in SUPPORTED_DTYPES, "x", "float32, float16 or bfloat16", x.dtype)
    check(x.stride(-1) == 1, "x", "a contiguous last dim (stride 1)", x.stride(-1))
    if residual is not None:
        check(residual.shape == x.shape, "residual", f"shape {tuple(x.shape)} (as x)",
              tuple(residual.shape))
        check(residual.dtype == x.dtype, "residual", f"dtype {x.dtype} (as x)", residual.dtype)
        check(residual.stride(-1) == 1, "residual", "a contiguous last dim (stride 1)",
              residual.stride(-1))
        check(residual.device == x.device, "residual", f"device {x.device} (as x)",
              residual.device)
    check(isinstance(weights, (tuple, list)) and len(weights) == 6, "weights",
          f"a tuple of 6 tensors {WEIGHT_NAMES}",
          f"{type(weights).__name__} of {len(weights) if isinstance(weights, (tuple, list)) else '?'}")
    check(k_cache.dim() == 4 and k_cache.shape[0] == B, "k_cache", f"(B={B}, Smax, Hkv, D)",
          tuple(k_cache.shape))
    Smax, Hkv, D = k_cache.shape[1:]
    check(Hkv > 0 and D > 0 and D % 2 == 0, "k_cache", "Hkv >= 1 heads of an even head_dim",
          tuple(k_cache.shape))
    check_caches(k_cache, v_cache)
    qkv_rows = weights[1].shape[0] if weights[1].dim() == 2 else -1
    Hq = (qkv_rows - 2 * Hkv * D) // D
    check(weights[1].dim() == 2 and weights[1].shape[1] == dim and Hq > 0 and Hq % Hkv == 0
          and qkv_rows == (Hq + 2 * Hkv) * D, "weights[1] (qkv)",
          f"shape ((Hq + 2*Hkv={2 * Hkv}) * D={D}, dim={dim}) with Hq a multiple of Hkv",
          tuple(weights[1].shape))
    hidden = weights[5].shape[1] if weights[5].dim() == 2 else -1
    expected = {0: (dim,), 2: (dim, Hq * D), 3: (dim,), 4: (2 * hidden, dim), 5: (dim, hidden)}
    for i, shape in expected.items():
        check(tuple(weights[i].shape) == shape and hidden > 0, f"weights[{i}] ({WEIGHT_NAMES[i]})",
              f"shape {shape}", tuple(weights[i].shape))
    for i, w in enumerate(weights):
        name = f"weights[{i}] ({WEIGHT_NAMES[i]})"
        check(w.dtype == x.dtype, name, f"dtype {x.dtype} (as x)", w.dtype)
        check(w.device == x.device, name, f"device {x.device} (as x)", w.device)
    as_float("eps", eps, "a finite number >= 0", lambda e: e >= 0)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check(t.dtype == x.dtype, name, f"dtype {x.dtype} (as x)", t.dtype)
        check(t.stride(-1) == 1, name, "a contiguous last dim (stride 1)", t.stride(-1))
        check(t.device == x.device, name, f"device {x.device} (as x)", t.device)
    check(cache_seqlens.shape == (B,) and cache_seqlens.dtype == torch.int32, "cache_seqlens",
          f"int32 of shape ({B},)", f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    check(cache_seqlens.device == x.device, "cache_seqlens", f"device {x.device} (as x)",
          cache_seqlens.device)
    check_rotary(rotary_cos, rotary_sin, Smax, D, x.device, "x")
    if cache_seqlens.device.type == "cpu" and B:  # on a GPU this would cost a host sync
        check(int(cache_seqlens.min()) >= 0, "cache_seqlens", ">= 0", cache_seqlens.tolist())
        longest = int(cache_seqlens.max())
        check(longest + S <= Smax, "cache_seqlens",
              f"cache_seqlens + S <= Smax={Smax} (cache full)", f"{longest} + {S}")


def llama_layer_reference(x, residual, weights, eps, k_cache, v_cache, cache_seqlens,
                          rotary_cos=None, rotary_sin=None):
    """Plain PyTorch through the ops' references: the oracle, and Block.forward's math."""
    input_norm, qkv, o, post_norm, gate_up, down = weights
    B, S, _ = x.shape
    Hq, Hkv, D, _ = _layer_shapes(x, weights, k_cache)
    if residual is None:
        y, h = rms_norm_reference(x, input_norm, eps), x
    else:
        y, h = rms_norm_reference(x, input_norm, eps, residual)
    q, k, v = F.linear(y, qkv).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    a = attention_with_kvcache_reference(q.reshape(B, S, Hq, D), k_cache, v_cache,
                                         k.reshape(B, S, Hkv, D), v.reshape(B, S, Hkv, D),
                                         cache_seqlens, rotary_cos, rotary_sin)
    y, h = rms_norm_reference(F.linear(a.reshape(B, S, Hq * D), o), post_norm, eps, h)
    g, u = F.linear(y, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down), h


def _rows(t):
    """(t, floats between consecutive (b, s) rows) of t (B, S, dim) with a unit last stride;
    a contiguous copy when b and s do not flatten to one stride."""
    if t.is_contiguous():
        return t, t.shape[2]
    B, S, _ = t.shape
    if S == 1:
        return t, t.stride(0)
    if B == 1 or t.stride(0) == S * t.stride(1):
        return t, t.stride(1)
    return t.contiguous(), t.shape[2]


def _float_rows(t):
    return t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous()


def _outputs(x, out):
    """A launcher's (delta, h): out, checked, or new contiguous float32 tensors of x's shape."""
    if out is None:
        return torch.empty(x.shape, dtype=torch.float32), torch.empty(x.shape, dtype=torch.float32)
    for name, t in zip(("out[0] (delta)", "out[1] (h)"), out):
        if not (t.shape == x.shape and t.dtype == torch.float32 and t.is_contiguous()
                and t.device.type == "cpu"):  # the messages only when failing: hot path
            fail(name, f"a contiguous float32 CPU tensor of shape {tuple(x.shape)}",
                 f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")
    return out


def _inputs(x, residual, cache_seqlens, rotary_cos, rotary_sin):
    """The arguments the C++ layer's entry points share: (tensors, rows, seqlens, rope),
    rows being x's and residual's pointers and row strides, seqlens cache_seqlens' pointer,
    rope the RoPE tables' pointers, row strides and rows (zeros without RoPE). The caller keeps
    `tensors` alive until the call returns: the pointers may point into copies made here."""
    x, x_row = _rows(x)
    residual, res_row = (None, 0) if residual is None else _rows(residual)
    if cache_seqlens.stride(0) != 1:
        cache_seqlens = cache_seqlens.contiguous()
    rows = (x.data_ptr(), 0 if residual is None else residual.data_ptr(), x_row, res_row)
    if rotary_cos is None:
        return (x, residual, cache_seqlens), rows, cache_seqlens.data_ptr(), (0, 0, 0, 0, 0)
    cos, sin = _float_rows(rotary_cos), _float_rows(rotary_sin)
    rope = (cos.data_ptr(), sin.data_ptr(), cos.stride(0), sin.stride(0),
            min(cos.shape[0], sin.shape[0]))
    return (x, residual, cache_seqlens, cos, sin), rows, cache_seqlens.data_ptr(), rope


def _launch_cpu(x, residual, weights, eps, k_cache, v_cache, cache_seqlens, rotary_cos=None,
                rotary_sin=None, out=None):
    """The C++ layer (csrc/cpu/llama_layer.cpp): arguments checked by the op and within
    _cpu_limits. out: optional (delta, h), each a contiguous float32 CPU tensor of x's shape
    that overlaps no input. Returns (delta, h). Kept lean: the model calls it once per layer,
    where each Python step costs about as much as the S = 1 layer's arithmetic on small models.
    """
    B, S, dim = x.shape
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    delta, h = _outputs(x, out)
    alive, rows, seqlens, rope = _inputs(x, residual, cache_seqlens, rotary_cos, rotary_sin)
    w_in, qkv, o, post, gate_up, down = weights
    _cpu.llama_layer(
        *rows, w_in.data_ptr(), qkv.data_ptr(), o.data_ptr(), post.data_ptr(),
        gate_up.data_ptr(), down.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride()[:3], v_cache.stride()[:3], seqlens, *rope,
        delta.data_ptr(), h.data_ptr(), B, S, dim, qkv.shape[0] // D - 2 * Hkv, Hkv, D,
        down.shape[1], k_cache.shape[1], float(eps), 1.0 / math.sqrt(D))
    return delta, h


def llama_layers_reference(x, residual, layer_weights, eps, kv, cache_seqlens, rotary_cos=None,
                           rotary_sin=None):
    """A stack of layers, one llama_layer_reference after the other: layer i takes weights
    layer_weights[i] and caches kv[i] = (k_cache, v_cache), and its input is the previous
    layer's (delta, h). Returns the last layer's (delta, h)."""
    for weights, (k_cache, v_cache) in zip(layer_weights, kv, strict=True):
        x, residual = llama_layer_reference(x, residual, weights, eps, k_cache, v_cache,
                                            cache_seqlens, rotary_cos, rotary_sin)
    return x, residual


def _launch_cpu_layers(x, residual, layer_weights, eps, kv, cache_seqlens, rotary_cos=None,
                       rotary_sin=None, out=None):
    """The stack of llama_layers_reference in one C++ call (a decode step's layers): the same
    results as _launch_cpu layer after layer, bit for bit, without a Python round trip per
    layer (about 8 us each on small models). Every layer's arguments must pass the op's checks
    and _cpu_limits, its caches having kv[0]'s shape and strides; the model builds them. out:
    as _launch_cpu's."""
    B, S, dim = x.shape
    k0, v0 = kv[0]
    Hkv, D = k0.shape[2], k0.shape[3]
    delta, h = _outputs(x, out)
    for k, v in kv:
        if k.stride() != k0.stride() or v.stride() != v0.stride() or k.shape != k0.shape:
            fail("kv", f"caches of one shape and strides ({tuple(k0.shape)}, {k0.stride()})",
                 f"{tuple(k.shape)}, {k.stride()}")
    alive, rows, seqlens, rope = _inputs(x, residual, cache_seqlens, rotary_cos, rotary_sin)
    qkv, down = layer_weights[0][1], layer_weights[0][5]
    _cpu.llama_layers(
        *rows, [w.data_ptr() for weights in layer_weights for w in weights],
        [k.data_ptr() for k, _ in kv], [v.data_ptr() for _, v in kv], k0.stride()[:3],
        v0.stride()[:3], seqlens, *rope, delta.data_ptr(), h.data_ptr(), B, S,
        dim, qkv.shape[0] // D - 2 * Hkv, Hkv, D, down.shape[1], k0.shape[1], float(eps),
        1.0 / math.sqrt(D))
    return delta, h


def _cpu_limits(x, residual, weights, eps, k_cache, v_cache, cache_seqlens, rotary_cos=None,
                rotary_sin=None):
    """None when the C++ kernel takes this call, else (argument, needed, got)."""
    if x.device.type != "cpu":
        return "x", "a CPU tensor", x.device
    if x.dtype != torch.float32:
        return "x", "float32", x.dtype
    if x.shape[1] > CPU_MAX_QUERIES:
        return "x", f"at most {CPU_MAX_QUERIES} positions per row", x.shape[1]
    D = k_cache.shape[3]
    if D > CPU_MAX_HEAD_DIM:
        return "k_cache", f"head_dim at most {CPU_MAX_HEAD_DIM}", D
    for i, w in enumerate(weights):
        if not w.is_contiguous():
            return f"weights[{i}] ({WEIGHT_NAMES[i]})", "contiguous", f"strides {w.stride()}"
    return None


LLAMA_LAYER = Op("llama_layer", {"cpu": Impl(_launch_cpu, _cpu_limits),
                                 "torch": Impl(llama_layer_reference)})


def llama_layer(x, residual, weights, eps, k_cache, v_cache, cache_seqlens, rotary_cos=None,
                rotary_sin=None, backend="auto"):
    """One decoder layer over S new positions per row, writing the KV cache in place.

    x, residual: (B, S, dim) (residual may be None); weights: (input_norm (dim,), qkv
    ((Hq + 2*Hkv) * D, dim), o (dim, Hq*D), post_norm (dim,), gate_up (2*hidden, dim), down
    (dim, hidden)) in nn.Linear layout; k_cache, v_cache: (B, Smax, Hkv, D); cache_seqlens:
    (B,) int32, each row's length before this call; rotary_cos, rotary_sin: (>= Smax, D/2) or
    None. Returns (delta, h), each (B, S, dim): the layer's output is delta + h.
    """
    _check_llama_layer(x, residual, weights, eps, k_cache, v_cache, cache_seqlens, rotary_cos,
                       rotary_sin)
    return LLAMA_LAYER(backend, x.device, (x, residual, tuple(weights), eps, k_cache, v_cache,
                                           cache_seqlens, rotary_cos, rotary_sin))


# ---------------------------------------------------------------- the draft head on the CPU
def draft_head_argmax_cpu(h, norm_weight, eps, lm_head_weight):
    """A "cpu" backend for ops.draft_head_argmax (same arguments and result: tokens int64 and
    max_logit float32 of shape h.shape[:-1]); float32 CPU tensors, contiguous lm_head_weight."""
    dim, vocab = h.shape[-1], lm_head_weight.shape[0]
    rows = h.reshape(-1, dim)
    tokens = torch.empty(rows.shape[0], dtype=torch.int64)
    max_logit = torch.empty(rows.shape[0], dtype=torch.float32)
    _cpu.draft_head_argmax(rows.data_ptr(), rows.shape[0], rows.stride(0) if rows.shape[0] > 1
                           else dim, dim, norm_weight.data_ptr(), float(eps),
                           lm_head_weight.data_ptr(), vocab, tokens.data_ptr(),
                           max_logit.data_ptr())
    return tokens.view(h.shape[:-1]), max_logit.view(h.shape[:-1])


def draft_head_cpu_limits(h, norm_weight, eps, lm_head_weight, k=1):
    """None when draft_head_argmax_cpu takes this call, else (argument, needed, got)."""
    if h.device.type != "cpu":
        return "h", "a CPU tensor", h.device
    if h.dtype != torch.float32 or norm_weight.dtype != torch.float32:
        return "h", "float32 (and a float32 norm_weight)", f"{h.dtype}, {norm_weight.dtype}"
    if not lm_head_weight.is_contiguous() or not norm_weight.is_contiguous():
        return "lm_head_weight", "contiguous", f"strides {lm_head_weight.stride()}"
    return None
