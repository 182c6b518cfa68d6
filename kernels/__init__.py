"""Triton kernels. Each module holds one kernel family with a docstring of shapes and dtypes; its torch
reference lives next to its test in tests/."""
