"""PyTorch reference implementations, one module per op family: written for clarity, the
oracle of the tests and the path CPU tensors take by default. Same semantics as the
kernels, bit for bit in the integer outputs; floating-point outputs within the tolerances
stated in the tests."""

from .gemm import grouped_gemm
from .layer import token_sum
from .permute import permute, permute_num_rows_bound, permute_plan, unpermute
from .routing import (balance_scores, expert_choice_gating, group_scores, hash_gating,
                      hash_multiplier, router_stats, routing_scores, selection_order,
                      sequence_load_balancing_loss, topk_gating)

__all__ = ["balance_scores", "expert_choice_gating", "group_scores", "grouped_gemm", "hash_gating",
           "hash_multiplier", "permute", "permute_num_rows_bound", "permute_plan",
           "router_stats", "routing_scores", "selection_order", "sequence_load_balancing_loss",
           "token_sum", "topk_gating", "unpermute"]
