"""rms_norm: the reference and the Triton kernel (interpreted on the CPU, compiled on a GPU:
``kernel_device``) against a float64 oracle written here, with and without the fused residual
add, one and several rows per program; poisoned outputs; NaN stays in its row; the kernel
compiled for sm_80 / sm_90 without a GPU for every tile shape; every argument guard with a
passing control."""
import importlib

import pytest
import torch
from conftest import TOLERANCES
from triton_compile import case_key, compile_report, compile_test, main

from layerskip_kernels.ops.rms_norm import MAX_KERNEL_DIM, rms_norm, rms_norm_reference
from layerskip_kernels.triton.rms_norm import launch_config, rms_norm_triton

ops_rms_norm = importlib.import_module("layerskip_kernels.ops.rms_norm")  # not the function
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # x's shape; "strided": rows 2 * dim apart (a view, leading dims not contiguous)
    (1, 64),
    (3, 100),  # odd dim; 3 rows in one 4-row program
    (2, 3, 4096),
    (4, 257),  # odd dim past a power of 2
    (37, 64),  # 32 rows per program: a full program and a ragged one
    "strided",
]


def oracle(x, weight, eps, residual=None):
    """float64. h = x + residual as PyTorch adds in x's dtype (the op's contract), then the norm."""
    h = x if residual is None else x + residual
    h64 = h.double()
    y = h64 / (h64.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.double()
    return y, h


def make_inputs(shape, dtype, generator, device="cpu"):
    """Random, never zero: x, a residual of the same shape and a weight around 1."""
    if shape == "strided":
        x = torch.randn(6, 100, generator=generator).to(dtype).to(device)[::2]
        residual = torch.randn(6, 100, generator=generator).to(dtype).to(device)[1::2]
    else:
        x = torch.randn(*shape, generator=generator).to(dtype).to(device)
        residual = torch.randn(*shape, generator=generator).to(dtype).to(device)
    weight = (1 + 0.5 * torch.randn(x.shape[-1], generator=generator)).to(dtype).to(device)
    return x, weight, residual


def shape_id(shape):
    return shape if isinstance(shape, str) else "x".join(map(str, shape))


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=shape_id)
def test_reference_matches_oracle(shape, dtype, with_residual, generator):
    x, weight, residual = make_inputs(shape, dtype, generator)
    residual = residual if with_residual else None
    x_before = x.clone()
    want, h_want = oracle(x, weight, 1e-5, residual)
    got = rms_norm_reference(x, weight, 1e-5, residual)
    y = got[0] if with_residual else got
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)
    if with_residual:
        assert torch.equal(got[1], h_want)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_triton_matches_oracle(shape, dtype, with_residual, generator, kernel_device):
    x, weight, residual = make_inputs(shape, dtype, generator, kernel_device)
    residual = residual if with_residual else None
    x_before = x.clone()
    want, h_want = oracle(x, weight, 1e-6, residual)
    # every element must be overwritten
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=kernel_device)
    residual_out = torch.full(x.shape, float("nan"), dtype=dtype, device=kernel_device)
    got = rms_norm_triton(x, weight, 1e-6, residual, out=out, residual_out=residual_out)
    y = got[0] if with_residual else got
    assert y is out and not y.isnan().any()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)
    if with_residual:
        assert got[1] is residual_out
        if dtype == torch.bfloat16 and kernel_device.type == "cpu":
            # Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest
            # even (as PyTorch does): one ulp, here only.
            torch.testing.assert_close(got[1], h_want, atol=0, rtol=2 ** -7)
        else:
            assert torch.equal(got[1], h_want)
    else:
        assert residual_out.isnan().all()  # untouched without a residual
    assert torch.equal(x, x_before)


