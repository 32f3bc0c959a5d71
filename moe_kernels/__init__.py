"""moe_kernels: fused CUDA kernels for Mixture-of-Experts layers.

Every op runs on one of three backends (see ``available_backends``): the CUDA kernels,
the same kernels in the SIMT emulator on the CPU, or a PyTorch reference.
"""

from ._backend import available_backends, use_backend
from .gating import topk_gating
from .permute import PermuteResult, capacity_from_factor, permute, unpermute

__all__ = [
    "PermuteResult", "available_backends", "capacity_from_factor", "permute", "topk_gating",
    "unpermute", "use_backend",
]
__version__ = "0.1.0"
