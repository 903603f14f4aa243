"""greedy_accept: the reference and the Triton kernels (interpreted on the CPU, compiled on a
GPU: ``kernel_device``) against a loop written here and against
decoding.self_speculative.accept() in greedy mode; argmax ties within and across vocabulary
blocks; NaN as torch.argmax; from logits and from tokens; poisoned outputs; the kernels
compiled for sm_80 / sm_90 without a GPU; every argument guard with a passing control."""
import importlib

import pytest
import torch
from triton_compile import case_key, compile_report, compile_test, main

from layerskip_kernels.decoding.self_speculative import accept
from layerskip_kernels.ops.greedy_accept import greedy_accept, greedy_accept_reference
from layerskip_kernels.triton.greedy_accept import block_v, greedy_accept_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [  # (B, k, vocab)
    (1, 1, 64),
    (2, 4, 1001),  # odd vocab
    (3, 8, 2500),
    (4, 5, 300),
    (2, 0, 100),  # no drafts: only the full model's token
    (2, 3, 9000),  # three 4096-token blocks, the last ragged
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


def poisoned(B, device="cpu"):
    return (torch.full((B,), -7, dtype=torch.int32, device=device),
            torch.full((B,), -7, dtype=torch.int64, device=device),
            torch.full((B,), -7, dtype=torch.int32, device=device))


def assert_round(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert torch.equal(g.cpu(), w.cpu())


def on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


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
def test_triton_matches_loop(case, dtype, ties, source, generator, kernel_device):
    drafts, logits, seqlens, active = make_inputs(*case, dtype, generator, ties)
    verify = logits if source == "logits" else logits.argmax(-1)
    out = poisoned(case[0], kernel_device)  # every element must be overwritten
    got = greedy_accept_triton(*on(kernel_device, drafts, verify, seqlens, active), out=out)
    assert all(g is o for g, o in zip(got, out))
    assert_round(got, expected(drafts, logits, seqlens, active))


def test_triton_ties_across_vocabulary_blocks(generator, kernel_device):
    """The maximum in two blocks: the lower id wins, whichever block's key merges first."""
    drafts, logits, seqlens, active = make_inputs(2, 2, 9000, torch.bfloat16, generator)
    logits[:, :, 8500] = logits[:, :, 100] = 50.0  # blocks 0 and 2
    logits[1, 1, 4100] = 50.0  # row 1, position 1: blocks 0, 1 and 2
    got = greedy_accept_triton(*on(kernel_device, drafts, logits, seqlens, active))
    assert_round(got, expected(drafts, logits, seqlens, active))


def test_triton_nan_counts_as_the_largest_logit(generator, kernel_device):
    """As torch.argmax (the reference): a NaN logit is the position's token, the first NaN
    when there are several."""
    drafts, logits, seqlens, active = make_inputs(2, 3, 5000, torch.float32, generator)
    logits[0, 1, 4500] = float("nan")
    logits[1, 0, [300, 4200]] = float("nan")
    drafts[0, :2] = torch.tensor([int(logits[0, 0].argmax()), 4500])
    drafts[1, 0] = 300
    got = greedy_accept_triton(*on(kernel_device, drafts, logits, seqlens, active))
    want = greedy_accept_reference(drafts, logits, seqlens, active)
    assert_round(got, want)
    assert int(want[0][0]) >= 2 and int(want[0][1]) >= 1


def test_triton_reads_strided_inputs(generator, kernel_device):
    """Rows and positions at any stride: drafts and logits sliced out of larger tensors."""
    drafts, logits, seqlens, active = make_inputs(3, 4, 1001, torch.float32, generator)
    wide_drafts = torch.zeros(3, 8, dtype=torch.int64)
    wide_drafts[:, ::2] = drafts
    wide_logits = torch.zeros(3, 10, 1001)
    wide_logits[:, ::2] = logits
    wide_drafts, wide_logits, seqlens_d, active_d = on(kernel_device, wide_drafts, wide_logits,
                                                      seqlens, active)
    for verify in (wide_logits[:, ::2], wide_logits[:, ::2].argmax(-1)):
        got = greedy_accept(wide_drafts[:, ::2], verify, seqlens_d, active_d, backend="triton")
        assert_round(got, expected(drafts, logits, seqlens, active))


def test_block_v_splits_the_vocabulary():
    assert block_v(128256, 9) == 4096 and block_v(128256, 576) == 8192
    assert block_v(100, 9) == 128


def test_routing_keeps_every_shape_on_the_kernels():
    assert importlib.import_module("layerskip_kernels.ops.greedy_accept").ROUTING == ()


@pytest.mark.gpu
@pytest.mark.parametrize("B, k", [(1, 8), (8, 4), (64, 8)])
def test_gpu_llama_vocabulary(B, k, generator):
    drafts, logits, seqlens, active = make_inputs(B, k, 128256, torch.bfloat16, generator)
    want = greedy_accept_reference(drafts, logits, seqlens, active)
    args = on("cuda", drafts, logits, seqlens, active)
    assert_round(greedy_accept(*args, backend="triton"), want)
    graph, out = torch.cuda.CUDAGraph(), None  # shape-only grids, no sync: capturable
    with torch.cuda.graph(graph):
        out = greedy_accept(*args, backend="triton")
    graph.replay()
    assert_round(out, want)


# ---------------------------------------------------------------- compiled for sm_80 / sm_90
# ("partial", logits dtype, k, vocab, rows) or ("accept", k, vocab blocks or 0 for tokens)
COMPILE_CASES = [("partial", "bf16", 8, 128256, 9), ("partial", "fp16", 4, 128256, 320),
                 ("partial", "fp32", 1, 1001, 2), ("accept", 8, 32), ("accept", 16, 16),
                 ("accept", 4, 0)]


def compile_cases(capability):
    """Run in the child (see triton_compile): compile every COMPILE_CASES entry."""
    import triton

    from layerskip_kernels.triton import greedy_accept as mod

    results = {}
    for case in COMPILE_CASES:
        key = case_key(case, capability)
        if case[0] == "partial":
            _, dtype, k, vocab, rows = case
            bv = mod.block_v(vocab, rows)
            aligned = ["VERIFY", "PART", "stride_vb", "stride_vk"] + (
                ["vocab"] if vocab % 16 == 0 else [])
            results[key] = compile_report(
                mod._verify_argmax_partial_kernel, dict(VERIFY=f"*{dtype}", PART="*i64"),
                dict(K1=k + 1, BLOCK_V=bv), capability, 4 if bv <= 4096 else 8, aligned=aligned)
        else:
            _, k, blocks = case
            types = dict(DRAFTS="*i64", VERIFY="*i64", SEQLENS="*i32", ACTIVE="*u8",
                         ACCEPTED="*i32", NEXT="*i64", NEW_SEQLENS="*i32")
            constexprs = dict(K=k, BLOCK_K=triton.next_power_of_2(k + 1),
                              BLOCKS_PAD=triton.next_power_of_2(max(blocks, 1)),
                              FROM_PARTIAL=blocks > 0)
            results[key] = compile_report(mod._greedy_accept_kernel, types, constexprs,
                                          capability, 4, aligned=list(types))
    return results


compiled, test_kernel_compiles_for_gpu = compile_test(__file__, COMPILE_CASES)


# ---------------------------------------------------------------- argument guards
def guard_inputs(generator, device="cpu"):
    args = on(device, *make_inputs(2, 3, 100, torch.float32, generator))
    return dict(zip(("drafts", "verify_logits", "cache_seqlens", "active"), args))


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
def test_bad_input_names_the_argument(corrupt, arg, backend, generator, kernel_device):
    device = "cpu" if backend == "torch" else kernel_device
    greedy_accept(**guard_inputs(generator, device), backend=backend)  # control
    args = guard_inputs(generator, device)
    corrupt(args)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        greedy_accept(**args, backend=backend)


def test_triton_rejects_bad_out(generator, kernel_device):
    a = guard_inputs(generator, kernel_device)
    greedy_accept_triton(*a.values(), out=poisoned(2, kernel_device))  # control
    bad = poisoned(2, kernel_device)
    with pytest.raises(ValueError, match="^out next_token:"):
        greedy_accept_triton(*a.values(), out=(bad[0], bad[1].int(), bad[2]))


@pytest.mark.gpu
def test_tensors_on_different_devices(generator):
    a = guard_inputs(generator, "cuda")
    greedy_accept(**a)  # control
    a["active"] = a["active"].cpu()
    with pytest.raises(ValueError, match="^active:"):
        greedy_accept(**a)


if __name__ == "__main__":  # the compile child of the `compiled` fixture
    main(compile_cases)
