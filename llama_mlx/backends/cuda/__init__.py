"""The CUDA wing: everything that runs only on MLX's CUDA backend, behind the backend table's cuda row.

- `decoder`: `FusedDecoder` (one token in eight graph nodes a layer), `KernelRowsDecoder` and
  `FusedRowsDecoder` (a batch's step), the support checks, and `pad_small_matmuls` (a load-time
  transform: 2-7 row quantized matmuls run as 8).
- `check`: `FusedCheckDecoder`, a speculative check of up to 16 positions.
- `kernels`: the kernels themselves (`mx.fast.cuda_kernel`).

Nothing outside this package names `mx.cuda` or a kernel. The kernels run only on the GPU machine
(`tests/test_cuda_kernels.py`, marked `cuda`); the CPU suite checks the decoders' wiring with MLX
ops in their place (`tests/test_cuda_decode.py`).
"""

from __future__ import annotations

from . import check, decoder, kernels
from .check import FusedCheckDecoder
from .decoder import (
    FusedDecoder,
    FusedRowsDecoder,
    KernelRowsDecoder,
    fused_rows_supported,
    pad_small_matmuls,
    rows_supported,
    supported,
)

__all__ = [
    "FusedCheckDecoder", "FusedDecoder", "FusedRowsDecoder", "KernelRowsDecoder", "available", "check", "decoder",
    "fused_rows_supported", "kernels", "pad_small_matmuls", "rows_supported", "supported",
]


def available() -> bool:
    """Whether MLX runs on its CUDA backend here (the cuda row's default)."""
    return kernels.cuda_available()
