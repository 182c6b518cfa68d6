"""Builds the C++ sources outside setup.py: the block manager's own test program with strict warnings (and
again with colliding hashes under sanitizers), and every CUDA source with nvcc, so that compile errors show
up on machines without a GPU."""
from __future__ import annotations

import functools
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
CUDA_ARCHS = {"sm_80": ["-arch=sm_80"], "sm_90a": ["-gencode", "arch=compute_90a,code=sm_90a"]}
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def _sanitizers_work() -> bool:
    """Some toolchains ship g++ without the sanitizer runtimes; the test then runs without them."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        src.write_text("int main() { return 0; }\n")
        built = _run(["g++", *SANITIZERS, str(src), "-o", str(exe)], Path(tmp))
        return built.returncode == 0 and _run([str(exe)], Path(tmp)).returncode == 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("hashes", ["exact", "colliding"])
def test_block_manager_program(tmp_path, hashes):
    flags = ["-O1"]
    if hashes == "colliding":
        flags.append("-DSELFRAG_BLOCK_HASH_MASK=3")
        if _sanitizers_work():
            flags += SANITIZERS
    exe = tmp_path / "test_block_manager"
    build = _run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", *flags, "-I", str(CSRC / "include"),
                  str(CSRC / "tests" / "test_block_manager.cpp"), "-o", str(exe)], ROOT)
    assert build.returncode == 0, build.stderr
    result = _run([str(exe)], ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(" passed, 0 failed"), result.stdout + result.stderr


def _nvcc(source: Path, arch: list[str], out_dir: Path) -> subprocess.CompletedProcess:
    includes = ["-I", str(CSRC / "include"), "-I", sysconfig.get_paths()["include"]]
    try:  # CUDA sources may use the PyTorch C++ API
        from torch.utils.cpp_extension import include_paths
        for path in include_paths():
            includes += ["-I", path]
    except ImportError:
        pass
    return _run(["nvcc", "-std=c++17", "-c", *arch, *includes, str(source), "-o", str(out_dir / (source.stem + ".o"))],
                ROOT, timeout=600)


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_a_kernel(tmp_path, arch):
    """Keeps the nvcc path below exercised while the project has no CUDA source yet."""
    src = tmp_path / "scale.cu"
    src.write_text("__global__ void scale(float* x, float a, int n) {\n"
                   "  const int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
                   "  if (i < n) x[i] *= a;\n"
                   "}\n")
    result = _nvcc(src, CUDA_ARCHS[arch], tmp_path)
    assert result.returncode == 0, result.stderr


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[str(p.relative_to(CSRC)) for p in CUDA_SOURCES])
def test_cuda_source_compiles(tmp_path, source, arch):
    result = _nvcc(source, CUDA_ARCHS[arch], tmp_path)
    assert result.returncode == 0, result.stderr


def test_extension_exports_block_manager():
    from selfrag_engine import _C

    assert _C.abi_version() == 1
    for name in ("BlockManager", "OutOfBlocksError", "UnknownSequenceError", "DuplicateSequenceError"):
        assert hasattr(_C, name), f"selfrag_engine._C lacks {name}; rebuild with pip install -e ."
