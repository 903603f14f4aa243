"""draft_head (RMSNorm + lm_head + argmax / top-k): the reference and the Triton kernels
(interpreted on the CPU, compiled on a GPU: ``kernel_device``) against a float64 oracle written
here; both kernel variants (FMA, tl.dot), several merge levels, exact ties to the lowest index,
NaN as documented, poisoned outputs; the routing rules; every kernel config compiled for sm_80 /
sm_90 without a GPU; every argument guard with a passing control; on a GPU, Llama shapes."""
import importlib

import pytest
import torch
from conftest import TOLERANCES
from triton_compile import case_key, compile_report, compile_test, main

from layerskip_kernels.ops.draft_head import (
    MAX_KERNEL_ROWS,
    draft_head_argmax,
    draft_head_argmax_reference,
    draft_head_topk,
    draft_head_topk_reference,
)
from layerskip_kernels.triton.draft_head import (
    draft_head_argmax_triton,
    draft_head_topk_triton,
    launch_config,
    merge_group,
)

ops_draft_head = importlib.import_module("layerskip_kernels.ops.draft_head")  # not the function
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims of h, dim, vocab, launcher options): each line a path of the kernel.
CASES = [
    ((1,), 64, 512, {}),  # FMA, one row, 16-token blocks: 32 lists
    ((2,), 100, 1001, {}),  # FMA, two rows; odd dim (masked tail) and vocab
    ((3,), 100, 1001, {}),  # dot, 3 rows padded to 16
    ((4,), 128, 130, {"variant": "fma"}),  # FMA on 4 rows: two row blocks
    ((4, 5), 48, 700, {}),  # dot, 20 rows padded to 32
    ((1,), 64, 512, {"variant": "dot", "merge_keys": 4}),  # dot, one row; 3 merge levels
    ((70,), 32, 200, {"variant": "dot", "block_v": 64}),  # two 64-row tiles (launcher only)
]
# Each logit's error bound in fp16 / bf16: each element of z is rounded once to the dtype
# (relative error <= UNIT; the kernel rounds h * weight, the reference h * rstd * weight)
# before an fp32-accumulated dot with weights the oracle shares, so
# |logit - oracle| <= UNIT * sum_i |z_i w_i| (+ fp32 accumulation, far below). Triton's
# interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even: twice the unit.
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -7}


def oracle_logits(h, norm_weight, eps, lm_head_weight):
    """float64 throughout, the normed h unrounded: (logits, error bound of each logit)."""
    h64 = h.double()
    z = h64 / (h64.pow(2).mean(-1, keepdim=True) + eps).sqrt() * norm_weight.double()
    w = lm_head_weight.double()
    if h.dtype == torch.float32:
        atol, rtol = TOLERANCES[h.dtype]
        return z @ w.T, atol + rtol * (z.abs() @ w.abs().T)
    return z @ w.T, UNIT[h.dtype] * (z.abs() @ w.abs().T) + 1e-5


def make_inputs(lead, dim, vocab, dtype, generator, device="cpu"):
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    return (randn(*lead, dim).to(dtype).to(device), (1 + 0.5 * randn(dim)).to(dtype).to(device),
            1e-5, (randn(vocab, dim) / dim ** 0.5).to(dtype).to(device))


def case_id(case):
    lead, dim, vocab, options = case
    extra = "-".join(f"{k}{v}" for k, v in options.items())
    return f"B{'x'.join(map(str, lead))}-D{dim}-V{vocab}" + (f"-{extra}" if extra else "")


def check_topk(values, indices, oracle, args, dtype, k, exact=True):
    """values descending, within the bound of the oracle's top k; indices distinct, each
    token's oracle logit within its bound of its value (near-equal logits may swap places);
    in float32 on small shapes (exact) the reference's tokens."""
    logits64, bound = oracle
    values, indices = values.cpu(), indices.cpu()
    logits64, bound = logits64.cpu(), bound.cpu()
    want_values = logits64.topk(k, dim=-1).values
    assert (values[..., 1:] <= values[..., :-1]).all()
    assert ((values.double() - want_values).abs() <= bound.amax(-1, keepdim=True)).all()
    assert ((logits64.gather(-1, indices) - values.double()).abs()
            <= bound.gather(-1, indices)).all()
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()
    if dtype == torch.float32 and exact:  # the greedy decode's dtype: the reference's tokens
        assert torch.equal(indices, draft_head_topk_reference(*args, k)[1].cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[:2], ids=case_id)
