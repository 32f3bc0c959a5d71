"""Hugging Face transformers integration: ``from_hf``, ``patch_model`` and the
``"moe_kernels"`` experts backend.

transformers is optional: this module imports it only inside its functions (and
``register_experts_backend``), so ``import moe_kernels.hf`` works without it.

- ``from_hf(block)``: the ``MoE`` layer of one sparse-MoE block of a loaded model
  (Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, DeepSeek-V3, GPT-OSS, OLMoE, Llama 4 text),
  sharing the block's tensors (the same ``nn.Parameter`` objects) wherever our layouts
  read them in place. The one copy: a shared expert stored as an MLP with separate
  ``gate_proj`` / ``up_proj`` (Qwen2-MoE, Qwen3-Next, DeepSeek-V3, Llama 4) is
  concatenated into ``shared_w13`` (a new parameter: training it does not update the
  block's two).
- ``patch_model(model)``: every supported block replaced in place by a ``PatchedMoEBlock``
  that runs the layer and returns what the block returned (a tuple where the block
  returns one).
- ``"moe_kernels"`` in transformers' ``ExpertsInterface``: the experts modules of the
  ``@use_experts_implementation`` families run on ``permute_plan`` -> ``grouped_gemm``
  (gathered, fused activation) -> ``grouped_gemm`` (row_scale = routing weights) ->
  ``unpermute``; the model keeps its own router. Registered on ``import moe_kernels.hf``
  (and, lazily, by ``import moe_kernels``: see ``moe_kernels._hf_hook``).
"""

import importlib.util
import warnings

import torch
from torch import nn

from .gemm import grouped_gemm
from .layer import MoE
from .permute import permute_plan, unpermute

BACKEND_NAME = "moe_kernels"


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------

def _act_name(act_fn):
    """Our name of a transformers activation module ("silu", "gelu", "gelu_tanh", "relu"),
    or None when our kernels have no equal one."""
    from transformers import activations as A
    if isinstance(act_fn, (A.SiLUActivation, nn.SiLU)):
        return "silu"
    if type(act_fn) is A.GELUActivation:  # exact erf GELU (also its python variant)
        return "gelu"
    if isinstance(act_fn, (A.GELUTanh, A.NewGELUActivation)):  # the tanh formula
        return "gelu_tanh"
    if type(act_fn) is nn.ReLU:
        return "relu"
    if isinstance(act_fn, nn.GELU):
        return "gelu" if act_fn.approximate == "none" else "gelu_tanh"
    return None


def _gated(act_fn, what):
    name = _act_name(act_fn)
    if name is None or name == "relu":
        raise NotImplementedError(f"{what}: activation {type(act_fn).__name__} has no fused gated "
                                  "equivalent in moe_kernels")
    return name + "_and_mul"


def _check_experts_flags(experts, *, is_transposed, has_bias, is_concatenated):
    """The @use_experts_implementation flags this family's mapping assumes."""
    for flag, want in (("is_transposed", is_transposed), ("has_bias", has_bias),
                       ("is_concatenated", is_concatenated), ("has_gate", True),
                       ("has_post_expert_norm", False)):
        got = getattr(experts, flag, want)
        if got != want:
            raise NotImplementedError(f"{type(experts).__name__}: {flag}={got} is not supported by from_hf")


# ---------------------------------------------------------------------------------------
# from_hf
# ---------------------------------------------------------------------------------------

def _shared_mlp(mlp, activation):
    """(shared_w13, shared_w2, width) of a gate_proj/up_proj/down_proj MLP. shared_w13 is a
    COPY (torch.cat of gate and up: our layout needs them in one [2Is, H] tensor);
    shared_w2 is down_proj.weight itself (shared)."""
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if _gated(act, f"{type(mlp).__name__}") != activation:
        raise NotImplementedError(f"{type(mlp).__name__}: the shared expert's activation differs from the "
                                  "routed experts' (MoE uses one activation for both)")
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if proj.bias is not None:
            raise NotImplementedError(f"{type(mlp).__name__}: a shared expert with biases is not supported")
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    w13 = nn.Parameter(torch.cat([gate.detach(), up.detach()], dim=0),  # the one copy
                       requires_grad=gate.requires_grad)
    return w13, mlp.down_proj.weight, gate.shape[0]


