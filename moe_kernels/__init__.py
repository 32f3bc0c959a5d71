"""moe_kernels: fused CUDA kernels for Mixture-of-Experts layers.

Every op runs on one of three backends (see ``available_backends``): the CUDA kernels,
the same kernels in the SIMT emulator on the CPU, or a PyTorch reference.
"""

from . import distributed, presets, quant
from ._backend import available_backends, use_backend
from .gemm import GemmConfig, gemm_config, grouped_gemm
from .layer import MoE, fused_moe
from .permute import (PermutePlan, PermuteResult, capacity_from_factor, permute, permute_plan,
                      unpermute)
from .routing import (expert_choice_gating, hash_gating, load_balancing_loss, router_stats,
                      router_z_loss, sequence_load_balancing_loss, topk_gating,
                      update_routing_bias)

__all__ = [
    "available_backends", "capacity_from_factor", "distributed", "expert_choice_gating",
    "fused_moe", "gemm_config", "GemmConfig", "grouped_gemm", "hash_gating", "load_balancing_loss",
    "MoE", "permute", "permute_plan", "PermutePlan", "PermuteResult", "presets", "quant",
    "router_stats", "router_z_loss", "sequence_load_balancing_loss", "topk_gating", "unpermute",
    "update_routing_bias", "use_backend",
]
__version__ = "0.1.0"

# transformers' "moe_kernels" experts backend, registered when transformers' experts
# interface is imported (not here: that import costs seconds); see moe_kernels._hf_hook.
from . import _hf_hook

_hf_hook.install()
