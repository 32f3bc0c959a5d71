"""4-bit expert weights: the QuantizedWeight type every kernel reads, and importers and
exporters for the checkpoint formats people run (GPTQ, AWQ, compressed-tensors
pack-quantized, GPT-OSS MXFP4), each ``from_x(**to_x(qw))`` rebuilding qw; the
standalone ``dequantize`` and ``quantize_int4`` kernels. The W4A16 product is
``moe_kernels.grouped_gemm(x, qw, ...)``. The router is never quantized: these ops are for
expert weights, and the MoE layer keeps its router in full precision.

The numerics are defined bit for bit in moe_kernels.reference.quant."""

from .awq import from_awq, to_awq
from .compressed_tensors import from_compressed_tensors, to_compressed_tensors
from .gptq import from_gptq, to_gptq
from .mxfp4 import from_mxfp4, to_mxfp4
from .ops import dequantize, quantize_int4
from .weight import QuantizedWeight

__all__ = [
    "QuantizedWeight", "dequantize", "from_awq", "from_compressed_tensors", "from_gptq", "from_mxfp4", "to_awq",
    "quantize_int4", "to_compressed_tensors", "to_gptq", "to_mxfp4",
]