def _build(*, hidden, inter, num_experts, k, w13, w2, router_weight, router_dtype,
           router_bias=None, selection_bias=None, b13=None, b2=None, shared=None, shared_gate=None,
           **options):
    """Construct the layer on the meta device (no allocation, no init) and install the
    block's tensors: every parameter and buffer of the layer is replaced here."""
    shared_w13, shared_w2, shared_inter = shared if shared is not None else (None, None, 0)
    layer = MoE(hidden, inter, num_experts, k, router_dtype=router_dtype,
                router_bias=router_bias is not None, selection_bias=selection_bias is not None,
                expert_bias=b13 is not None, shared_intermediate_size=shared_inter,
                shared_gate=shared_gate is not None, dtype=w13.dtype, device="meta", **options)
    layer.router_weight = router_weight          # shared
    layer.w13, layer.w2 = w13, w2                # shared (read in place, "nk" or "kn")
    if router_bias is not None:
        layer.router_bias = router_bias          # shared
    if selection_bias is not None:
        layer.selection_bias = selection_bias    # shared buffer (e_score_correction_bias)
    if b13 is not None:
        layer.b13, layer.b2 = b13, b2            # shared
    if shared is not None:
        layer.shared_w13, layer.shared_w2 = shared_w13, shared_w2  # w13 copied, w2 shared
    if shared_gate is not None:
        layer.shared_gate = shared_gate          # shared [1, H]
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        assert not t.is_meta, f"from_hf left {name} unset"
    return layer


def _topk_router_block(block, *, renormalize=None):
    """Mixtral / Qwen2-MoE / Qwen3-MoE / Qwen3-Next / OLMoE: ``gate`` (a TopKRouter:
    F.linear in the model dtype, softmax in float32, top-k, optional renormalize),
    ``experts`` ([E, 2I, H] gate-then-up, [E, H, I]), optional ``shared_expert`` MLP and
    ``shared_expert_gate`` (sigmoid)."""
    gate, experts = block.gate, block.experts
    _check_experts_flags(experts, is_transposed=False, has_bias=False, is_concatenated=True)
    if getattr(block, "jitter_noise", 0):
        warnings.warn(f"{type(block).__name__}: router_jitter_noise (training only) is not reproduced")
    activation = _gated(experts.act_fn, type(experts).__name__)
    shared = getattr(block, "shared_expert", None)
    shared_gate = getattr(block, "shared_expert_gate", None)
    if renormalize is None:
        renormalize = bool(gate.norm_topk_prob)
    num_experts, n1, hidden = experts.gate_up_proj.shape
    return _build(
        hidden=hidden, inter=n1 // 2, num_experts=num_experts, k=gate.top_k,
        w13=experts.gate_up_proj, w2=experts.down_proj,
        # the router's matmul runs in the input's dtype (F.linear(x, weight)): router_dtype=None
        router_weight=gate.weight, router_dtype=None,
        shared=None if shared is None else _shared_mlp(shared, activation),
        shared_gate=None if shared_gate is None else shared_gate.weight,
        scoring="softmax", renormalize=renormalize, activation=activation)


def _mixtral(block):
    return _topk_router_block(block, renormalize=True)  # MixtralTopKRouter always renormalizes


def _deepseek_v3(block):
    """DeepSeek-V3: float32 router (x and weight cast to float32), sigmoid, selection-only
    e_score_correction_bias, n_group groups scored by their top-2 sum, the best
    topk_group, top-k, optional renormalize, x routed_scaling_factor; shared_experts MLP."""
    gate, experts = block.gate, block.experts
    _check_experts_flags(experts, is_transposed=False, has_bias=False, is_concatenated=True)
    activation = _gated(experts.act_fn, type(experts).__name__)
    num_experts, n1, hidden = experts.gate_up_proj.shape
    return _build(
        hidden=hidden, inter=n1 // 2, num_experts=num_experts, k=gate.top_k,
        w13=experts.gate_up_proj, w2=experts.down_proj,
        router_weight=gate.weight, router_dtype=torch.float32,
        selection_bias=gate.e_score_correction_bias,
        shared=_shared_mlp(block.shared_experts, activation),
        scoring="sigmoid", renormalize=bool(gate.norm_topk_prob),
        scaling_factor=float(gate.routed_scaling_factor), num_groups=int(gate.num_group),
        topk_groups=int(gate.topk_group), group_scoring="top2_sum", activation=activation)


def _gpt_oss(block):
    """GPT-OSS: router with a bias in the model dtype, top-k of the logits then a softmax
    over those k (= softmax + renormalize); experts [E, H, 2I] interleaved gate/up with
    biases ("kn", swiglu_oai with the experts' alpha and limit)."""
    router, experts = block.router, block.experts
    _check_experts_flags(experts, is_transposed=True, has_bias=True, is_concatenated=False)
    num_experts, hidden, n1 = experts.gate_up_proj.shape
    return _build(
        hidden=hidden, inter=n1 // 2, num_experts=num_experts, k=router.top_k,
        w13=experts.gate_up_proj, w2=experts.down_proj, b13=experts.gate_up_proj_bias,
        b2=experts.down_proj_bias, router_weight=router.weight, router_bias=router.bias,
        router_dtype=None, scoring="softmax", renormalize=True, activation="swiglu_oai",
        alpha=float(experts.alpha), limit=float(experts.limit), w_layout="kn")


