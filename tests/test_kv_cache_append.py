"""kv_cache_append: reference against a hand-written loop, the Triton kernel (compiled on a GPU,
interpreted on the CPU) and the CUDA kernel bit for bit against it, the Triton kernel compiled
for sm_80 / sm_90 without a GPU, and every argument guard with a passing control."""

import pytest
import torch
from triton_compile import case_key, compile_report, compile_test, main

from layerskip_kernels import _ext
from layerskip_kernels.ops.kv_cache_append import (
    _check_kv_cache_append,
    kv_cache_append,
    kv_cache_append_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, Smax, H, D, S); the odd ones: B 3, Smax 13, H 1
    (1, 16, 1, 64, 1),
    (2, 16, 2, 128, 5),
    (3, 13, 8, 64, 5),
    (4, 32, 8, 128, 1),
]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def make_inputs(B, Smax, H, D, S, dtype, generator, device="cpu"):
    """NaN-poisoned caches, random new rows, ragged cache lengths (first row full to Smax)."""
    k_cache = torch.full((B, Smax, H, D), float("nan"), dtype=dtype)
    v_cache = torch.full((B, Smax, H, D), float("nan"), dtype=dtype)
    k_new = torch.randn(B, S, H, D, generator=generator).to(dtype)
    v_new = torch.randn(B, S, H, D, generator=generator).to(dtype)
    seqlens = torch.randint(0, Smax - S + 1, (B,), generator=generator, dtype=torch.int32)
    seqlens[0] = Smax - S
    return [t.to(device) for t in (k_cache, v_cache, k_new, v_new, seqlens)]


def expected(k_cache, v_cache, k_new, v_new, seqlens):
    k_out, v_out = k_cache.clone(), v_cache.clone()
    for b, start in enumerate(seqlens.tolist()):
        for i in range(k_new.shape[1]):
            k_out[b, start + i] = k_new[b, i]
            v_out[b, start + i] = v_new[b, i]
    return k_out, v_out


def assert_bits_equal(actual, want):
    """Bit-exact, NaN poison included: written rows are copies, unwritten rows untouched."""
    dtype = BITS[want.dtype]
    assert torch.equal(actual.cpu().view(dtype), want.cpu().view(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_reference_matches_loop(shape, dtype, backend, generator):
    k_cache, v_cache, k_new, v_new, seqlens = make_inputs(*shape, dtype, generator)
    k_want, v_want = expected(k_cache, v_cache, k_new, v_new, seqlens)
    seqlens_before = seqlens.clone()
    kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, backend=backend)
    assert_bits_equal(k_cache, k_want)
    assert_bits_equal(v_cache, v_want)
    assert torch.equal(seqlens, seqlens_before)


# Odd sizes for the Triton kernel: D 5 and 96 (rows not of 16-byte units), a single head, every
# row written (S = Smax), no new row (S = 0), and rows of two blocks (7 * 8 * 128 elements).
TRITON_SHAPES = SHAPES + [(2, 9, 3, 5, 3), (3, 7, 2, 96, 4), (2, 6, 1, 3, 6), (2, 4, 4, 32, 0),
                          (2, 40, 8, 128, 7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_loop(shape, dtype, generator, kernel_device):
    args = make_inputs(*shape, dtype, generator, kernel_device)
    k_want, v_want = expected(*(t.cpu() for t in args))
    seqlens_before = args[4].clone()
    kv_cache_append(*args, backend="triton")
    assert_bits_equal(args[0], k_want)
    assert_bits_equal(args[1], v_want)
    assert torch.equal(args[4], seqlens_before)


def test_triton_drops_rows_past_the_cache(generator, kernel_device):
    """A bad length (unchecked on a GPU without check_bounds) writes only the rows that exist:
    the kernel never stores out of bounds."""
    from layerskip_kernels.triton.kv_cache_append import kv_cache_append_triton

    k_cache, v_cache, k_new, v_new, seqlens = make_inputs(2, 8, 2, 16, 3, torch.float16,
                                                          generator, kernel_device)
    seqlens.copy_(torch.tensor([7, 0], dtype=torch.int32))  # Smax 8: row 0 fits 1 of 3 rows
    k_want, v_want = k_cache.cpu().clone(), v_cache.cpu().clone()
    k_want[0, 7], v_want[0, 7] = k_new[0, 0].cpu(), v_new[0, 0].cpu()
    k_want[1, :3], v_want[1, :3] = k_new[1].cpu(), v_new[1].cpu()
    kv_cache_append_triton(k_cache, v_cache, k_new, v_new, seqlens)
    assert_bits_equal(k_cache, k_want)
    assert_bits_equal(v_cache, v_want)


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available() or not _ext.cuda_available():
        pytest.skip(f"CUDA backend unavailable: {_ext.cuda_unavailable_reason()}")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(2, 9, 3, 5, 3)])  # row of 15 elements: no 16-byte units
def test_cuda_matches_reference(shape, dtype, generator, cuda_device):
    k_cache, v_cache, k_new, v_new, seqlens = make_inputs(*shape, dtype, generator, cuda_device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_cache_append_reference(k_ref, v_ref, k_new, v_new, seqlens)
    kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, backend="cuda", check_bounds=True)
    torch.cuda.synchronize()
    assert_bits_equal(k_cache, k_ref)
    assert_bits_equal(v_cache, v_ref)


def test_cuda_backend_on_cpu_raises(generator):
    args = make_inputs(2, 8, 2, 64, 1, torch.float16, generator)
    with pytest.raises(RuntimeError, match="cuda"):
        kv_cache_append(*args, backend="cuda")


def test_unknown_backend_raises(generator):
    args = make_inputs(2, 8, 2, 64, 1, torch.float16, generator)
    with pytest.raises(ValueError, match="^backend"):
        kv_cache_append(*args, backend="flash")


def _bad(name, fn):
    return pytest.param(name, fn, id=f"{name}-{fn.__name__}")


def wrong_rank(t):
    return t[0]


def wrong_heads(t):
    return t[:, :, :1].contiguous()


def wrong_dtype(t):
    return t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)


