"""llama_layer: the C++ CPU kernel (layerskip_kernels._cpu) and the PyTorch reference against a
float64 oracle written here; the written cache rows apart from the outputs, stale slots NaN-
poisoned; poisoned out= buffers; 1 and 2 kernel threads; the CPU draft head (ties to the lowest
index); every argument guard with a passing control; the op importing without _cpu."""
import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES

import layerskip_kernels
from layerskip_kernels.ops import llama_layer as op
from layerskip_kernels.ops.draft_head import draft_head_argmax_reference

BITS = torch.int32
ATOL, RTOL = TOLERANCES[torch.float32]


@pytest.fixture
def cpu():
    """The C++ kernels; a skip where they are not built, a failure in CI (where pip builds
    them), so that a broken build cannot pass as a skip."""
    if op._cpu is None:
        if os.environ.get("CI"):
            pytest.fail("layerskip_kernels._cpu is not built in CI")
        pytest.skip(op.cpu_unavailable_reason())
    threads = op._cpu.num_threads()
    yield op._cpu
    op._cpu.set_num_threads(threads)


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request, cpu):
    """Every instruction-set path of the kernels that this CPU can run (the widest is the
    default; the others ship for older x86-64 and other architectures)."""
    if request.param not in cpu.available_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path")
    default = cpu.isa()
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(default)


def run_cpu(*args, out=None):
    """backend="cpu" by name: the op's checks, the backend's limits, then its launcher."""
    op._check_llama_layer(*args)
    assert op._cpu_limits(*args) is None
    return op._launch_cpu(*args, out=out)


# ---------------------------------------------------------------- oracle and inputs
def rotate_half(x, cos, sin):
    """Half rotation of x (S, H, D) at tables (S, D/2), float64."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None].double(), sin[:, None].double()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def oracle(x, residual, weights, eps, k_cache, v_cache, seqlens, cos, sin):
    """float64, out of place, one row at a time: (delta, h, k_cache, v_cache) after the call."""
    w_in, qkv, o, w_post, gate_up, down = (w.double() for w in weights)
    B, S, dim = x.shape
    Hkv, D = k_cache.shape[2:]
    Hq = qkv.shape[0] // D - 2 * Hkv
    G = Hq // Hkv
    k_cache, v_cache = k_cache.double().clone(), v_cache.double().clone()
    norm = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    h = x.double() + (0 if residual is None else residual.double())
    q, k, v = (norm(h, w_in) @ qkv.T).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, S, Hq, D), k.view(B, S, Hkv, D), v.reshape(B, S, Hkv, D)
    a = torch.empty(B, S, Hq, D, dtype=torch.float64)
    for b, L in enumerate(seqlens.tolist()):
        pos = torch.arange(L, L + S)
        qb, kb = q[b], k[b]
        if cos is not None:
            qb, kb = rotate_half(qb, cos[pos], sin[pos]), rotate_half(kb, cos[pos], sin[pos])
        k_cache[b, L:L + S], v_cache[b, L:L + S] = kb, v[b]
        keys = k_cache[b, :L + S].repeat_interleave(G, dim=1)
        values = v_cache[b, :L + S].repeat_interleave(G, dim=1)
        scores = torch.einsum("ihd,jhd->hij", qb, keys) / math.sqrt(D)
        scores = scores.masked_fill(torch.arange(L + S) > pos[:, None], float("-inf"))
        a[b] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), values)
    h = h + a.reshape(B, S, Hq * D) @ o.T
    g, u = (norm(h, w_post) @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ down.T, h, k_cache, v_cache


def rope_tables(Smax, D):
    inv_freq = 10000.0 ** (-torch.arange(0, D // 2, dtype=torch.float64) / (D // 2))
    angles = torch.arange(Smax, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def make_inputs(B, S, dim, Hq, Hkv, D, hidden, lens, residual, rope, generator):
    """Random weights (nn.Linear-like scale), inputs and caches, every cache slot at or past a
    row's length + S poisoned with NaN; Smax leaves the longest row exactly full."""
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    weights = (rand(dim) + 0.5, randn((Hq + 2 * Hkv) * D, dim) / dim ** 0.5,
               randn(dim, Hq * D) / (Hq * D) ** 0.5, rand(dim) + 0.5,
               randn(2 * hidden, dim) / dim ** 0.5, randn(dim, hidden) / hidden ** 0.5)
    Smax = max(lens) + S
    x = randn(B, S, dim)
    res = randn(B, S, dim) if residual else None
    k_cache, v_cache = randn(B, Smax, Hkv, D), randn(B, Smax, Hkv, D)
    for b, L in enumerate(lens):
        k_cache[b, L + S:], v_cache[b, L + S:] = float("nan"), float("nan")
    seqlens = torch.tensor(lens, dtype=torch.int32)
    cos, sin = rope_tables(Smax, D) if rope else (None, None)
    return x, res, weights, 1e-5, k_cache, v_cache, seqlens, cos, sin