def _llama4(block):
    """Llama 4 text MoE: nn.Linear router in the model dtype, top-k of the logits, sigmoid
    of those (rounded to the model dtype), the weight multiplying the expert input;
    experts [E, H, 2I] gate-then-up ("kn"); a shared expert MLP."""
    router, experts = block.router, block.experts
    if router.bias is not None:
        raise NotImplementedError("Llama4Router with a bias is not supported")
    activation = _gated(experts.act_fn, type(experts).__name__)
    num_experts, hidden, n1 = experts.gate_up_proj.shape
    return _build(
        hidden=hidden, inter=n1 // 2, num_experts=num_experts, k=router.top_k,
        w13=experts.gate_up_proj, w2=experts.down_proj, router_weight=router.weight,
        router_dtype=None, shared=_shared_mlp(block.shared_expert, activation),
        scoring="sigmoid", weight_on_input=True, activation=activation, w_layout="kn")


# class name -> (builder, what the block's forward returns besides the hidden states)
#   None: the hidden states only; "scores": (hidden, softmax of the top-k logits [T, k])
#   (GPT-OSS); "logits": (hidden flattened to [T, H], router logits [T, E]) (Llama 4).
_FAMILIES = {
    "MixtralSparseMoeBlock": (_mixtral, None),
    "Qwen2MoeSparseMoeBlock": (_topk_router_block, None),
    "Qwen3MoeSparseMoeBlock": (_topk_router_block, None),
    "Qwen3NextSparseMoeBlock": (_topk_router_block, None),
    "OlmoeSparseMoeBlock": (_topk_router_block, None),
    "DeepseekV3MoE": (_deepseek_v3, None),
    "GptOssMLP": (_gpt_oss, "scores"),
    "Llama4TextMoe": (_llama4, "logits"),
}
SUPPORTED_BLOCKS = tuple(_FAMILIES)


def _family(block):
    for cls in type(block).__mro__:  # subclasses of a supported block map like it
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    return None


def from_hf(block):
    """The ``MoE`` layer equal to a transformers sparse-MoE block (``SUPPORTED_BLOCKS``),
    e.g. ``model.model.layers[0].mlp``, sharing its tensors (see the module docstring for
    the one copy). ``layer(x)`` returns the hidden states only (``[..., H]``) even where
    the block returns a tuple; ``patch_model`` wraps that. Raises NotImplementedError for
    an unsupported block or option."""
    family = _family(block)
    if family is None:
        raise NotImplementedError(f"from_hf: {type(block).__name__} is not a supported block "
                                  f"(supported: {', '.join(SUPPORTED_BLOCKS)})")
    return family[0](block)


# ---------------------------------------------------------------------------------------
# patch_model
# ---------------------------------------------------------------------------------------

class PatchedMoEBlock(nn.Module):
    """A sparse-MoE block replaced by ``MoE`` (``self.moe``), returning what the original
    block returned: the hidden states, or for GPT-OSS ``(hidden, router_scores [T, k])``,
    for Llama 4 ``(hidden [T, H], router_logits [T, E])``."""

    def __init__(self, moe, returns=None, block_type=""):
        super().__init__()
        self.moe, self.returns, self.block_type = moe, returns, block_type

    def forward(self, hidden_states):
        if self.returns is None:
            return self.moe(hidden_states)
        y, logits = self.moe(hidden_states, return_router_logits=True)
        logits = logits.reshape(-1, self.moe.num_experts)
        if self.returns == "logits":
            return y.reshape(-1, y.shape[-1]), logits
        # GPT-OSS: softmax over the top-k logits, in the logits' dtype, as GptOssTopKRouter
        top, _ = torch.topk(logits, self.moe.k, dim=-1)
        return y, torch.softmax(top, dim=1, dtype=top.dtype)

    def extra_repr(self):
        return f"block_type={self.block_type}"