def test_reference_matches_oracle(case, dtype, generator):
    args = make_inputs(*case[:3], dtype, generator)
    oracle = oracle_logits(*args)
    tokens, max_logit = draft_head_argmax_reference(*args)
    assert tokens.dtype == torch.int64 and max_logit.dtype == torch.float32
    check_topk(max_logit[..., None], tokens[..., None], oracle, args, dtype, 1)
    values, indices = draft_head_topk_reference(*args, 7)
    check_topk(values, indices, oracle, args, dtype, 7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_argmax_matches_oracle(case, dtype, generator, kernel_device):
    lead, dim, vocab, options = case
    args = make_inputs(lead, dim, vocab, dtype, generator, kernel_device)
    poisoned = (torch.full(lead, -7, dtype=torch.int64, device=kernel_device),
                torch.full(lead, float("nan"), device=kernel_device))
    tokens, max_logit = draft_head_argmax_triton(*args, out=poisoned, **options)
    assert tokens is poisoned[0] and max_logit is poisoned[1] and not max_logit.isnan().any()
    check_topk(max_logit[..., None], tokens[..., None], oracle_logits(*args), args, dtype, 1)


# (case, k): K_PAD 8 (rounds of max), 32 and 64 (rounds in the interpreter, tl.topk compiled);
# merge_keys 16 with K_PAD 8: lists merge two by two, over several levels.
TOPK_CASES = [(CASES[0], 5), (CASES[1], 64), ((CASES[2][:3] + ({"merge_keys": 16},)), 5),
              (CASES[3], 17), (CASES[4], 17)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, k", TOPK_CASES,
                         ids=lambda c: case_id(c) if isinstance(c, tuple) else f"k{c}")
def test_triton_topk_matches_oracle(case, k, dtype, generator, kernel_device):
    lead, dim, vocab, options = case
    args = make_inputs(lead, dim, vocab, dtype, generator, kernel_device)
    out = (torch.full((*lead, k), float("nan"), device=kernel_device),
           torch.full((*lead, k), -7, dtype=torch.int64, device=kernel_device))
    values, indices = draft_head_topk_triton(*args, k, out=out, **options)
    assert values is out[0] and indices is out[1]
    check_topk(values, indices, oracle_logits(*args), args, dtype, k)


def test_triton_sort_network_matches_rounds(generator, kernel_device):
    """tl.topk (the GPU's choice above 8 keys), forced in the interpreter on a small case: the
    same keys as rounds of max, in both stages."""
    args = make_inputs((2,), 32, 100, torch.float32, generator, kernel_device)
    network = draft_head_topk_triton(*args, 16, sort_network=True, block_v=16, merge_keys=64)
    rounds = draft_head_topk_triton(*args, 16, sort_network=False, block_v=16, merge_keys=64)
    assert torch.equal(network[0], rounds[0]) and torch.equal(network[1], rounds[1])
    assert torch.equal(network[1].cpu(), draft_head_topk_reference(*args, 16)[1].cpu())


def tie_inputs(generator, dtype, device):
    """Small integers everywhere and rms(h) = 1 (h = +-1, eps 0): every logit is an exact
    integer in every dtype, so equal logits are bit-equal and ties are many."""
    B, dim, vocab = 4, 100, 1001
    h = torch.randint(0, 2, (B, dim), generator=generator).to(dtype) * 2 - 1
    norm_weight = torch.randint(1, 3, (dim,), generator=generator).to(dtype)
    lm_head_weight = torch.randint(-1, 2, (vocab, dim), generator=generator).to(dtype)
    lm_head_weight[700] = lm_head_weight[int(draft_head_argmax_reference(
        h, norm_weight, 0.0, lm_head_weight)[0][0])]  # a tie across blocks for row 0 too
    return h.to(device), norm_weight.to(device), 0.0, lm_head_weight.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["torch", "fma", "dot"])
def test_ties_go_to_the_lowest_index(variant, dtype, generator, kernel_device):
    device = "cpu" if variant == "torch" else kernel_device
    args = tie_inputs(generator, dtype, device)
    logits64, _ = oracle_logits(*args)
    logits64 = logits64.cpu()
    if variant == "torch":
        argmax = lambda *a: draft_head_argmax(*a, backend="torch")  # noqa: E731
        topk = lambda *a: draft_head_topk(*a, backend="torch")  # noqa: E731
    else:
        argmax = lambda *a: draft_head_argmax_triton(*a, variant=variant, block_v=64)  # noqa
        topk = lambda *a: draft_head_topk_triton(*a, variant=variant, block_v=64)  # noqa
    tokens, max_logit = argmax(*args)
    assert torch.equal(tokens.cpu(), logits64.argmax(-1))
    assert torch.equal(max_logit.cpu().double(), logits64.amax(-1))
    assert ((logits64 == logits64.amax(-1, keepdim=True)).sum(-1) > 1).any()
    k = 30  # more than the largest tie group: the order inside groups is checked
    values, indices = topk(*args, k)
    want = torch.sort(logits64, dim=-1, descending=True, stable=True)
    assert torch.equal(indices.cpu(), want.indices[:, :k])
    assert torch.equal(values.cpu().double(), want.values[:, :k])


