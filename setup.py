"""Packaging: the Python package `selfrag_engine`, the top-level `kernels/` folder installed as its
`selfrag_engine.kernels` subpackage, and the C++ extension `selfrag_engine._C` built from csrc/ (host C++
with pybind11; no CUDA sources)."""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# The C++ API's headers, sources and CMake config package; a wheel carries them in selfrag_engine/csrc/, where
# `python -m selfrag_engine.cmake_dir` points a service's CMake build (a source checkout uses csrc/ itself).
CPP_API = sorted(glob.glob("csrc/include/selfrag_engine/*.h") + glob.glob("csrc/embed/*.cpp")
                 + glob.glob("csrc/cmake/*.cmake") + ["csrc/block_manager.cpp"])


class build_py_with_cpp_api(build_py):
    def run(self):
        super().run()
        for src in CPP_API:
            dst = os.path.join(self.build_lib, "selfrag_engine", src)
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst)

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
    cmdclass={"build_ext": build_ext, "build_py": build_py_with_cpp_api},
)
