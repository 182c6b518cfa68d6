"""Triton kernels. Each module holds one kernel family with a docstring of shapes and dtypes; its torch
reference lives next to its test in tests/. Kernels take and return tensors only: no engine types.

Installed as `selfrag_engine.kernels` (setup.py maps this folder there)."""
import os

# Read once, when the kernels are first imported: triton reads it when @triton.jit is applied, so a later
# change would not take effect anyway. The launch heuristics that differ in the interpreter ask this.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