def non_contiguous(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def on_meta(t):
    return t.to("meta")


def seqlens_int64(t):
    return t.long()


def seqlens_overflow(t):
    return t + 100


def seqlens_negative(t):
    return t - 100


def wrong_batch(t):
    return t[:1]


GUARDS = [
    _bad("k_cache", wrong_rank), _bad("v_cache", wrong_heads), _bad("k_new", wrong_heads),
    _bad("v_new", wrong_batch), _bad("v_cache", wrong_dtype), _bad("k_new", wrong_dtype),
    _bad("v_new", non_contiguous), _bad("k_cache", non_contiguous), _bad("k_new", on_meta),
    _bad("cache_seqlens", on_meta),
    _bad("cache_seqlens", seqlens_int64), _bad("cache_seqlens", wrong_batch),
    _bad("cache_seqlens", seqlens_overflow), _bad("cache_seqlens", seqlens_negative),
]
NAMES = ["k_cache", "v_cache", "k_new", "v_new", "cache_seqlens"]


@pytest.mark.parametrize("name, corrupt", GUARDS)
def test_guards(name, corrupt, generator):
    args = make_inputs(2, 8, 2, 64, 3, torch.float16, generator)
    _check_kv_cache_append(*args)  # passing control
    args[NAMES.index(name)] = corrupt(args[NAMES.index(name)])
    with pytest.raises(ValueError, match=f"^{name}:"):
        _check_kv_cache_append(*args)


def test_k_cache_dtype_guard(generator):
    args = [t.double() if t.is_floating_point() else t
            for t in make_inputs(2, 8, 2, 64, 3, torch.float16, generator)]
    with pytest.raises(ValueError, match="^k_cache:"):
        _check_kv_cache_append(*args)


# ---------------------------------------------------------------- compiled for sm_80 / sm_90
# (bits, H * D, whether span and cache_elems are multiples of 16 as the launcher then
# specializes them): rows of 16-byte units, and rows of 15 or 5 elements.
COMPILE_CASES = [(bits, row, sizes_aligned) for bits in ("i16", "i32")
                 for row, sizes_aligned in ((1024, True), (15, False), (15, True), (5, False))]


def compile_cases(capability):
    """Run in the child (see triton_compile): compile every COMPILE_CASES entry."""
    from layerskip_kernels.triton import kv_cache_append as mod

    results = {}
    for case in COMPILE_CASES:
        bits, row, sizes_aligned = case
        config = dict(mod.launch_config(row, 2 if bits == "i16" else 4))
        num_warps = config.pop("num_warps")
        fn = mod._kv_cache_append_kernel
        types = {name: f"*{bits}" for name in ("K_CACHE", "V_CACHE", "K_NEW", "V_NEW")}
        types.update(SEQLENS="*i32")
        aligned = ["K_CACHE", "V_CACHE", "K_NEW", "V_NEW", "SEQLENS"]
        aligned += ["span", "cache_elems"] if sizes_aligned else []
        results[case_key(case, capability)] = compile_report(
            fn, types, config, capability, num_warps, aligned=aligned)
    return results



compiled, test_kernel_compiles_for_gpu = compile_test(__file__, COMPILE_CASES)


if __name__ == "__main__":  # the compile child of the `compiled` fixture
    main(compile_cases)
