"""4-bit expert weights: the QuantizedWeight type every kernel reads, and importers and
exporters for the checkpoint formats people run (GPTQ, AWQ, compressed-tensors
pack-quantized, GPT-OSS MXFP4). Each ``from_x(**to_x(qw))`` rebuilds qw.

The numerics (dequantize, quantize_int4) are defined in moe_kernels.reference.quant."""

from .awq import from_awq, to_awq
from .compressed_tensors import from_compressed_tensors, to_compressed_tensors
from .gptq import from_gptq, to_gptq
from .mxfp4 import from_mxfp4, to_mxfp4
from .weight import QuantizedWeight

# Public ops (the kernels' quantize_int4 and dequantize, moe_kernels/quant/ops.py) are
# exported here once they land, next to the container:
# from .ops import dequantize, quantize_int4

__all__ = [
    "QuantizedWeight", "from_awq", "from_compressed_tensors", "from_gptq", "from_mxfp4", "to_awq",
    "to_compressed_tensors", "to_gptq", "to_mxfp4",
]
