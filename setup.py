"""Packaging: the Python package `selfrag_engine`, the top-level `kernels/` folder installed as its
`selfrag_engine.kernels` subpackage, and the C++ extension `selfrag_engine._C` built from csrc/ (host C++
with pybind11; no CUDA sources)."""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "selfrag_engine._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc/include"],
    cxx_std=17,
    extra_compile_args=["-O2"],
)

setup(
    packages=find_packages(include=["selfrag_engine", "selfrag_engine.*"]) + ["selfrag_engine.kernels"],
    package_dir={"selfrag_engine.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