def patch_model(model):
    """Replace, in place, every supported sparse-MoE block of `model` by a
    ``PatchedMoEBlock`` running ``from_hf(block)`` (the weights shared as from_hf shares
    them). Returns ``(model, skipped)``: skipped lists ``(name, class name, reason)`` of
    the MoE-like blocks left alone (a module with an ``experts`` child that is not
    supported, or a supported one whose options are not), each also warned about.

    Limits: the router modules are gone, so ``output_router_logits`` (the models' output
    recorders) no longer sees them; Mixtral's training jitter is not applied."""
    replaced, skipped = [], []
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, PatchedMoEBlock):
            continue
        family = _family(module)
        if family is None:
            if hasattr(module, "experts") and not any(name.startswith(r + ".") for r in replaced):
                skipped.append((name, type(module).__name__, "unsupported block"))
            continue
        if any(name.startswith(r + ".") for r in replaced):
            continue
        try:
            layer = family[0](module)
        except NotImplementedError as e:
            skipped.append((name, type(module).__name__, str(e)))
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        patched = PatchedMoEBlock(layer, family[1], type(module).__name__)
        patched.train(module.training)
        setattr(parent, child, patched)
        replaced.append(name)
    for name, cls, reason in skipped:
        warnings.warn(f"patch_model: left {name} ({cls}) unpatched: {reason}")
    return model, skipped


# ---------------------------------------------------------------------------------------
# The "moe_kernels" experts backend (transformers' ExpertsInterface)
# ---------------------------------------------------------------------------------------

def _fused_experts_activation(experts):
    """(activation, alpha, limit) to fuse into the first GEMM, or None when the module's
    own gate / activation must run in torch between the GEMMs."""
    from transformers.integrations import moe as hf_moe
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if not experts.has_gate:
        name = _act_name(getattr(experts, "act_fn", None))
        return None if name is None else (name, 1.702, 7.0)
    if apply_gate is hf_moe._default_apply_gate:  # act_fn(first half) * second half
        name = _act_name(getattr(experts, "act_fn", None))
        if experts.is_concatenated and name not in (None, "relu"):
            return name + "_and_mul", 1.702, 7.0
        return None
    if (getattr(apply_gate, "__qualname__", "") == "GptOssExperts._apply_gate"
            and not experts.is_concatenated):  # interleaved, clamped SwiGLU
        return "swiglu_oai", float(experts.alpha), float(experts.limit)
    return None


def moe_kernels_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts forward (the signature of ``grouped_mm_experts_forward``) on
    this package's ops: ``[T, H]`` tokens, ``[T, k]`` expert ids and routing weights ->
    ``[T, H]``. Honours is_transposed ("kn"), has_bias, has_gate, is_concatenated and the
    activation (fused where our kernels have it, else ``self._apply_gate`` / ``act_fn`` in
    torch between the GEMMs), and has_post_expert_norm (the norm on the second GEMM's
    output, the routing weights applied after it). Not expert-parallel. Weights other
    than bfloat16 / float16 (a float32 model) run transformers' grouped_mm forward."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("the moe_kernels experts backend does not support expert parallelism")
    w1 = self.gate_up_proj if self.has_gate else self.up_proj
    if w1.dtype not in (torch.bfloat16, torch.float16):
        # our GEMMs take 16-bit weights: e.g. a float32 model runs transformers' grouped_mm
        from transformers.integrations.moe import grouped_mm_experts_forward
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    b1 = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    b2 = self.down_proj_bias if self.has_bias else None
    layout = "kn" if self.is_transposed else "nk"
    x = hidden_states.to(w1.dtype)  # as transformers' grouped_mm casts the input
    plan = permute_plan(top_k_index, self.num_experts, weights=top_k_weights.float())
    fused = _fused_experts_activation(self)
    if fused is not None:
        act, alpha, limit = fused
        h = grouped_gemm(x, w1, plan.offsets, gather=plan.gather, w_layout=layout, bias=b1,
                         activation=act, alpha=alpha, limit=limit)
    else:
        h = grouped_gemm(x, w1, plan.offsets, gather=plan.gather, w_layout=layout, bias=b1)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    if self.has_post_expert_norm:
        y = self.post_expert_norm(grouped_gemm(h, self.down_proj, plan.offsets, w_layout=layout, bias=b2))
        y = (y.float() * plan.weights.unsqueeze(1)).to(y.dtype)
    else:
        y = grouped_gemm(h, self.down_proj, plan.offsets, w_layout=layout, bias=b2,
                         row_scale=plan.weights)
    return unpermute(y, plan.row_map).to(hidden_states.dtype)


def register_experts_backend():
    """Register ``moe_kernels_experts_forward`` as ``"moe_kernels"`` in transformers'
    ExpertsInterface (class-wide, so ``from_pretrained(..., experts_implementation=
    "moe_kernels")`` and ``model.set_experts_implementation("moe_kernels")`` validate
    it). Returns False when transformers (or its ExpertsInterface) is missing."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(BACKEND_NAME, moe_kernels_experts_forward)
    return True


if importlib.util.find_spec("transformers") is not None:
    # ``import moe_kernels.hf`` registers (importing transformers' experts interface);
    # ``import moe_kernels`` registers lazily instead (``moe_kernels._hf_hook``).
    register_experts_backend()
