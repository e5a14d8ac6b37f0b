"""Builds kvbench's one C++ extension, the GGUF-block matmul (engine/kernels/qmm.cpp).

Everything else about the package is in pyproject.toml. The extension compiles against the torch
already installed, so it needs ``pip install --no-build-isolation`` (an isolated build would have
to download torch); without torch at build time the package installs without it and
``compute=fast`` uses the pure-torch fallback (engine/kernels/__init__.py), which says so.
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    pass
else:
    # -march=native: the build machine is the machine that runs it (an editable, uncached build).
    # ggml's AMX kernels fault on some VMs; nothing here uses AMX, and the flags keep it that way.
    # -fopenmp: at::parallel_for is a header template whose OpenMP pragmas need it (torch loads its own
    # libgomp.so.1 first; this library then binds to the same runtime, so one thread pool).
    # -ffp-contract=off: the float rounding the code spells out is the rounding it gets (dequant matches
    # gguf.quants bit for bit; the tests derive their bounds from the written operations).
    # KVBENCH_PORTABLE=1 drops -march (the scalar twins); KVBENCH_MARCH=haswell (say) builds another CPU's
    # paths here, e.g. AVX2 without AVX-512 or VNNI, so they can be tested on a machine that has more.
    flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
    if os.environ.get("KVBENCH_PORTABLE") != "1":
        flags += [f"-march={os.environ.get('KVBENCH_MARCH', 'native')}", "-mno-amx-tile", "-mno-amx-int8",
                  "-mno-amx-bf16"]
    ext_modules = [CppExtension("engine.kernels._qmm", ["engine/kernels/qmm.cpp"], extra_compile_args=flags,
                                 extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