@pytest.mark.parametrize("variant", ["torch", "fma", "dot"])
def test_nan_counts_as_the_largest_logit(variant, generator, kernel_device):
    """A NaN weight row makes that token's logit NaN, which wins (as torch.argmax); a NaN in h
    makes the whole row NaN: token 0. Top-k puts NaN first."""
    device = "cpu" if variant == "torch" else kernel_device
    h, norm_weight, eps, lm_head_weight = make_inputs((3,), 64, 300, torch.float32, generator)
    lm_head_weight[123, 5] = float("nan")
    h[2, 7] = float("nan")
    args = (h.to(device), norm_weight.to(device), eps, lm_head_weight.to(device))
    if variant == "torch":
        tokens, max_logit = draft_head_argmax(*args, backend="torch")
        values, indices = draft_head_topk(*args, 3, backend="torch")
    else:
        tokens, max_logit = draft_head_argmax_triton(*args, variant=variant)
        values, indices = draft_head_topk_triton(*args, 3, variant=variant)
    assert tokens.tolist() == [123, 123, 0] and max_logit.isnan().tolist() == [True] * 3
    assert indices[:, 0].tolist() == [123, 123, 0] and values[:, 0].isnan().all()
    assert indices[2].tolist() == [0, 1, 2]  # all NaN: index order
    want = draft_head_topk_reference(*args, 3)
    assert torch.equal(indices[:2], want[1][:2])


def test_public_op_dispatches_to_triton(generator, kernel_device):
    args = make_inputs((2,), 100, 1001, torch.float32, generator, kernel_device)
    tokens, _ = draft_head_argmax(*args, backend="triton")
    assert torch.equal(tokens, draft_head_argmax_reference(*args)[0])
    _, indices = draft_head_topk(*args, 3, backend="triton")
    assert torch.equal(indices, draft_head_topk_reference(*args, 3)[1])


# ---------------------------------------------------------------- routing
def test_routing_rules_decline_what_they_say(generator, kernel_device):
    """The kernel's limits are the ROUTING table: past 64 rows or k 64 the Triton backend
    declines (a named backend raises, naming the argument; "auto" takes torch)."""
    assert [rule[0] for rule in ops_draft_head.ROUTING] == ["h", "k"]
    small = make_inputs((MAX_KERNEL_ROWS,), 32, 100, torch.float32, generator, kernel_device)
    assert ops_draft_head._kernel_limits(*small) is None
    draft_head_argmax(*small, backend="triton")  # control
    big = make_inputs((MAX_KERNEL_ROWS + 1,), 32, 100, torch.float32, generator, kernel_device)
    arg, expected, actual = ops_draft_head._kernel_limits(*big)
    assert arg == "h" and "64 rows" in expected and actual == "65 rows"
    with pytest.raises(ValueError, match="^h: expected at most 64 rows"):
        draft_head_argmax(*big, backend="triton")
    assert ops_draft_head._kernel_limits(*small, 65)[0] == "k"


@pytest.mark.gpu
def test_auto_routes_by_rows_on_a_gpu(generator):
    args = make_inputs((8,), 64, 1000, torch.bfloat16, generator, "cuda")
    assert ops_draft_head.DRAFT_HEAD_ARGMAX.resolve("auto", args[0].device, args) == "triton"
    big = make_inputs((65,), 64, 1000, torch.bfloat16, generator, "cuda")
    assert ops_draft_head.DRAFT_HEAD_ARGMAX.resolve("auto", big[0].device, big) == "torch"
    tokens, max_logit = draft_head_argmax(*big)  # the fp32-output GEMM path
    check_topk(max_logit[:, None], tokens[:, None], oracle_logits(*big), big, torch.bfloat16, 1)


