"""Kernels of qgalore_fx: each Triton kernel sits beside a pure-torch reference of the same
signature, and both are exposed as ``torch.ops.qgalore_fx.*`` custom ops (reference by
default, Triton registered for CUDA when triton is installed).

Importing this package registers the ops ``qgalore_fx::quantize``, ``qgalore_fx::dequantize``,
``qgalore_fx::int8_matmul`` and ``qgalore_fx::int8_matmul_t``.
"""

from .quant import (
    all_finite,
    FLOAT_DTYPES,
    MAX_SCALE,
    QMAX,
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize_blockwise,
    dequantize_reference,
    make_seed,
    num_blocks,
    pack_int4,
    quantize_blockwise,
    quantize_reference,
    unpack_int4,
)
from .int8_matmul import (
    int8_linear_reference,
    int8_matmul_grad_input_reference,
    int8_matmul_reference,
    int8_matmul_t_reference,
)

try:  # the Triton implementations register themselves as the ops' CUDA kernels on import
    from .quant_triton import dequantize_triton, quantize_triton, triton_interpreter_active
    from .int8_matmul import int8_matmul_t_triton, int8_matmul_triton
except ImportError:  # no triton on this platform: the torch reference serves every device
    HAS_TRITON = False
else:
    HAS_TRITON = True

__all__ = [
    "all_finite",
    "FLOAT_DTYPES",
    "HAS_TRITON",
    "MAX_SCALE",
    "QMAX",
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "dequantize_blockwise",
    "dequantize_reference",
    "int8_linear_reference",
    "int8_matmul_grad_input_reference",
    "int8_matmul_reference",
    "int8_matmul_t_reference",
    "make_seed",
    "num_blocks",
    "pack_int4",
    "quantize_blockwise",
    "quantize_reference",
    "unpack_int4",
]
if HAS_TRITON:
    __all__ += [
        "dequantize_triton",
        "int8_matmul_t_triton",
        "int8_matmul_triton",
        "quantize_triton",
        "triton_interpreter_active",
    ]
