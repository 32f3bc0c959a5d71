"""One MoE configuration per model family: the routing and expert structure of each, at
the sizes of a representative released model. The layer (``MoE.from_preset``), the tests
and the benchmarks all read this one table.

Each entry holds ``MoE`` constructor arguments. Sizes: ``hidden_size`` H, expert width
``intermediate_size`` I, ``num_experts`` E, ``k``; the shared expert's width is
``shared_intermediate_size`` (DeepSeek's ``n_shared_experts * moe_intermediate_size``).
"""

import copy

PRESETS = {
    # Switch Transformer (switch-base-128): top-1 softmax, ReLU FFN, capacity factor.
    "switch": dict(hidden_size=768, intermediate_size=3072, num_experts=128, k=1,
                   scoring="softmax", activation="relu", capacity_factor=1.25),
    # GShard (the 600B translation model): top-2 softmax, ReLU FFN, capacity factor 2.
    "gshard": dict(hidden_size=1024, intermediate_size=8192, num_experts=2048, k=2,
                   scoring="softmax", activation="relu", capacity_factor=2.0),
    # Mixtral 8x7B: softmax, renormalized over the top 2 (softmax of the 2 logits).
    "mixtral": dict(hidden_size=4096, intermediate_size=14336, num_experts=8, k=2,
                    scoring="softmax", renormalize=True, activation="silu_and_mul"),
    # Qwen1.5-MoE-A2.7B: softmax without renormalizing; one shared expert, sigmoid-gated.
    "qwen2_moe": dict(hidden_size=2048, intermediate_size=1408, num_experts=60, k=4,
                      scoring="softmax", activation="silu_and_mul",
                      shared_intermediate_size=5632, shared_gate=True),
    # Qwen3-30B-A3B: softmax, renormalized, no shared expert.
    "qwen3_moe": dict(hidden_size=2048, intermediate_size=768, num_experts=128, k=8,
                      scoring="softmax", renormalize=True, activation="silu_and_mul"),
    # Qwen3-Next-80B-A3B (and Qwen3.5's MoE): 512 experts, top 10, renormalized; one
    # sigmoid-gated shared expert.
    "qwen3_next": dict(hidden_size=2048, intermediate_size=512, num_experts=512, k=10,
                       scoring="softmax", renormalize=True, activation="silu_and_mul",
                       shared_intermediate_size=512, shared_gate=True),
    # DeepSeek-V2: softmax, 8 groups of 20, the best 3 groups by their max, top 6, weights
    # x16 (routed_scaling_factor), 2 shared experts.
    "deepseek_v2": dict(hidden_size=5120, intermediate_size=1536, num_experts=160, k=6,
                        scoring="softmax", num_groups=8, topk_groups=3, group_scoring="max",
                        scaling_factor=16.0, activation="silu_and_mul",
                        shared_intermediate_size=3072),
    # DeepSeek-V3 / R1: sigmoid, a selection-only bias (aux-loss-free balancing), 8 groups
    # scored by their top-2 sum, the best 4, top 8, renormalized, x2.5, 1 shared expert.
    "deepseek_v3": dict(hidden_size=7168, intermediate_size=2048, num_experts=256, k=8,
                        scoring="sigmoid", selection_bias=True, num_groups=8, topk_groups=4,
                        group_scoring="top2_sum", renormalize=True, scaling_factor=2.5,
                        activation="silu_and_mul", shared_intermediate_size=2048),
    # Kimi K2: DeepSeek-V3's router with 384 experts in one group, x2.827.
    "kimi_k2": dict(hidden_size=7168, intermediate_size=2048, num_experts=384, k=8,
                    scoring="sigmoid", selection_bias=True, renormalize=True,
                    scaling_factor=2.827, activation="silu_and_mul",
                    shared_intermediate_size=2048),
    # GPT-OSS-120B: router with a bias, softmax over the 4 selected logits; experts with
    # biases, interleaved gate/up, clamped SwiGLU; weights stored [E, H, 2I] ("kn").
    "gpt_oss": dict(hidden_size=2880, intermediate_size=2880, num_experts=128, k=4,
                    scoring="softmax", renormalize=True, router_bias=True,
                    activation="swiglu_oai", alpha=1.702, limit=7.0, expert_bias=True,
                    w_layout="kn"),
    # Llama 4 Scout: top-1 sigmoid, the weight multiplies the expert input; a shared expert.
    "llama4": dict(hidden_size=5120, intermediate_size=8192, num_experts=16, k=1,
                   scoring="sigmoid", weight_on_input=True, activation="silu_and_mul",
                   shared_intermediate_size=8192),
    # OLMoE-1B-7B: softmax, top 8 of 64, not renormalized.
    "olmoe": dict(hidden_size=2048, intermediate_size=1024, num_experts=64, k=8,
                  scoring="softmax", activation="silu_and_mul"),
}


def preset_config(name, **overrides):
    """The constructor arguments of preset `name` with `overrides` applied (a new dict)."""
    if name not in PRESETS:
        raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
    config = copy.deepcopy(PRESETS[name])
    config.update(overrides)
    return config


def scaled_config(name, hidden_size=64, intermediate_size=32, num_experts=None, **overrides):
    """Preset `name` at small sizes (for the emulator and CPU tests): H and I as given, at
    most 16 experts by default (the structure kept: groups still divide E, k still fits,
    the shared expert as wide as a routed one)."""
    base = preset_config(name)
    config = preset_config(name, hidden_size=hidden_size, intermediate_size=intermediate_size)
    if num_experts is None:
        num_experts = min(base["num_experts"], 16)
    config["num_experts"] = num_experts
    groups = base.get("num_groups", 1)
    if groups > 1:
        # Keep the group structure where it fits: num_groups must divide E.
        config["num_groups"] = groups if num_experts % groups == 0 else 1
        config["topk_groups"] = min(base.get("topk_groups", groups), config["num_groups"])
    eligible = num_experts * config.get("topk_groups", 1) // config.get("num_groups", 1) \
        if config.get("num_groups", 1) > 1 else num_experts
    config["k"] = min(base["k"], eligible)
    if base.get("shared_intermediate_size"):
        config["shared_intermediate_size"] = intermediate_size
    config.update(overrides)
    return config