def assert_cache(after, before, want64, seqlens, S):
    """Slots outside [L, L + S) keep their bits (NaN poison included); written slots match."""
    pos = torch.arange(after.shape[1])
    start = seqlens.long()[:, None]
    written = (pos >= start) & (pos < start + S)
    assert torch.equal(after[~written].view(BITS), before[~written].view(BITS))
    torch.testing.assert_close(after[written].double(), want64[written], atol=ATOL, rtol=RTOL)


# (B, S, dim, Hq, Hkv, D, hidden, lens): S 1 / 2 / 3 / 4 / 9 / 16; GQA 1 / 2 / 3 / 4 / 8; D 10 /
# 32 / 64 / 128 / 256; dims that are no multiple of 16 (24, 40, 72, 200); ragged rows (0, mid,
# Smax - S).
CASES = [
    (1, 1, 192, 6, 2, 32, 512, [100]),  # the default model's layer
    (3, 1, 40, 4, 4, 32, 24, [0, 13, 30]),
    (2, 2, 72, 8, 4, 64, 100, [17, 0]),
    (3, 4, 200, 8, 2, 64, 72, [0, 37, 80]),
    (1, 9, 192, 6, 2, 32, 512, [100]),
    (2, 9, 64, 8, 1, 32, 48, [5, 40]),
    (3, 16, 72, 8, 1, 128, 40, [0, 20, 3]),
    (2, 16, 48, 4, 1, 128, 33, [1, 0]),
    (1, 3, 24, 2, 1, 10, 8, [6]),  # head_dim 10: RoPE and vector tails, transposed scores
    (2, 2, 32, 2, 2, 256, 16, [3, 0]),  # the largest head_dim the kernel takes
]


def case_id(case):
    B, S, dim, Hq, Hkv, D, hidden, lens = case
    return f"B{B}-S{S}-dim{dim}-Hq{Hq}-Hkv{Hkv}-D{D}-h{hidden}-L{'.'.join(map(str, lens))}"


# ---------------------------------------------------------------- kernel and reference vs oracle
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "noresidual"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_matches_oracle(case, residual, isa, generator):
    B, S, dim, Hq, Hkv, D, hidden, lens = case
    args = make_inputs(B, S, dim, Hq, Hkv, D, hidden, lens, residual, True, generator)
    x, res, weights, eps, k_cache, v_cache, seqlens, cos, sin = args
    d_want, h_want, k_want, v_want = oracle(*args)
    k_before, v_before, seqlens_before = k_cache.clone(), v_cache.clone(), seqlens.clone()
    delta, h = run_cpu(*args)
    assert delta.shape == h.shape == x.shape and delta.dtype == h.dtype == torch.float32
    torch.testing.assert_close(delta.double(), d_want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h.double(), h_want, atol=ATOL, rtol=RTOL)
    assert_cache(k_cache, k_before, k_want, seqlens, S)
    assert_cache(v_cache, v_before, v_want, seqlens, S)
    assert torch.equal(seqlens, seqlens_before)


@pytest.mark.parametrize("case", CASES[2:4], ids=case_id)
def test_reference_matches_oracle(case, generator):
    """The reference (ops' references) is the oracle of the model's path: it must agree too.
    Its attention masks stale slots exactly, so the NaN poison cannot reach it either."""
    args = make_inputs(*case, residual=True, rope=True, generator=generator)
    d_want, h_want, k_want, v_want = oracle(*args)
    delta, h = op.llama_layer_reference(*args)
    torch.testing.assert_close(delta.double(), d_want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h.double(), h_want, atol=ATOL, rtol=RTOL)


