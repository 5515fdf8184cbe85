"""Skinny (decode) matmul over quantized weights (int8, fp8, packed int4 with group scales and
offsets): the storage layout and its pure-jnp reference (layout.py) and a GPU kernel (Pallas,
Triton lowering) that widens the codes in registers (gpu.py); and the W8A8 kernel (w8a8.py),
8-bit weights times per-token 8-bit activations on the tensor cores' native instructions."""

from __future__ import annotations

from pallas_kernels.quantized_matmul.gpu import quantized_matmul
from pallas_kernels.quantized_matmul.layout import (KINDS, QuantLayout, dequantize, pack_int4,
                                                    quantized_matmul_reference, unpack_int4)
from pallas_kernels.quantized_matmul.tuned_block_sizes import quantized_block_sizes
from pallas_kernels.quantized_matmul.w8a8 import w8a8_matmul, w8a8_reference

__all__ = ["KINDS", "QuantLayout", "dequantize", "pack_int4", "quantized_block_sizes", "quantized_matmul",
           "quantized_matmul_reference", "unpack_int4", "w8a8_matmul", "w8a8_reference"]
