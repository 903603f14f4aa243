"""silu_mul: the reference and the Triton kernel (compiled on a GPU, interpreted on the CPU)
against a float64 oracle written here, the model's two-rounding form in float32, the kernel
compiled for sm_80 / sm_90 without a GPU, and every argument guard with a passing control."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from triton_compile import case_key, compile_report, compile_test, main

from layerskip_kernels.ops import Kernels
from layerskip_kernels.ops.silu_mul import silu_mul, silu_mul_reference
from layerskip_kernels.triton.silu_mul import silu_mul_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # gate_up shapes (..., 2 * hidden); the odd ones: hidden 5 and 1, 7 rows, 3-D
    (1, 128),
    (7, 10),
    (3, 2),
    (2, 3, 2 * 1000),  # one block of 1024 columns, 24 masked
    (4, 2 * 2500),     # three blocks
]


def oracle(gate_up):
    g, u = gate_up.double().chunk(2, dim=-1)
    return g * torch.sigmoid(g) * u


def random_gate_up(shape, dtype, generator):
    """Gate values spread over silu's whole range (saturated tails and the curve near 0)."""
    return (4 * torch.randn(*shape, generator=generator)).to(dtype)


def assert_matches_oracle(y, gate_up):
    atol, rtol = TOLERANCES[gate_up.dtype]
    torch.testing.assert_close(y.double().cpu(), oracle(gate_up.cpu()), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_oracle(shape, dtype, generator):
    gate_up = random_gate_up(shape, dtype, generator)
    y = silu_mul_reference(gate_up)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype
    assert_matches_oracle(y, gate_up)


def test_reference_is_the_models_form_in_float32(generator):
    """model/llama.py's F.silu(gate) * up, bit for bit, where no rounding to a narrower dtype
    happens in between."""
    gate_up = random_gate_up((5, 2 * 300), torch.float32, generator)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_mul_reference(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_oracle(shape, dtype, generator, kernel_device):
    gate_up = random_gate_up(shape, dtype, generator).to(kernel_device)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype,
                     device=kernel_device)  # every element must be overwritten
    assert silu_mul_triton(gate_up, out=out) is out
    assert not out.isnan().any()
    assert_matches_oracle(out, gate_up)
    # Within one rounding of the reference (which rounds once too): the GPU's exp may differ
    # in the last fp32 bits, and the interpreter truncates fp32 -> bf16 where a GPU rounds.
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.cpu(), silu_mul_reference(gate_up.cpu()), atol=atol,
                               rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_reads_strided_rows(dtype, generator, kernel_device):
    """Rows of a wider buffer (as a slice of a bigger projection) and a 3-D view whose leading
    dims do not merge: last dim contiguous, row strides anything."""
    wide = random_gate_up((6, 2 * 40 + 7), dtype, generator).to(kernel_device)
    rows = wide[:, 3:3 + 2 * 40]  # row stride 87
    assert_matches_oracle(silu_mul(rows, backend="triton"), rows)
    cube = random_gate_up((4, 5, 2 * 9), dtype, generator).to(kernel_device).transpose(0, 1)
    y = silu_mul(cube, backend="triton")
    assert y.shape == (5, 4, 9) and y.is_contiguous()
    assert_matches_oracle(y, cube)


def test_triton_backend_through_public_op_and_empty_rows(generator, kernel_device):
    gate_up = random_gate_up((3, 2 * 64), torch.float16, generator).to(kernel_device)
    assert_matches_oracle(silu_mul(gate_up, backend="triton"), gate_up)
    empty = torch.empty(0, 2 * 64, dtype=torch.float16, device=kernel_device)
    assert silu_mul(empty, backend="triton").shape == (0, 64)


def test_the_models_binding(generator, kernel_device):
    """What the model calls per layer: the preference resolved once per shape (Kernels)."""
    gate_up = random_gate_up((2, 3, 2 * 48), torch.bfloat16, generator)
    assert Kernels("torch").silu_mul(gate_up) is silu_mul_reference
    assert Kernels("triton").silu_mul(gate_up, training=True) is silu_mul_reference
    on_device = gate_up.to(kernel_device)
    assert_matches_oracle(Kernels("triton").silu_mul(on_device)(on_device), gate_up)


def test_saturated_gates(kernel_device):
    """silu(-inf-ish) * up = -0 * up, silu(large) * up = g * up: no NaN from exp overflow."""
    gate = torch.tensor([-1e4, -100.0, 0.0, 100.0, 3e38], dtype=torch.float32)
    up = torch.tensor([2.0, 3.0, 5.0, 7.0, 0.5])
    gate_up = torch.cat((gate, up))[None].to(kernel_device)
    y = silu_mul_triton(gate_up).cpu()[0]
    assert not y.isnan().any()
    torch.testing.assert_close(y, torch.tensor([0.0, -100.0 * 3.0 * torch.sigmoid(
        torch.tensor(-100.0)).item(), 0.0, 700.0, 1.5e38]), atol=1e-30, rtol=1e-6)


# ---------------------------------------------------------------- argument guards
def odd_last_dim(t):
    return t[..., :-1]


def bad_dtype(t):
    return t.to(torch.int32)


def non_contiguous_last_dim(t):
    return t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]


def zero_dim(t):
    return t[0, 0]


@pytest.mark.parametrize("corrupt", [odd_last_dim, bad_dtype, non_contiguous_last_dim, zero_dim])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_names_the_argument(corrupt, backend, generator, kernel_device):
    device = kernel_device if backend == "triton" else "cpu"
    gate_up = random_gate_up((3, 2 * 8), torch.float32, generator).to(device)
    silu_mul(gate_up, backend=backend)  # control
    with pytest.raises(ValueError, match="^gate_up:"):
        silu_mul(corrupt(gate_up), backend=backend)


def test_triton_rejects_bad_out(generator, kernel_device):
    gate_up = random_gate_up((3, 2 * 8), torch.float32, generator).to(kernel_device)
    silu_mul_triton(gate_up, out=torch.empty(3, 8, device=kernel_device))  # control
    with pytest.raises(ValueError, match="^out:"):
        silu_mul_triton(gate_up, out=torch.empty(3, 16, device=kernel_device))


def test_unknown_backend_names_the_argument(generator):
    with pytest.raises(ValueError, match="^backend:"):
        silu_mul(random_gate_up((3, 2 * 8), torch.float32, generator), backend="cuda")


# ---------------------------------------------------------------- compiled for sm_80 / sm_90
COMPILE_CASES = [(dtype, hidden) for dtype in ("fp16", "bf16", "fp32")
                 for hidden in (5, 64, 11008, 14336)]



def compile_cases(capability):
    """Run in the child (see triton_compile): compile every COMPILE_CASES entry."""
    from layerskip_kernels.triton import silu_mul as mod

    results = {}
    for case in COMPILE_CASES:
        dtype, hidden = case
        config = dict(mod.launch_config(hidden))
        num_warps = config.pop("num_warps")
        types = {"GATE_UP": f"*{dtype}", "OUT": f"*{dtype}"}
        aligned = ["GATE_UP", "OUT"] + (["hidden", "stride_in", "stride_out"]
                                        if hidden % 16 == 0 else [])
        results[case_key(case, capability)] = compile_report(
            mod._silu_mul_kernel, types, config, capability, num_warps, aligned=aligned)
    return results


compiled, test_kernel_compiles_for_gpu = compile_test(__file__, COMPILE_CASES)


if __name__ == "__main__":  # the compile child of the `compiled` fixture
    main(compile_cases)
