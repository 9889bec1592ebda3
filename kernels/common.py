"""Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def to_out(y, OUT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    # fp32 -> output dtype. The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even
    # (cvt.rn), so under the interpreter ROUND_BF16 rounds by hand with the same result for finite values.
    if ROUND_BF16:
        u = y.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(OUT_DTYPE)
