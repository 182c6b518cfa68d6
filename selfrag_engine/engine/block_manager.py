"""KV cache block bookkeeping, implemented in C++ (csrc/block_manager.cpp) so it also serves C++ callers.

BlockManager(num_blocks, block_size=16, enable_prefix_caching=True) hands out block ids of the paged pool:
reference counted and shared by forked branches, copied on write, and indexed by a chained hash of their
tokens so that later prompts with the same prefix reuse them.
"""
from selfrag_engine._C import (
    BlockManager,
    DuplicateSequenceError,
    OutOfBlocksError,
    UnknownSequenceError,
)

__all__ = ["BlockManager", "DuplicateSequenceError", "OutOfBlocksError", "UnknownSequenceError"]
