"""Compile Triton kernels for sm_80 / sm_90 without a GPU, in child processes.

The interpreter forgives what the GPU compiler rejects (tl.dot needs 16 rows, register and
shared-memory limits). Compiling needs JITFunctions, and with TRITON_INTERPRET=1 set in the
test process triton.jit makes interpreted ones (triton.language's own helpers too), so a child
per target runs the test module as a script with the interpreter off: the module's
``compile_cases(capability)`` compiles down to a cubin (the wheel ships ptxas) and its
``__main__`` prints the results as one JSON line, which ``compiled_in_children`` merges.
``compile_test`` makes a test module's fixture and test from it.

``compile_report`` also reads the cubin's resource usage (cuobjdump, shipped with the wheel too):
registers a thread, stack frame bytes (where ptxas puts spilled registers: a Triton kernel has
no other local arrays) and shared memory, so tests can assert that a config does not spill.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILE_TARGETS = (80, 90)


def compile_kernel(fn, types, constexprs, capability, num_warps, num_stages=None, aligned=()):
    """Compile fn for sm_<capability>: 'ok', or the error as text. types: {arg: '*fp16', ...};
    arguments named in neither types nor constexprs are i32 scalars. See compile_report for
    num_stages and aligned."""
    return compile_report(fn, types, constexprs, capability, num_warps, num_stages,
                          aligned)["status"]


def compile_report(fn, types, constexprs, capability, num_warps, num_stages=None, aligned=()):
    """Compile as compile_kernel; returns {'status': 'ok' or the error, 'registers',
    'stack_bytes', 'shared_bytes'} (None where unknown). aligned: argument names to compile as
    multiples of 16 (pointers, strides), as Triton's launcher specializes them at run time when
    they are: without it loads are not vectorized and the counts describe another kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature = {name: types.get(name, "i32") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    report = {"status": "ok", "registers": None, "stack_bytes": None, "shared_bytes": None}
    try:
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                      attrs=attrs),
            target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as error:  # reported per case by the parent
        report["status"] = f"{type(error).__name__}: {error}"
        return report
    cubin = compiled.asm.get("cubin")
    if not cubin:
        report["status"] = "no cubin"
        return report
    report["shared_bytes"] = compiled.metadata.shared
    report.update(_resource_usage(cubin))
    return report


def _resource_usage(cubin):
    """{'registers', 'stack_bytes'} from `cuobjdump -res-usage`, or {} without cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True,
                              text=True).stdout
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            return {"registers": int(fields["REG"]),
                    "stack_bytes": int(fields["STACK"]) + int(fields.get("LOCAL", 0))}
    return {}


def compiled_in_children(test_file):
    """{case key: result} from `python test_file <capability>` for every target, run in parallel."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    children = [subprocess.Popen([sys.executable, str(test_file), str(cap)], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for cap in COMPILE_TARGETS]
    results = {}
    for child in children:
        stdout, stderr = child.communicate(timeout=600)
        assert child.returncode == 0, stderr[-3000:]
        results.update(json.loads(stdout.splitlines()[-1]))
    return results


def main(compile_cases):
    """The child's entry point: `if __name__ == "__main__": main(compile_cases)`."""
    print(json.dumps(compile_cases(int(sys.argv[1]))))


def case_key(case, capability):
    """The JSON key of a compile case's result for one target."""
    return "-".join(map(str, case)) + f"-sm{capability}"


def compile_test(test_file, cases, may_spill=lambda case: False, key=case_key):
    """A test module's compile fixture and test: `compiled, test_kernel_compiles_for_gpu =
    compile_test(__file__, COMPILE_CASES)`. Every case compiles for every target, and none
    spills registers (an empty stack frame) unless may_spill(case). key: what the module's
    compile_cases names a result by."""
    @pytest.fixture(scope="module")
    def compiled():
        return compiled_in_children(Path(test_file))

    @pytest.mark.parametrize("capability", COMPILE_TARGETS)
    @pytest.mark.parametrize("case", cases, ids=lambda c: "-".join(map(str, c)))
    def test_kernel_compiles_for_gpu(case, capability, compiled):
        report = compiled[key(case, capability)]
        assert report["status"] == "ok"
        if not may_spill(case):
            assert report["stack_bytes"] in (0, None), f"spills: {report}"

    return compiled, test_kernel_compiles_for_gpu
