"""Head sizes that are not powers of two (48, 80, 96, ...): attention tiles span the next power of two and
mask the lanes past the real head_dim.

`tl.arange` and `tl.dot` need power-of-two extents (a dot's inner extent >= 16), so a kernel takes both
HEAD_DIM (the tensor's, used for strides and masks) and BLOCK_D = head_block(HEAD_DIM) (the tile's). Lanes
past HEAD_DIM load as zeros, which add nothing to q.k nor to p.v, and are never stored. When the two are equal
the mask is not emitted at all, so a power-of-two head compiles as before.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["MAX_HEAD_DIM", "head_block", "with_d_mask"]

# The largest tile the attention kernels are planned for (Gemma-style 256-wide heads); beyond it the
# accumulators of one program no longer fit in registers.
MAX_HEAD_DIM = 256


def head_block(head_dim: int) -> int:
    """The tile width for head_dim: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def with_d_mask(mask, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """mask & (offs_d < HEAD_DIM), broadcast; mask itself when the tile has no padded lanes."""
    if HEAD_DIM != BLOCK_D:
        return mask & (offs_d < HEAD_DIM)
    else:
        return mask
