"""Builds layerskip_kernels._C (csrc/*.cu + python/bindings.cpp) with nvcc and ninja.

Torch-free on purpose: the module is plain pybind11 with cudart linked statically, so
it builds on machines with CPU-only torch and no GPU. Environment switches:
  LAYERSKIP_BUILD_CUDA=0        pure-Python install (also automatic when nvcc is missing)
  LAYERSKIP_CUDA_ARCHS="80;90a" CMake CUDA_ARCHITECTURES syntax: "X" = sm_X SASS + compute_X
                                PTX, "X-real" = SASS only, "X-virtual" = PTX only
  MAX_JOBS=N                    parallel compile jobs (ninja -j)
  CUDA_HOME                     where to look for bin/nvcc when it is not on PATH
Sources: every csrc/*.cu (CMakeLists.txt globs the same) plus python/bindings.cpp.
"""

import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SOURCES = sorted(ROOT.glob("csrc/*.cu")) + [ROOT / "python" / "bindings.cpp"]
DEFAULT_ARCHS = "80;90a"


def find_nvcc():
    if os.environ.get("LAYERSKIP_BUILD_CUDA", "1") == "0":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def gencode_flags(archs):
    """CMake CUDA_ARCHITECTURES semantics, so setup.py and CMake emit the same code."""
    flags = []
    for arch in filter(None, archs.split(";")):
        num, _, kind = arch.partition("-")
        codes = {"real": [f"sm_{num}"], "virtual": [f"compute_{num}"]}.get(
            kind, [f"sm_{num}", f"compute_{num}"])
        flags.append(f"-gencode=arch=compute_{num},code=[{','.join(codes)}]")
    return flags


def ninja_file(nvcc, archs, objdir, target):
    import pybind11

    includes = [ROOT / "csrc", pybind11.get_include(), sysconfig.get_paths()["include"]]
    common = ["-O3", "-std=c++17", "-Xcompiler=-fPIC,-fvisibility=hidden",
              f'-DLAYERSKIP_CUDA_ARCHS="{archs.replace(";", " ")}"'] + [f"-I{p}" for p in includes]
    q = lambda args: " ".join(shlex.quote(str(a)) for a in args)
    lines = [
        f"nvcc = {nvcc}",
        f"cxxflags = {q(common)}",
        f"cuflags = {q(common + gencode_flags(archs))}",
        "rule cu",
        "  command = $nvcc $cuflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule cxx",
        "  command = $nvcc $cxxflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule link",
        "  command = $nvcc -shared -cudart static --no-device-link $in -o $out",
    ]
    objs = []
    for src in SOURCES:
        obj = objdir / (src.name + ".o")
        lines.append(f"build {obj}: {'cu' if src.suffix == '.cu' else 'cxx'} {src}")
        objs.append(str(obj))
    lines.append(f"build {target}: link {' '.join(objs)}")
    return "\n".join(lines) + "\n"


class NinjaBuildExt(build_ext):
    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "ninja"
        build_dir.mkdir(parents=True, exist_ok=True)
        target = build_dir / "_C.so"
        archs = os.environ.get("LAYERSKIP_CUDA_ARCHS", DEFAULT_ARCHS)
        (build_dir / "build.ninja").write_text(ninja_file(find_nvcc(), archs, build_dir, target))
        ninja = shutil.which("ninja")
        if ninja is None:  # the ninja wheel's binary, when its bin dir is not on PATH
            import ninja as ninja_pkg
            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([ninja, "-C", str(build_dir), "-j", jobs], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, out)


# ---------------------------------------------------------------- layerskip_kernels._cpu
# The CPU kernels (csrc/cpu/*.cpp + python/cpu_bindings.cpp): torch-free pybind11 built by the
# host C++ compiler through setuptools itself, with or without nvcc. csrc/cpu/llama_layer.cpp
# compiles its kernels for AVX-512, AVX2 and the baseline and picks one at run time, so no
# -march flag is needed (the wheel runs on any x86-64 or aarch64 machine).
# The build degrades instead of failing: without pybind11 (a plain `setup.py` run outside pip's
# isolated build), on MSVC (the kernels use GCC / clang vector extensions) or when the compiler
# fails, the package installs without _cpu and the ops use their PyTorch references (CI's test
# of the kernels fails instead of skipping when _cpu is missing there).
def cpu_extensions():
    import sys

    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("warning: pybind11 is not installed: layerskip_kernels._cpu is not built")
        return []
    if sys.platform == "win32":
        print("warning: layerskip_kernels._cpu needs GCC or clang: not built on Windows")
        return []
    return [Pybind11Extension(
        "layerskip_kernels._cpu",
        [str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("csrc/cpu/*.cpp"))]
        + ["python/cpu_bindings.cpp"],
        include_dirs=["csrc/cpu"], cxx_std=17,
        extra_compile_args=["-O3", "-ffp-contract=fast", "-Wno-psabi"],
        extra_link_args=["-pthread"])]


class BuildExt(NinjaBuildExt):
    """_C through nvcc and ninja (NinjaBuildExt), _cpu through setuptools' own C++ build."""

    def build_extension(self, ext):
        if ext.name != "layerskip_kernels._cpu":
            return super().build_extension(ext)
        try:
            build_ext.build_extension(self, ext)
        except Exception as error:  # CompileError, LinkError: keep the pure-Python install
            print(f"warning: layerskip_kernels._cpu failed to build ({error}): not built")


ext_modules = []
if find_nvcc():
    ext_modules.append(Extension("layerskip_kernels._C", [str(p.relative_to(ROOT)) for p in SOURCES]))

setup(ext_modules=ext_modules + cpu_extensions(), cmdclass={"build_ext": BuildExt})
