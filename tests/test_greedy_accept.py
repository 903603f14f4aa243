"""greedy_accept: the reference and the Triton kernel (interpreted on the CPU) against a loop
written here and against decoding.self_speculative.accept() in greedy mode; argmax ties;
from logits and from tokens; poisoned outputs; the kernel compiled for sm_80 / sm_90 without a
GPU; every argument guard with a passing control."""
from pathlib import Path

import pytest
import torch
from triton_compile import COMPILE_TARGETS, compile_kernel, compiled_in_children, main

from layerskip_kernels.decoding.self_speculative import accept
from layerskip_kernels.ops.greedy_accept import greedy_accept, greedy_accept_reference
from layerskip_kernels.triton.greedy_accept import greedy_accept_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [  # (B, k, vocab)
    (1, 1, 64),
    (2, 4, 1001),  # odd vocab
    (3, 8, 2500),  # three 1024-wide chunks
    (4, 5, 300),
    (2, 0, 100),  # no drafts: only the full model's token
]


def expected(drafts, logits, seqlens, active):
    """The round, one row and one position at a time, in float64."""
    accepted, next_token, new = [], [], []
    for b in range(drafts.shape[0]):
        target = [int(row.double().argmax()) for row in logits[b]]
        m = 0
        while m < drafts.shape[1] and int(drafts[b, m]) == target[m]:
            m += 1
        accepted.append(m)
        next_token.append(target[m])
        new.append(int(seqlens[b]) + (m + 1 if bool(active[b]) else 0))
    return (torch.tensor(accepted, dtype=torch.int32), torch.tensor(next_token),
            torch.tensor(new, dtype=torch.int32))


def make_inputs(B, k, vocab, dtype, generator, ties=False):
    """Random logits (small integers when ties: many equal maxima), drafts that agree with the
    argmax for a random prefix (the first row: all k, the last: none), then disagree."""
    if ties:
        logits = torch.randint(-3, 4, (B, k + 1, vocab), generator=generator).to(dtype)
    else:
        logits = torch.randn(B, k + 1, vocab, generator=generator).to(dtype)
    target = logits.argmax(-1)
    drafts = torch.randint(0, vocab, (B, k), generator=generator)
    agree = torch.randint(0, k + 1, (B,), generator=generator)
    agree[0], agree[-1] = k, 0 if B > 1 else k
    for b in range(B):
        m = int(agree[b])
        drafts[b, :m] = target[b, :m]
        if m < k:
            drafts[b, m] = (target[b, m] + 1) % vocab  # a sure mismatch
    seqlens = torch.randint(0, 50, (B,), generator=generator, dtype=torch.int32)
    active = torch.rand(B, generator=generator) < 0.7
    active[0] = True
    return drafts, logits, seqlens, active


def case_id(case):
    return "B{}-k{}-V{}".format(*case)


def poisoned(B):
    return (torch.full((B,), -7, dtype=torch.int32), torch.full((B,), -7, dtype=torch.int64),
            torch.full((B,), -7, dtype=torch.int32))