def test_cpu_without_rope_and_with_strided_inputs(cpu, generator):
    """No rotary tables; x and residual as column slices of wider tensors (rows not dim apart);
    cache_seqlens a strided view."""
    x, res, weights, eps, k_cache, v_cache, seqlens, _, _ = make_inputs(
        2, 3, 40, 4, 2, 16, 24, [4, 0], True, False, generator)
    wide_x, wide_r = torch.randn(2, 3, 50, generator=generator), torch.randn(2, 3, 47, generator=generator)
    wide_x[..., 5:45], wide_r[..., :40] = x, res
    strided_seqlens = torch.stack([seqlens, torch.full_like(seqlens, 99)], dim=1)[:, 0]
    args = (wide_x[..., 5:45], wide_r[..., :40], weights, eps, k_cache, v_cache, strided_seqlens,
            None, None)
    d_want, h_want, k_want, _ = oracle(x, res, weights, eps, k_cache, v_cache, seqlens, None, None)
    delta, h = run_cpu(*args)
    torch.testing.assert_close(delta.double(), d_want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(h.double(), h_want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(k_cache[0, 4:7].double(), k_want[0, 4:7], atol=ATOL, rtol=RTOL)


def test_cpu_two_threads_match_one(cpu, generator):
    """The thread team splits KV heads, then columns: the result is the same bits as alone."""
    for case in (CASES[3], CASES[6]):  # 2 KV heads (split by head); 1 KV head (two phases)
        args = make_inputs(*case, residual=True, rope=True, generator=generator)
        outs = []
        for threads in (1, 2):
            cpu.set_num_threads(threads)
            k, v = args[4].clone(), args[5].clone()
            outs.append((*run_cpu(*args[:4], k, v, *args[6:]), k, v))
        for one, two in zip(*outs):
            assert torch.equal(one.view(BITS), two.view(BITS))


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_layer_stack_matches_layer_by_layer(threads, cpu, generator):
    """_launch_cpu_layers (one C++ call for a stack) equals the layers one by one, bit for bit,
    and the reference stack within tolerance; each layer writes its own cache."""
    cpu.set_num_threads(threads)
    B, S, dim, Hq, Hkv, D, hidden, lens = CASES[3]
    stack = [make_inputs(B, S, dim, Hq, Hkv, D, hidden, lens, True, True, generator)
             for _ in range(3)]
    x, res, _, eps, _, _, seqlens, cos, sin = stack[0]
    weights = [args[2] for args in stack]
    caches = [(args[4], args[5]) for args in stack]
    fresh = lambda: [(k.clone(), v.clone()) for k, v in caches]  # noqa: E731
    one_by_one, stacked, reference = fresh(), fresh(), fresh()
    d, h = x, res
    for w, (k, v) in zip(weights, one_by_one):
        d, h = run_cpu(d, h, w, eps, k, v, seqlens, cos, sin)
    out = (torch.full_like(x, float("nan")), torch.full_like(x, float("nan")))
    got = op._launch_cpu_layers(x, res, weights, eps, stacked, seqlens, cos, sin, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    assert torch.equal(got[0].view(BITS), d.view(BITS)) and torch.equal(got[1].view(BITS), h.view(BITS))
    for (k1, v1), (k2, v2) in zip(one_by_one, stacked):
        assert torch.equal(k1.view(BITS), k2.view(BITS)) and torch.equal(v1.view(BITS), v2.view(BITS))
    want = op.llama_layers_reference(x, res, weights, eps, reference, seqlens, cos, sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=4 * ATOL, rtol=4 * RTOL)


def test_cpu_layer_stack_guard(cpu, generator):
    args = make_inputs(*CASES[3], residual=True, rope=True, generator=generator)
    x, res, w, eps, k, v, seqlens, cos, sin = args
    op._launch_cpu_layers(x, res, [w], eps, [(k, v)], seqlens, cos, sin)  # the passing control
    with pytest.raises(ValueError, match="^kv:"):
        op._launch_cpu_layers(x, res, [w, w], eps, [(k, v), (k[:, :-1], v)], seqlens, cos, sin)


def test_cpu_out_buffers_poisoned(cpu, generator):
    args = make_inputs(*CASES[3], residual=True, rope=True, generator=generator)
    k, v = args[4].clone(), args[5].clone()
    want = run_cpu(*args[:4], k, v, *args[6:])
    out = (torch.full_like(args[0], float("nan")), torch.full_like(args[0], float("nan")))
    got = run_cpu(*args, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


def test_cpu_greedy_step_of_the_default_model(cpu):
    """The embedded model's greedy tokens over a few cached steps through the kernel equal the
    torch path's (Block.forward with a Decode step), layer by layer and through the head."""
    torch.manual_seed(0)
    model = layerskip_kernels.load_model()
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (2, 7))
    tokens = {}
    for path in ("torch", "cpu"):
        cache = model.new_cache(2, 32)
        seqlens = torch.tensor([7, 7], dtype=torch.int32)
        with torch.no_grad():
            last, out = model.prefill(prompt, seqlens, cache).argmax(-1, keepdim=True), []
            cos, sin = model.rope(32)
            for _ in range(6):
                if path == "torch":
                    step = model.step(cache, seqlens, 1)
                    h = model.run_layers(model.embed_tokens(last), range(c.n_layers), step, cache)
                else:
                    x, res = model.embed_tokens(last), None
                    for i, block in enumerate(model.layers):
                        k, v = cache.layer(i, 2)
                        x, res = run_cpu(x, res, layer_weights(block), c.norm_eps, k, v, seqlens,
                                         cos, sin)
                    h = x + res
                last = model.head(h).argmax(-1)
                out.append(last)
                seqlens += 1
        tokens[path] = torch.cat(out, dim=1)
    assert torch.equal(tokens["cpu"], tokens["torch"])


def layer_weights(block):
    return (block.input_layernorm.weight, block.self_attn.qkv_proj.weight,
            block.self_attn.o_proj.weight, block.post_attention_layernorm.weight,
            block.mlp.gate_up_proj.weight, block.mlp.down_proj.weight)


def test_public_op_torch_and_auto(generator):
    args = make_inputs(*CASES[2], residual=True, rope=True, generator=generator)
    d_want, h_want, _, _ = oracle(*args)
    for backend in ("torch", "auto"):
        k, v = args[4].clone(), args[5].clone()
        delta, h = op.llama_layer(*args[:4], k, v, *args[6:], backend=backend)
        torch.testing.assert_close(delta.double(), d_want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(h.double(), h_want, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- the CPU draft head
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows, dim, vocab", [(1, 192, 2048), (3, 40, 1001), (5, 64, 130)])
def test_cpu_draft_head_argmax(rows, dim, vocab, threads, isa, cpu, generator):
    cpu.set_num_threads(threads)
    h = torch.randn(rows, dim, generator=generator)
    norm_weight = torch.rand(dim, generator=generator) + 0.5
    lm_head = torch.randn(vocab, dim, generator=generator)
    tokens, best = op.draft_head_argmax_cpu(h, norm_weight, 1e-5, lm_head)
    want_tokens, want_best = draft_head_argmax_reference(h, norm_weight, 1e-5, lm_head)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(best, want_best, atol=ATOL, rtol=RTOL)
    # Exact ties (equal rows of lm_head, in different threads' vocabulary ranges) go to the
    # lowest index, as torch.argmax.
    lm_head[3] = lm_head[vocab - 2] = lm_head[want_tokens[0]]
    tokens, _ = op.draft_head_argmax_cpu(h[:1], norm_weight, 1e-5, lm_head)
    assert tokens.tolist() == [min(3, int(want_tokens[0]))]


def test_cpu_draft_head_limits():
    h, w = torch.randn(2, 8), torch.ones(8)
    assert op.draft_head_cpu_limits(h, w, 1e-5, torch.randn(16, 8)) is None
    assert op.draft_head_cpu_limits(h.double(), w, 1e-5, torch.randn(16, 8))[0] == "h"
    assert op.draft_head_cpu_limits(h, w, 1e-5, torch.randn(8, 16).T)[0] == "lm_head_weight"


# ---------------------------------------------------------------- argument guards
def guard_inputs(generator):
    return list(make_inputs(2, 2, 40, 4, 2, 16, 24, [3, 0], True, True, generator))


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return args


def _weight(args, i, value):
    weights = list(args[2])
    weights[i] = value
    return _replace(args, 2, tuple(weights))


GUARDS = [  # (argument named in the error, how to break a valid call)
    ("x", lambda a: _replace(a, 0, a[0][0])),
    ("x", lambda a: _replace(a, 0, a[0].to(torch.int32))),
    ("x", lambda a: _replace(a, 0, a[0].transpose(1, 2).contiguous().transpose(1, 2))),
    ("residual", lambda a: _replace(a, 1, a[1][:, :1])),
    ("residual", lambda a: _replace(a, 1, a[1].double())),
    ("weights", lambda a: _replace(a, 2, a[2][:5])),
    (r"weights\[0\] \(input_norm\)", lambda a: _weight(a, 0, a[2][0][:-1])),
    (r"weights\[1\] \(qkv\)", lambda a: _weight(a, 1, a[2][1][:-16])),
    (r"weights\[2\] \(o\)", lambda a: _weight(a, 2, a[2][2][:, :-1])),
    (r"weights\[3\] \(post_norm\)", lambda a: _weight(a, 3, a[2][3].double())),
    (r"weights\[4\] \(gate_up\)", lambda a: _weight(a, 4, a[2][4][:-2])),
    (r"weights\[5\] \(down\)", lambda a: _weight(a, 5, a[2][5][:-1])),
    ("eps", lambda a: _replace(a, 3, -1.0)),
    ("k_cache", lambda a: _replace(a, 4, a[4][:1])),
    ("k_cache", lambda a: _replace(a, 4, a[4][..., :15])),
    ("k_cache", lambda a: _replace(a, 4, a[4].half())),
    ("v_cache", lambda a: _replace(a, 5, a[5][:, :-1])),
    ("cache_seqlens", lambda a: _replace(a, 6, a[6].long())),
    ("cache_seqlens", lambda a: _replace(a, 6, torch.tensor([4, 0], dtype=torch.int32))),
    ("cache_seqlens", lambda a: _replace(a, 6, torch.tensor([-1, 0], dtype=torch.int32))),
    ("rotary_cos", lambda a: _replace(a, 7, a[7][:2])),
    ("rotary_sin", lambda a: _replace(a, 8, None)),
    ("rotary_sin", lambda a: _replace(a, 8, a[8][:, :3])),
    ("rotary_cos", lambda a: _replace(a, 7, a[7].round().long())),  # angles rounded to ints
    ("k_cache", lambda a: _replace(a, 4, a[4][:1].expand_as(a[4]))),  # a write lands twice
    ("v_cache", lambda a: _replace(a, 5, a[4])),  # v written over k
]


@pytest.mark.parametrize("arg, broken", GUARDS, ids=[f"{i}-{g[0][:12]}" for i, g in enumerate(GUARDS)])
def test_guard(arg, broken, generator):
    args = guard_inputs(generator)
    op.llama_layer(*args, backend="torch")  # the passing control
    with pytest.raises(ValueError, match=f"^{arg}:"):
        op.llama_layer(*broken(args), backend="torch")


def test_cpu_limits(generator):
    """The "cpu" backend's limits name the argument it cannot take."""
    args = guard_inputs(generator)
    assert op._cpu_limits(*args) is None
    assert op._cpu_limits(args[0].double(), *args[1:])[0] == "x"
    assert op._cpu_limits(torch.randn(2, 17, 40), *args[1:])[0] == "x"
    big = torch.zeros(2, 4, 1, 258)
    assert op._cpu_limits(*args[:4], big, big, *args[6:])[0] == "k_cache"
    strided = _weight(args, 1, args[2][1].T.contiguous().T)
    assert op._cpu_limits(*strided)[0] == "weights[1] (qkv)"


def test_cpu_out_guard(cpu, generator):
    args = guard_inputs(generator)
    good = (torch.empty_like(args[0]), torch.empty_like(args[0]))
    run_cpu(*args, out=good)  # the passing control
    with pytest.raises(ValueError, match=r"^out\[1\] \(h\):"):
        run_cpu(*args, out=(good[0], torch.empty(2, 2, 41)))


def test_set_isa_guard(cpu):
    cpu.set_isa(cpu.isa())  # the passing control
    with pytest.raises(ValueError, match="set_isa: expected"):
        cpu.set_isa("sse9")


def test_cpp_bounds_guard(cpu, generator):
    """The C++ side repeats the memory-safety check: a full cache raises, never writes."""
    args = guard_inputs(generator)
    run_cpu(*args)  # the passing control
    seqlens = torch.tensor([4, 0], dtype=torch.int32)  # 4 + 2 > Smax = 5
    with pytest.raises(ValueError, match="cache_seqlens"):
        op._launch_cpu(*args[:6], seqlens, *args[7:])


# ---------------------------------------------------------------- without the extension
def test_op_imports_without_cpu_module(monkeypatch):
    """A build without _cpu: the op module imports, says why "cpu" cannot run, and the torch
    backend still serves every call."""
    monkeypatch.setitem(sys.modules, "layerskip_kernels._cpu", None)
    monkeypatch.delattr(layerskip_kernels, "_cpu", raising=False)
    spec = importlib.util.spec_from_file_location("layerskip_kernels.ops._llama_layer_probe",
                                                  op.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._cpu is None
    assert "_cpu is not built" in module.cpu_unavailable_reason()
