"""kv_cache_append: reference against a hand-written loop, the CUDA kernel against the
reference, and every argument guard with a passing control."""
import pytest
import torch

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