def test_launch_config_splits_the_vocabulary_over_the_sms():
    """FMA blocks give >= 8 programs per SM on Llama vocabularies; dot blocks >= 4."""
    for vocab in (32000, 128256):
        fma = launch_config(1, vocab, 4096, 1, n_sm=132)
        assert not fma["USE_DOT"] and -(-vocab // fma["BLOCK_V"]) >= 8 * 132
        dot = launch_config(8, vocab, 4096, 1, n_sm=132)
        assert dot["USE_DOT"] and dot["BLOCK_B"] == 16 and -(-vocab // dot["BLOCK_V"]) >= 3 * 132
    assert launch_config(1, 128256, 2048, 50)["K_PAD"] == 64
    assert merge_group(64, 1002) == 32 and merge_group(1, 1002) == 1024
    assert merge_group(8, 3, merge_keys=8) == 2  # never 1 list per program: levels shrink


# ---------------------------------------------------------------- GPU: Llama shapes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("head", [(4096, 32000), (2048, 128256)], ids=["llama-2", "llama-3.2"])
def test_gpu_llama_heads_match_oracle(head, B, dtype, generator):
    dim, vocab = head
    args = make_inputs((B,), dim, vocab, dtype, generator, "cuda")
    oracle = oracle_logits(*args)
    tokens, max_logit = draft_head_argmax(*args, backend="triton")
    check_topk(max_logit[:, None], tokens[:, None], oracle, args, dtype, 1, exact=False)
    values, indices = draft_head_topk(*args, 50, backend="triton")
    check_topk(values, indices, oracle, args, dtype, 50, exact=False)
    values, indices = draft_head_topk(*args, 50, backend="torch")  # the fp32-output GEMM
    check_topk(values, indices, oracle, args, dtype, 50, exact=False)


@pytest.mark.gpu
def test_gpu_replays_in_a_cuda_graph(generator):
    """No host sync and shape-only grids: a captured head replays on new inputs."""
    args = make_inputs((2,), 2048, 128256, torch.bfloat16, generator, "cuda")
    out = draft_head_argmax(*args, backend="triton")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = draft_head_argmax(*args, backend="triton")
    args[0].copy_(torch.randn(args[0].shape, generator=generator).to(args[0]))
    graph.replay()
    assert torch.equal(out[0], draft_head_argmax(*args, backend="triton")[0])


# ---------------------------------------------------------------- compiled for sm_80 / sm_90
# ("partial", dtype, rows, vocab, dim, k, variant) or ("merge", k, group, final, network):
# every variant, block size, K_PAD path and stage count launch_config picks.
COMPILE_CASES = [
    ("partial", "bf16", 1, 128256, 2048, 1, None),  # FMA, 64-token blocks
    ("partial", "bf16", 2, 32000, 4096, 1, None),  # FMA, two rows, 16-token blocks
    ("partial", "fp16", 1, 32000, 4096, 8, None),  # FMA, top-8 by rounds
    ("partial", "bf16", 1, 128256, 2048, 64, None),  # FMA, top-64 by tl.topk
    ("partial", "fp32", 1, 1001, 100, 1, None),  # FMA fp32, masked dim tail
    ("partial", "bf16", 4, 32000, 4096, 1, None),  # dot, 64-token blocks, 4 stages
    ("partial", "bf16", 8, 128256, 2048, 1, None),  # dot, 128-token blocks, 3 stages
    ("partial", "fp16", 20, 32000, 2048, 9, None),  # dot, 32 rows, top-16 by tl.topk
    ("partial", "fp32", 3, 1001, 100, 5, None),  # dot fp32 (ieee), masked dim tail
    ("partial", "fp32", 64, 32000, 4096, 1, None),  # dot fp32, 64 rows: BLOCK_D 16
    ("merge", 1, 1024, True, False),
    ("merge", 8, 256, False, False),
    ("merge", 64, 32, False, True),
    ("merge", 9, 64, True, True),
]
# Odd dims are test shapes (no Llama has one): their unaligned rows may spill a few bytes.
SPILLS_ALLOWED = {("partial", "fp32", 3, 1001, 100, 5, None)}


def compile_cases(capability):
    """Run in the child (see triton_compile): compile every COMPILE_CASES entry, with the
    pointers and strides aligned as the launcher specializes them on Llama shapes."""
    import triton

    from layerskip_kernels.triton import draft_head as mod

    results = {}
    for case in COMPILE_CASES:
        key = case_key(case, capability)
        if case[0] == "partial":
            _, dtype, rows, vocab, dim, k, variant = case
            size = 4 if dtype == "fp32" else 2
            config = launch_config(rows, vocab, dim, k, size, variant=variant)
            num_warps = config.pop("num_warps")
            constexprs = dict(DIM=dim, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                              UPCAST_DOT=False, SORT_NETWORK=config["K_PAD"] > 8, **config)
            types = dict(H=f"*{dtype}", NW=f"*{dtype}", W=f"*{dtype}", PART="*i64", eps="fp32")
            aligned = ["H", "NW", "W", "PART"] + (["stride_h", "stride_w"] if dim % 16 == 0
                                                   else [])
            results[key] = compile_report(mod._draft_head_partial_kernel, types, constexprs,
                                          capability, num_warps, aligned=aligned)
        else:
            _, k, group, final, network = case
            constexprs = dict(K=k, K_PAD=triton.next_power_of_2(k), GROUP=group, FINAL=final,
                              SORT_NETWORK=network)
            types = dict(PART="*i64", OUT="*i64", VALUES="*fp32", INDICES="*i64")
            results[key] = compile_report(mod._draft_head_merge_kernel, types, constexprs,
                                          capability, 4, aligned=list(types))
    return results


compiled, test_kernel_compiles_for_gpu = compile_test(
    __file__, COMPILE_CASES, may_spill=lambda case: case in SPILLS_ALLOWED)


# ---------------------------------------------------------------- argument guards
def guard_inputs(generator, device="cpu"):
    h, norm_weight, eps, lm_head_weight = make_inputs((2,), 100, 1001, torch.float32, generator,
                                                      device)
    return dict(h=h, norm_weight=norm_weight, eps=eps, lm_head_weight=lm_head_weight)


def bad_h_dtype(a):
    a["h"] = a["h"].to(torch.int64)


def bad_h_stride(a):
    a["h"] = torch.randn(2, 200, device=a["h"].device)[:, ::2]


def bad_norm_weight(a):
    a["norm_weight"] = a["norm_weight"][:50]


def bad_eps(a):
    a["eps"] = None


def bad_lm_head_shape(a):
    a["lm_head_weight"] = a["lm_head_weight"][:, :99]


def bad_lm_head_dtype(a):
    a["lm_head_weight"] = a["lm_head_weight"].half()


def bad_lm_head_stride(a):
    a["lm_head_weight"] = a["lm_head_weight"].T.contiguous().T


@pytest.mark.parametrize("corrupt, arg", [
    (bad_h_dtype, "h"), (bad_h_stride, "h"), (bad_norm_weight, "norm_weight"), (bad_eps, "eps"),
    (bad_lm_head_shape, "lm_head_weight"), (bad_lm_head_dtype, "lm_head_weight"),
    (bad_lm_head_stride, "lm_head_weight"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_names_the_argument(corrupt, arg, backend, generator, kernel_device):
    device = "cpu" if backend == "torch" else kernel_device
    draft_head_argmax(**guard_inputs(generator, device), backend=backend)  # control
    args = guard_inputs(generator, device)
    corrupt(args)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        draft_head_argmax(**args, backend=backend)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        draft_head_topk(**args, k=3, backend=backend)


@pytest.mark.parametrize("k, backend", [(0, "torch"), (1002, "torch"), (65, "triton"),
                                        (2.0, "torch")])
def test_bad_k(k, backend, generator, kernel_device):
    device = "cpu" if backend == "torch" else kernel_device
    draft_head_topk(**guard_inputs(generator, device), k=64, backend=backend)  # control
    with pytest.raises(ValueError, match="^k:"):
        draft_head_topk(**guard_inputs(generator, device), k=k, backend=backend)


def test_triton_rejects_bad_out(generator, kernel_device):
    a = guard_inputs(generator, kernel_device)
    good = (torch.empty(2, 3, device=kernel_device),
            torch.empty(2, 3, dtype=torch.int64, device=kernel_device))
    draft_head_topk_triton(*a.values(), 3, out=good)  # control
    with pytest.raises(ValueError, match="^out indices:"):
        draft_head_topk_triton(*a.values(), 3, out=(good[0], good[1].int()))


def test_triton_rejects_an_unknown_variant(generator, kernel_device):
    with pytest.raises(ValueError, match="^variant:"):
        draft_head_argmax_triton(*guard_inputs(generator, kernel_device).values(),
                                 variant="gemm")


@pytest.mark.gpu
def test_tensors_on_different_devices(generator):
    a = guard_inputs(generator, "cuda")
    draft_head_argmax(**a)  # control
    a["lm_head_weight"] = a["lm_head_weight"].cpu()
    with pytest.raises(ValueError, match="^lm_head_weight:"):
        draft_head_argmax(**a)


if __name__ == "__main__":  # the compile child of the `compiled` fixture
    main(compile_cases)
