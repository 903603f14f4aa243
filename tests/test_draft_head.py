"""draft_head (RMSNorm + lm_head + argmax / top-k): the reference and the Triton kernels
(interpreted on the CPU) against a float64 oracle written here; exact ties go to the lowest
index; poisoned outputs; the kernels compiled for sm_80 / sm_90 without a GPU; every argument
guard with a passing control."""
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES
from triton_compile import COMPILE_TARGETS, compile_kernel, compiled_in_children, main

from layerskip_kernels.ops.draft_head import (
    draft_head_argmax,
    draft_head_argmax_reference,
    draft_head_topk,
    draft_head_topk_reference,
)
from layerskip_kernels.triton.draft_head import (
    draft_head_argmax_triton,
    draft_head_topk_triton,
    launch_config,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (leading dims of h, dim, vocab)
    ((1,), 64, 512),
    ((3,), 100, 1001),  # odd dim and vocab
    ((4,), 128, 130),  # vocab just past one 128-token block
    ((4, 5), 48, 700),  # 20 rows: two row tiles when k > 16
]
# Each logit's error bound in fp16 / bf16: the normed h is rounded to the dtype (relative error
# <= UNIT) before an fp32-accumulated dot with weights the oracle shares, so
# |logit - oracle| <= UNIT * sum_i |z_i w_i| (+ fp32 accumulation, far below). Triton 3.8's
# interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even: twice the unit there.
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
INTERPRETED_BF16_UNIT = 2.0 ** -7


def oracle_logits(h, norm_weight, eps, lm_head_weight):
    """float64 throughout, the normed h unrounded: (logits, error bound of each logit)."""
    h64 = h.double()
    z = h64 / (h64.pow(2).mean(-1, keepdim=True) + eps).sqrt() * norm_weight.double()
    w = lm_head_weight.double()
    if h.dtype == torch.float32:
        atol, rtol = TOLERANCES[h.dtype]
        return z @ w.T, atol + rtol * (z @ w.T).abs()
    unit = INTERPRETED_BF16_UNIT if h.dtype == torch.bfloat16 else UNIT[h.dtype]
    return z @ w.T, unit * (z.abs() @ w.abs().T) + 1e-5


def make_inputs(lead, dim, vocab, dtype, generator):
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    return (randn(*lead, dim).to(dtype), (1 + 0.5 * randn(dim)).to(dtype), 1e-5,
            (randn(vocab, dim) / dim ** 0.5).to(dtype))


def shape_id(shape):
    lead, dim, vocab = shape
    return f"B{'x'.join(map(str, lead))}-D{dim}-V{vocab}"


def check_topk(values, indices, oracle, args, dtype, k):
    """values descending, within the bound of the oracle's top k; indices distinct, each
    token's oracle logit within its bound of its value (near-equal logits may swap places)."""
    logits64, bound = oracle
    want_values = logits64.topk(k, dim=-1).values
    assert (values[..., 1:] <= values[..., :-1]).all()
    assert ((values.double() - want_values).abs() <= bound.amax(-1, keepdim=True)).all()
    assert ((logits64.gather(-1, indices) - values.double()).abs()
            <= bound.gather(-1, indices)).all()
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()
    if dtype == torch.float32:  # the greedy decode's dtype: exactly the reference's tokens
        assert torch.equal(indices, draft_head_topk_reference(*args, k)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=shape_id)