def assert_round(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert torch.equal(g, w)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_loop_and_accept(case, dtype, ties, generator):
    args = make_inputs(*case, dtype, generator, ties)
    seqlens_before = args[2].clone()
    got = greedy_accept_reference(*args)
    assert_round(got, expected(*args))
    m, next_token = accept(args[0], None, args[1], (0.0, 0, 1.0), None)
    assert torch.equal(got[0].long(), m) and torch.equal(got[1], next_token)
    assert torch.equal(args[2], seqlens_before)


@pytest.mark.parametrize("source", ["logits", "tokens"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_loop(case, dtype, ties, source, generator):
    drafts, logits, seqlens, active = make_inputs(*case, dtype, generator, ties)
    verify = logits if source == "logits" else logits.argmax(-1)
    out = poisoned(case[0])  # every element must be overwritten
    got = greedy_accept_triton(drafts, verify, seqlens, active, out=out)
    assert all(g is o for g, o in zip(got, out))
    assert_round(got, expected(drafts, logits, seqlens, active))


def test_triton_reads_strided_inputs(generator):
    """Rows and positions at any stride: drafts and logits sliced out of larger tensors."""
    drafts, logits, seqlens, active = make_inputs(3, 4, 1001, torch.float32, generator)
    wide_drafts = torch.zeros(3, 8, dtype=torch.int64)
    wide_drafts[:, ::2] = drafts
    wide_logits = torch.zeros(3, 10, 1001)
    wide_logits[:, ::2] = logits
    got = greedy_accept(wide_drafts[:, ::2], wide_logits[:, ::2], seqlens, active,
                        backend="triton")
    assert_round(got, expected(drafts, logits, seqlens, active))


# ---------------------------------------------------------------- compiled for sm_80 / sm_90
COMPILE_CASES = [("bf16", 4), ("fp16", 8), ("fp32", 1), ("i64", 4)]  # (verify dtype, k)


def compile_cases(capability):
    """Run in the child (see triton_compile): compile every COMPILE_CASES entry."""
    import triton

    from layerskip_kernels.triton import greedy_accept as mod

    results = {}
    for dtype, k in COMPILE_CASES:
        types = dict(DRAFTS="*i64", VERIFY=f"*{dtype}", SEQLENS="*i32", ACTIVE="*u8",
                     ACCEPTED="*i32", NEXT="*i64", NEW_SEQLENS="*i32")
        constexprs = dict(K=k, BLOCK_K=triton.next_power_of_2(k + 1), BLOCK_V=1024,
                          FROM_LOGITS=dtype != "i64")
        results[f"{dtype}-{k}-sm{capability}"] = compile_kernel(
            mod._greedy_accept_kernel, types, constexprs, capability, 4)
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
    drafts, logits, seqlens, active = make_inputs(2, 3, 100, torch.float32, generator)
    return dict(drafts=drafts, verify_logits=logits, cache_seqlens=seqlens, active=active)


def bad_drafts_dtype(a):
    a["drafts"] = a["drafts"].int()


def bad_logits_shape(a):
    a["verify_logits"] = a["verify_logits"][:, :-1]


def bad_tokens_shape(a):
    a["verify_logits"] = a["verify_logits"].argmax(-1)[:, :-1]


def bad_logits_dtype(a):
    a["verify_logits"] = a["verify_logits"].double()


def bad_logits_stride(a):
    a["verify_logits"] = a["verify_logits"].transpose(1, 2).contiguous().transpose(1, 2)


def bad_seqlens(a):
    a["cache_seqlens"] = a["cache_seqlens"].long()


def bad_active(a):
    a["active"] = a["active"].int()


@pytest.mark.parametrize("corrupt, arg", [
    (bad_drafts_dtype, "drafts"), (bad_logits_shape, "verify_logits"),
    (bad_tokens_shape, "verify_logits"), (bad_logits_dtype, "verify_logits"),
    (bad_logits_stride, "verify_logits"), (bad_seqlens, "cache_seqlens"),
    (bad_active, "active"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_names_the_argument(corrupt, arg, backend, generator):
    greedy_accept(**guard_inputs(generator), backend=backend)  # control
    args = guard_inputs(generator)
    corrupt(args)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        greedy_accept(**args, backend=backend)


def test_triton_rejects_bad_out(generator):
    a = guard_inputs(generator)
    greedy_accept_triton(*a.values(), out=poisoned(2))  # control
    bad = poisoned(2)
    with pytest.raises(ValueError, match="^out next_token:"):
        greedy_accept_triton(*a.values(), out=(bad[0], bad[1].int(), bad[2]))


@pytest.mark.gpu
def test_tensors_on_different_devices(generator):
    a = {k: v.cuda() for k, v in guard_inputs(generator).items()}
    greedy_accept(**a)  # control
    a["active"] = a["active"].cpu()
    with pytest.raises(ValueError, match="^active:"):
        greedy_accept(**a)


if __name__ == "__main__":  # the compile child of the `compiled` fixture
    main(compile_cases)
