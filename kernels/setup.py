"""Builds `attention_ctr_kernels`: one recurrence library per instruction-set level, chosen at
load time from torch's own CPU capability (`attention_ctr_kernels.variant`), so one build runs
on any CPU of its architecture. The package requires exactly the torch it was compiled with."""

import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

COMMON = ["-O3", "-fopenmp", "-std=c++17"]
if platform.machine().lower() in {"x86_64", "amd64"}:
    # x86-64-v3 is AVX2 + FMA, v4 AVX-512 F/BW/CD/DQ/VL: torch's "AVX2" and "AVX512" levels.
    VARIANTS = {
        "baseline": [],
        "avx2": ["-march=x86-64-v3"],
        "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
    }
else:
    VARIANTS = {"baseline": []}

extensions = [
    CppExtension(
        name=f"attention_ctr_kernels._recurrence_{name}",
        sources=[f"attention_ctr_kernels/variants/{name}.cpp"],
        extra_compile_args=COMMON + flags,
        extra_link_args=["-fopenmp"],
    )
    for name, flags in VARIANTS.items()
]

setup(
    name="attention-ctr-kernels",
    version="0.1.0",
    description="Optional CPU training kernel of attention_ctr (DIEN's GRU / AUGRU recurrence)",
    packages=["attention_ctr_kernels"],
    package_data={"attention_ctr_kernels": ["*.cpp", "variants/*.cpp"]},
    install_requires=[f"torch=={torch.__version__}"],
    python_requires=">=3.10",
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