def test_reference_matches_oracle(shape, dtype, generator):
    args = make_inputs(*shape, dtype, generator)
    oracle = oracle_logits(*args)
    tokens, max_logit = draft_head_argmax_reference(*args)
    assert tokens.dtype == torch.int64 and max_logit.dtype == torch.float32
    check_topk(max_logit[..., None], tokens[..., None], oracle, args, dtype, 1)
    values, indices = draft_head_topk_reference(*args, 7)
    check_topk(values, indices, oracle, args, dtype, 7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_triton_argmax_matches_oracle(shape, dtype, generator):
    args = make_inputs(*shape, dtype, generator)
    lead = shape[0]
    oracle = oracle_logits(*args)
    out = (torch.full(lead, -7, dtype=torch.int64), torch.full(lead, float("nan")))  # poisoned
    tokens, max_logit = draft_head_argmax_triton(*args, out=out)
    assert tokens is out[0] and max_logit is out[1] and not max_logit.isnan().any()
    check_topk(max_logit[..., None], tokens[..., None], oracle, args, dtype, 1)


# (shape, k): k 17 and 64 take the 512-token blocks; 20 rows with k 17 take two row tiles.
# The merge kernel's rounds are sequential: the interpreter's time grows with rows x k.
TOPK_CASES = [(SHAPES[0], 5), (SHAPES[1], 64), (SHAPES[2], 17), (SHAPES[3], 17)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, k", TOPK_CASES,
                         ids=lambda c: shape_id(c) if isinstance(c, tuple) else f"k{c}")
def test_triton_topk_matches_oracle(shape, k, dtype, generator):
    args = make_inputs(*shape, dtype, generator)
    lead = shape[0]
    out = (torch.full((*lead, k), float("nan")), torch.full((*lead, k), -7, dtype=torch.int64))
    values, indices = draft_head_topk_triton(*args, k, out=out)
    assert values is out[0] and indices is out[1]
    check_topk(values, indices, oracle_logits(*args), args, dtype, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ties_go_to_the_lowest_index(backend, dtype, generator):
    """Small integers everywhere and rms(h) = 1 (h = +-1, eps 0): every logit is an exact
    integer in every dtype, so equal logits are bit-equal and ties are many."""
    B, dim, vocab = 4, 100, 1001
    h = torch.randint(0, 2, (B, dim), generator=generator).to(dtype) * 2 - 1
    norm_weight = torch.randint(1, 3, (dim,), generator=generator).to(dtype)
    lm_head_weight = torch.randint(-1, 2, (vocab, dim), generator=generator).to(dtype)
    lm_head_weight[700] = lm_head_weight[int(draft_head_argmax_reference(
        h, norm_weight, 0.0, lm_head_weight)[0][0])]  # a tie across blocks for row 0 too
    logits64, _ = oracle_logits(h, norm_weight, 0.0, lm_head_weight)
    tokens, max_logit = draft_head_argmax(h, norm_weight, 0.0, lm_head_weight, backend=backend)
    assert torch.equal(tokens, logits64.argmax(-1))
    assert torch.equal(max_logit.double(), logits64.amax(-1))
    assert ((logits64 == logits64.amax(-1, keepdim=True)).sum(-1) > 1).any()
    k = 30  # more than the largest tie group: the order inside groups is checked
    values, indices = draft_head_topk(h, norm_weight, 0.0, lm_head_weight, k, backend=backend)
    want = torch.sort(logits64, dim=-1, descending=True, stable=True)
    assert torch.equal(indices, want.indices[:, :k])
    assert torch.equal(values.double(), want.values[:, :k])


def test_public_op_dispatches_to_triton(generator):
    args = make_inputs((2,), 100, 1001, torch.float32, generator)
    tokens, _ = draft_head_argmax(*args, backend="triton")
    assert torch.equal(tokens, draft_head_argmax_reference(*args)[0])
    _, indices = draft_head_topk(*args, 3, backend="triton")
    assert torch.equal(indices, draft_head_topk_reference(*args, 3)[1])


# ---------------------------------------------------------------- compiled for sm_80 / sm_90
COMPILE_CASES = [  # (kernel, dtype, rows, k)
    ("block", "bf16", 1, 1), ("block", "fp16", 64, 1), ("block", "fp32", 4, 1),
    ("block", "bf16", 8, 16), ("block", "bf16", 4, 64),
    ("merge", "fp32", 1, 1), ("merge", "fp32", 4, 64),
]


def compile_cases(capability):
    """Run in the child (see triton_compile): compile every COMPILE_CASES entry."""
    from layerskip_kernels.triton import draft_head as mod

    results = {}
    for kernel, dtype, rows, k in COMPILE_CASES:
        key = f"{kernel}-{dtype}-{rows}-{k}-sm{capability}"
        config = launch_config(rows, k)
        if kernel == "block":
            types = dict(Z=f"*{dtype}", W=f"*{dtype}", PART="*i64")
            constexprs = dict(K=k, BLOCK_B=config["BLOCK_B"], BLOCK_V=config["BLOCK_V"],
                              BLOCK_D=config["BLOCK_D"], UPCAST_DOT=False,
                              DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
            results[key] = compile_kernel(mod._draft_head_block_kernel, types, constexprs,
                                          capability, config["num_warps"])
        else:
            types = dict(PART="*i64", VALUES="*fp32", INDICES="*i64")
            constexprs = dict(K=k, K_PAD=k, CHUNK=mod.MERGE_CHUNK)
            results[key] = compile_kernel(mod._draft_head_merge_kernel, types, constexprs,
                                          capability, 4)
    return results


@pytest.fixture(scope="module")
def compiled():
    return compiled_in_children(Path(__file__))


@pytest.mark.parametrize("capability", COMPILE_TARGETS)
@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_compiles_for_gpu(case, capability, compiled):
    assert compiled["-".join(map(str, case)) + f"-sm{capability}"] == "ok"


# ---------------------------------------------------------------- argument guards
def guard_inputs(generator):
    h, norm_weight, eps, lm_head_weight = make_inputs((2,), 100, 1001, torch.float32, generator)
    return dict(h=h, norm_weight=norm_weight, eps=eps, lm_head_weight=lm_head_weight)


def bad_h_dtype(a):
    a["h"] = a["h"].to(torch.int64)


def bad_h_stride(a):
    a["h"] = torch.randn(2, 200)[:, ::2]


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
def test_bad_input_names_the_argument(corrupt, arg, backend, generator):
    draft_head_argmax(**guard_inputs(generator), backend=backend)  # control
    args = guard_inputs(generator)
    corrupt(args)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        draft_head_argmax(**args, backend=backend)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        draft_head_topk(**args, k=3, backend=backend)


@pytest.mark.parametrize("k, backend", [(0, "torch"), (1002, "torch"), (65, "triton"),
                                        (2.0, "torch")])
def test_bad_k(k, backend, generator):
    draft_head_topk(**guard_inputs(generator), k=64, backend=backend)  # control
    with pytest.raises(ValueError, match="^k:"):
        draft_head_topk(**guard_inputs(generator), k=k, backend=backend)


def test_triton_rejects_bad_out(generator):
    a = guard_inputs(generator)
    good = (torch.empty(2, 3), torch.empty(2, 3, dtype=torch.int64))
    draft_head_topk_triton(*a.values(), 3, out=good)  # control
    with pytest.raises(ValueError, match="^out indices:"):
        draft_head_topk_triton(*a.values(), 3, out=(good[0], good[1].int()))


@pytest.mark.gpu
def test_tensors_on_different_devices(generator):
    a = {k: v.cuda() if torch.is_tensor(v) else v for k, v in guard_inputs(generator).items()}
    draft_head_argmax(**a)  # control
    a["lm_head_weight"] = a["lm_head_weight"].cpu()
    with pytest.raises(ValueError, match="^lm_head_weight:"):
        draft_head_argmax(**a)


if __name__ == "__main__":  # the compile child of the `compiled` fixture
    main(compile_cases)
