"""Builds `attention_ctr_kernels`: one recurrence library per instruction-set level, chosen at
load time from torch's own CPU capability (`attention_ctr_kernels.variant`), so one build runs
on any CPU of its architecture. The package requires exactly the torch it was compiled with:
build it in the environment that has that torch, `pip install --no-build-isolation ./kernels`."""

import platform
import sys

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "attention_ctr_kernels compiles against the torch already installed here, and none is: "
        "install torch first, then `pip install --no-build-isolation ./kernels`"
    )
from setuptools import setup

COMMON = ["-O3", "-fopenmp", "-std=c++17"]
# x86-64-v3 (AVX2, FMA, BMI) and x86-64-v4 (AVX-512 F/BW/CD/DQ/VL): torch's "AVX2" and
# "AVX512" levels. Named feature flags rather than -march=x86-64-v*, which needs GCC 11.
V3 = ["-mavx", "-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe", "-mf16c"]
V4 = [*V3, "-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq", "-mavx512vl"]
if platform.machine().lower() in {"x86_64", "amd64"}:
    VARIANTS = {"baseline": [], "avx2": V3, "avx512": [*V4, "-mprefer-vector-width=512"]}
else:
    VARIANTS = {"baseline": []}

SOURCE = "attention_ctr_kernels/recurrence.cpp"
extensions = [
    CppExtension(
        name=f"attention_ctr_kernels._recurrence_{name}",
        sources=[f"attention_ctr_kernels/variants/{name}.cpp"],
        depends=[SOURCE],
        extra_compile_args=COMMON + flags,
        extra_link_args=["-fopenmp"],
    )
    for name, flags in VARIANTS.items()
]


class BuildEveryTime(BuildExtension):
    """Compile on every install: pip builds in this folder, and a library left in `build/` by an
    earlier install was compiled against whatever torch was installed then."""

    def finalize_options(self):
        super().finalize_options()
        self.force = True


setup(
    name="attention-ctr-kernels",
    version="0.1.0",
    description="Optional CPU training kernel of attention_ctr (DIEN's GRU / AUGRU recurrence)",
    packages=["attention_ctr_kernels"],
    package_data={"attention_ctr_kernels": ["*.cpp", "variants/*.cpp"]},
    install_requires=[f"torch=={torch.__version__}"],
    python_requires=">=3.10",
    ext_modules=extensions,
    cmdclass={"build_ext": BuildEveryTime},
)
