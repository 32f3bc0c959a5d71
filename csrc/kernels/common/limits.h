// Limits of the ops, defined once: the kernels size shared memory and loops by them, the
// adapters check them, and setup.py copies them into moe_kernels/_build_info.py for the
// Python checks. A line here must stay `constexpr int64_t kName = <integer expression>;`.
#pragma once

#include <cstdint>

namespace moe {

// Experts of topk_gating / expert_choice_gating (columns of the logits) and of permute.
constexpr int64_t kMaxExperts = 4096;
// Experts of router_stats and hash_gating (counters only; no per-expert shared state).
constexpr int64_t kMaxCountedExperts = 65536;
// permute's `align` (rows per GEMM tile).
constexpr int64_t kMaxAlign = 1 << 20;

}  // namespace moe
