"""Builds the C++ extension `selfrag_engine._C` from csrc/ (host C++ with pybind11; no CUDA needed).

CUDA sources (csrc/**/*.cu) are not linked into this extension; tests/test_csrc.py compiles each of
them with nvcc for sm_80 and sm_90a so that CUDA compile errors are caught on machines without a GPU.
"""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "selfrag_engine._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc/include"],
    cxx_std=17,
    extra_compile_args=["-O2"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