def test_triton_nan_stays_in_its_row(generator, kernel_device):
    """Several rows share a program: a NaN makes its own row NaN and no other."""
    x, weight, _ = make_inputs((8, 64), torch.float32, generator, kernel_device)
    x[3, 5] = float("nan")
    y = rms_norm_triton(x, weight, 1e-5)
    assert y[3].isnan().all() and not y[[0, 1, 2, 4, 5, 6, 7]].isnan().any()
    want, _ = oracle(x.cpu(), weight.cpu(), 1e-5)
    torch.testing.assert_close(y.cpu().double(), want, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_launch_config_packs_short_rows():
    """A decode step's row of 2048 is one program; short rows share programs of >= 2048
    elements; never more rows per program than there are."""
    assert launch_config(2048, 1) == dict(BLOCK_R=1, BLOCK=2048, num_warps=8)
    assert launch_config(64, 4096)["BLOCK_R"] == 32
    assert launch_config(64, 3)["BLOCK_R"] == 4
    assert launch_config(4096, 4096)["BLOCK_R"] == 1


def test_routing_keeps_every_shape_on_the_kernel():
    """One launch against PyTorch's chain of elementwise kernels: the only rule is the dim
    limit of whole rows in registers."""
    assert [rule[0] for rule in ops_rms_norm.ROUTING] == ["x"]
    assert ops_rms_norm._kernel_limits(torch.empty(1, MAX_KERNEL_DIM)) is None


def test_triton_largest_dim(generator, kernel_device):
    x, weight, residual = make_inputs((1, MAX_KERNEL_DIM), torch.float32, generator,
                                      kernel_device)
    want, h_want = oracle(x, weight, 1e-5, residual)
    y, h = rms_norm(x, weight, 1e-5, residual, backend="triton")
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(h, h_want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_op_keeps_leading_dims(backend, generator, kernel_device):
    device = "cpu" if backend == "torch" else kernel_device
    x, weight, residual = make_inputs((2, 3, 100), torch.float32, generator, device)
    want, _ = oracle(x, weight, 1e-5)
    y = rms_norm(x, weight, 1e-5, backend=backend)
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- compiled for sm_80 / sm_90
# (dtype, dim, rows, residual): every tile shape and warp count; the 65536-wide row (32 warps,
# 64 elements of x and of the residual a thread) is the one allowed to spill.
COMPILE_CASES = [
    ("fp16", 64, 4096, True),  # 32 rows of 64
    ("bf16", 100, 3, False),  # 4 rows of 128, odd dim
    ("bf16", 2048, 1, True),  # one decode row
    ("bf16", 4096, 64, False),
    ("bf16", 8192, 1, True),
    ("fp32", MAX_KERNEL_DIM, 1, True),
]


def compile_cases(capability):
    """Run in the child (see triton_compile): compile every COMPILE_CASES entry."""
    from layerskip_kernels.triton import rms_norm as mod

    results = {}
    for dtype, dim, rows, residual in COMPILE_CASES:
        config = mod.launch_config(dim, rows)
        num_warps = config.pop("num_warps")
        types = {name: f"*{dtype}" for name in ("X", "RESIDUAL", "Y", "H_OUT")}
        types.update(W=f"*{dtype}", eps="fp32")
        key = case_key((dtype, dim, rows, residual), capability)
        aligned = ["X", "RESIDUAL", "W", "Y", "H_OUT"] + (
            ["n_cols", "stride_x", "stride_r", "stride_y", "stride_h"] if dim % 16 == 0 else [])
        results[key] = compile_report(mod._rms_norm_fwd_kernel, types,
                                      dict(HAS_RESIDUAL=residual, **config), capability,
                                      num_warps, aligned=aligned)
    return results


compiled, test_kernel_compiles_for_gpu = compile_test(
    __file__, COMPILE_CASES, may_spill=lambda case: case[1] >= MAX_KERNEL_DIM)


# ---------------------------------------------------------------- argument guards
def guard_inputs(generator, device="cpu"):
    x, weight, residual = make_inputs((2, 100), torch.float32, generator, device)
    return dict(x=x, weight=weight, eps=1e-5, residual=residual)


def bad_x_dtype(a):
    a["x"] = a["x"].to(torch.int32)


def bad_x_stride(a):
    a["x"] = torch.randn(2, 200, device=a["x"].device)[:, ::2]


def bad_weight_shape(a):
    a["weight"] = a["weight"][:-1]


def bad_eps(a):
    a["eps"] = -1.0


def bad_residual_shape(a):
    a["residual"] = a["residual"][:1]


def bad_residual_dtype(a):
    a["residual"] = a["residual"].half()


def bad_weight_dtype(a):
    a["weight"] = a["weight"].double()


@pytest.mark.parametrize("corrupt, arg", [
    (bad_x_dtype, "x"), (bad_x_stride, "x"), (bad_weight_shape, "weight"), (bad_eps, "eps"),
    (bad_residual_shape, "residual"), (bad_residual_dtype, "residual"),
    (bad_weight_dtype, "weight"),
    *[(lambda a, e=e: a.update(eps=e), "eps") for e in (float("nan"), float("inf"), True)],
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_names_the_argument(corrupt, arg, backend, generator, kernel_device):
    device = "cpu" if backend == "torch" else kernel_device
    rms_norm(**guard_inputs(generator, device), backend=backend)  # control
    args = guard_inputs(generator, device)
    corrupt(args)
    with pytest.raises(ValueError, match=f"^{arg}:"):
        rms_norm(**args, backend=backend)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float16),
                                             (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weight_of_another_dtype_is_read_as_float32(x_dtype, w_dtype, backend, generator,
                                                    kernel_device):
    """Defined, not refused: a weight of another dtype counts as its float32 value (both
    backends upcast it), and y keeps x's dtype."""
    device = "cpu" if backend == "torch" else kernel_device
    x, weight, residual = make_inputs((3, 100), x_dtype, generator, device)
    weight = weight.to(w_dtype)
    for res in (None, residual):
        got = rms_norm(x, weight, 1e-5, res, backend=backend)
        want = rms_norm(x, weight.float(), 1e-5, res, backend=backend)
        assert all(torch.equal(g, w) for g, w in zip(got, want)) if res is not None else (
            torch.equal(got, want))
        y = got if res is None else got[0]
        assert y.dtype == x_dtype
        atol, rtol = TOLERANCES[x_dtype]
        torch.testing.assert_close(y.double(), oracle(x, weight, 1e-5, res)[0], atol=atol,
                                   rtol=rtol)


def test_triton_rejects_a_dim_past_the_limit(kernel_device):
    x = torch.ones(1, MAX_KERNEL_DIM + 1, device=kernel_device)
    weight = torch.ones(MAX_KERNEL_DIM + 1, device=kernel_device)
    rms_norm(x, weight, 1e-5, backend="torch")  # control: the reference has no limit
    with pytest.raises(ValueError, match=f"^x: expected a last dim of at most {MAX_KERNEL_DIM}"):
        rms_norm(x, weight, 1e-5, backend="triton")


def test_triton_rejects_bad_out(generator, kernel_device):
    a = guard_inputs(generator, kernel_device)
    rms_norm_triton(a["x"], a["weight"], 1e-5, out=torch.empty_like(a["x"]))  # control
    with pytest.raises(ValueError, match="^out:"):
        rms_norm_triton(a["x"], a["weight"], 1e-5, out=torch.empty_like(a["x"]).half())


@pytest.mark.gpu
def test_tensors_on_different_devices(generator):
    a = guard_inputs(generator, "cuda")
    rms_norm(**a)  # control
    a["weight"] = a["weight"].cpu()
    with pytest.raises(ValueError, match="^weight:"):
        rms_norm(**a)


if __name__ == "__main__":  # the compile child of the `compiled` fixture
    main(compile_cases)
