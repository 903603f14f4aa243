"""Compile Triton kernels for sm_80 / sm_90 without a GPU, in child processes.

The interpreter forgives what the GPU compiler rejects (tl.dot needs 16 rows, register and
shared-memory limits). Compiling needs JITFunctions, and with TRITON_INTERPRET=1 set in the
test process triton.jit makes interpreted ones (triton.language's own helpers too), so a child
per target runs the test module as a script with the interpreter off: the module's
``compile_cases(capability)`` compiles down to a cubin (the wheel ships ptxas) and its
``__main__`` prints the results as one JSON line, which ``compiled_in_children`` merges.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILE_TARGETS = (80, 90)


def compile_kernel(fn, types, constexprs, capability, num_warps):
    """Compile fn for sm_<capability>: 'ok', or the error as text. types: {arg: '*fp16', ...};
    arguments named in neither types nor constexprs are i32 scalars."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature = {name: types.get(name, "i32") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    try:
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
        return "ok" if compiled.asm.get("cubin") else "no cubin"
    except Exception as error:  # reported per case by the parent
        return f"{type(error).__name__}: {error}"


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
