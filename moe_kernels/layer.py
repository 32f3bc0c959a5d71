"""The MoE layer: ``fused_moe`` (the functional form) and ``MoE`` (the nn.Module).

One forward, for every model family of ``moe_kernels.presets``::

    route       topk_gating (or expert_choice_gating) on the router logits
    plan        permute_plan: expert boundaries, the token of each expert row (gather),
                the routing weight of each row; no row is copied
    gemm1       grouped_gemm(x, w13, gather=...): reads the tokens in place, fused (gated)
                activation
    gemm2       grouped_gemm(h, w2, row_scale=weights): the routing weight applied to each
                expert row before it is rounded
    combine     unpermute: each token's rows summed in slot order (deterministic)
    shared      the shared expert(s): one more pair of grouped GEMMs over all tokens (one
                "expert"), optionally scaled by a sigmoid gate, added

Nothing is padded: the plan uses ``align=1`` (the GEMM predicates each expert's last tile),
so the rows are exactly the ``T * k`` kept assignments. No host synchronization on a GPU;
CUDA-graph capturable. Every step is an op of this package, so the backend (cuda, simt,
reference) is chosen per op as everywhere else, and the backward runs through the same
kernels (``grouped_gemm``'s backward, ``permute_plan``'s weight gradient, the gating
backward)."""

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from ._backend import selected_backend
from ._checks import (FLOAT_DTYPES, check_bool, check_choice, check_int, check_number,
                      check_same_device, check_tensor)
from ._library import native_call
from ._limits import MAX_EXPERTS
from .gemm import ACTIVATIONS, GATED_ACTIVATIONS, W_LAYOUTS, _gather_segments, grouped_gemm
from .permute import DROP_POLICIES, capacity_from_factor, permute_plan, unpermute
from .quant import QuantizedWeight
from .routing import (SCORINGS, expert_choice_gating, load_balancing_loss, router_stats,
                      router_z_loss, topk_gating, update_routing_bias)

ROUTINGS = ("topk", "expert_choice")
PHASES = ("route", "plan", "gemm1", "gemm2", "combine", "shared")
_phase_hook = contextvars.ContextVar("moe_kernels_phase_hook", default=None)


@contextlib.contextmanager
def phase_hook(hook):
    """Inside the ``with`` block, each phase of the layer's forward (``PHASES``: route, plan,
    gemm1, gemm2, combine, shared) runs inside ``hook(name)``, a context manager: the
    benchmarks open an NVTX range there (an nsys timeline then shows the breakdown) and
    sum the emulator's traffic counters per phase. Off by default (no cost); ignored while
    torch.compile traces."""
    token = _phase_hook.set(hook)
    try:
        yield
    finally:
        _phase_hook.reset(token)


def _phase(name):
    hook = _phase_hook.get()
    if hook is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return hook(name)


# Token rows and expert rows. gather[i] is the token of row i (-1: none). Gathering the
# rows and summing each token's rows are each other's backward; the sum runs as one kernel
# in float32 in row order (a stable sort of gather, then segment_row_sum), so both
# directions are deterministic, as the grouped GEMM's own gather is (an index_add backward
# would use atomics on a GPU).

def _gather(x, gather):
    """rows[i] = x[gather[i]], zero where gather is -1."""
    if x.shape[0] == 0:  # no tokens: every row is padding
        return x.new_zeros((gather.shape[0], x.shape[1]))
    return torch.where((gather >= 0).unsqueeze(1), x.index_select(0, gather.clamp(min=0)), 0)


def _segment_sum(rows, gather, num_tokens, backend):
    """y[t] = sum of rows[i] with gather[i] = t, in float32 in row order, rounded once."""
    segment_rows, row_start = _gather_segments(gather, num_tokens)
    return native_call(backend, "segment_row_sum", rows.contiguous(), segment_rows, row_start)


class _GatherRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gather, backend):
        ctx.backend, ctx.tokens = backend, x.shape[0]
        ctx.save_for_backward(gather)
        return _gather(x, gather)

    @staticmethod
    def backward(ctx, grad_rows):
        (gather,) = ctx.saved_tensors
        return _segment_sum(grad_rows, gather, ctx.tokens, ctx.backend), None, None


class _TokenSumFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, gather, num_tokens, backend):
        ctx.save_for_backward(gather)
        return _segment_sum(rows, gather, num_tokens, backend)

    @staticmethod
    def backward(ctx, grad_y):
        (gather,) = ctx.saved_tensors
        return _gather(grad_y, gather), None, None, None


def _gather_rows(x, gather):
    """``rows[i] = x[gather[i]]`` (zero for -1), differentiable in x; its backward sums each
    token's rows deterministically (``_token_sum``)."""
    backend = selected_backend(x, "x")
    if backend == "reference":
        # Indexing a zero row appended to x: autograd's backward, and a result connected to
        # x's graph even without tokens (a rank that sends nothing still takes part in the
        # backward's exchanges).
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
        return padded[torch.where(gather >= 0, gather, x.shape[0])]
    return _GatherRowsFunction.apply(x, gather, backend)


def _token_sum(rows, gather, num_tokens):
    """``y[t] = sum of rows[i] with gather[i] = t`` in row order, float32 then rounded once
    (expert-choice routing's combine, where a token has any number of rows); its backward
    is the gather."""
    backend = selected_backend(rows, "rows")
    if backend == "reference":
        return reference.token_sum(rows, gather, num_tokens)
    return _TokenSumFunction.apply(rows, gather, num_tokens, backend)


def _expert_rows(x, gather, offsets, row_weights, w13, w2, b13, b2, activation, alpha, limit,
                 w_layout, weight_on_input):
    """The experts' output rows: row i is expert e(i)'s MLP of token gather[i] (zero for -1),
    times its routing weight, on the output (default) or on the input (Llama 4)."""
    gemm = dict(w_layout=w_layout, alpha=alpha, limit=limit)
    if weight_on_input:
        # The weight scales the expert's input row, rounded to x's dtype as the models do
        # (x * weight in x's dtype): one [rows, H] copy, inherent to this scheme.
        with _phase("gemm1"):
            rows = _gather_rows(x, gather) * row_weights.to(x.dtype).unsqueeze(1)
            h = grouped_gemm(rows, w13, offsets, bias=b13, activation=activation, **gemm)
        with _phase("gemm2"):
            return grouped_gemm(h, w2, offsets, bias=b2, **gemm)
    with _phase("gemm1"):
        h = grouped_gemm(x, w13, offsets, gather=gather, bias=b13, activation=activation, **gemm)
    with _phase("gemm2"):
        return grouped_gemm(h, w2, offsets, bias=b2, row_scale=row_weights, **gemm)


def _topk_plan(ids, weights, num_experts, capacity, drop_policy):
    """The permute plan of the kept assignments, unpadded: (row_map, offsets, gather,
    row_weights).

    With a capacity, a first plan decides which assignments each expert keeps (the
    Switch/GShard drop rule); the kept ones are then laid out contiguously, without the
    capacity layout's fixed slots (they would be padding rows for the GEMMs), by a second
    plan over E + 1 experts where every dropped assignment goes to the extra, non-local one."""
    if capacity is None:
        plan = permute_plan(ids, num_experts, weights=weights)
        return plan.row_map, plan.offsets, plan.gather, plan.weights
    keep = permute_plan(ids, num_experts, capacity=capacity, drop_policy=drop_policy,
                        weights=weights.detach()).row_map >= 0
    kept_ids = torch.where(keep, ids, num_experts)
    plan = permute_plan(kept_ids, num_experts + 1, weights=weights, expert_range=(0, num_experts))
    return plan.row_map, plan.offsets[:num_experts + 1], plan.gather, plan.weights


def _shared_expert(x, w13, w2, activation, gate_weight, alpha, limit):
    """The shared expert: every token through one MLP, as a one-expert grouped GEMM (fused
    activation), scaled by ``sigmoid(x @ gate_weight^T)`` when a gate is given (Qwen2-MoE)."""
    tokens = x.shape[0]
    offsets = torch.arange(2, device=x.device, dtype=torch.int64) * tokens  # [0, T] on the device
    scale = None
    if gate_weight is not None:
        scale = torch.sigmoid(F.linear(x, gate_weight.to(x.dtype))).reshape(tokens)
    h = grouped_gemm(x, _one_expert(w13), offsets, activation=activation, alpha=alpha, limit=limit)
    return grouped_gemm(h, _one_expert(w2), offsets, row_scale=scale)


def _one_expert(w):
    return w if isinstance(w, QuantizedWeight) else w.unsqueeze(0)


def _weight_dims(w, name, w_layout):
    """(E, N, K) of an expert weight tensor or QuantizedWeight, in w_layout."""
    if isinstance(w, QuantizedWeight):
        if w.num_experts is None:
            raise ValueError(f"{name}: expected an [E, N, K] QuantizedWeight, got shape {w.shape}")
        return tuple(w.shape)
    check_tensor(w, name, dtypes=(torch.float16, torch.bfloat16), dim=3, contiguous=False)
    e, a, b = w.shape
    return (e, a, b) if w_layout == "nk" else (e, b, a)


def _check_layer_args(x, router_logits, w13, w2, k, routing, capacity, activation, w_layout,
                      weight_on_input, b13, b2, shared_w13, shared_w2, shared_gate, selection_bias):
    check_tensor(x, "x", dtypes=(torch.float16, torch.bfloat16), contiguous=False)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape [..., H], got a 0-D tensor")
    hidden = x.shape[-1]
    tokens = x.numel() // max(hidden, 1)
    check_tensor(router_logits, "router_logits", dtypes=FLOAT_DTYPES + (torch.float64,), contiguous=False)
    check_same_device(router_logits, "router_logits", x, "x")
    check_choice(w_layout, "w_layout", W_LAYOUTS)
    check_choice(routing, "routing", ROUTINGS)
    check_choice(activation, "activation", ACTIVATIONS)
    weight_on_input = check_bool(weight_on_input, "weight_on_input")
    num_experts, n1, k1 = _weight_dims(w13, "w13", w_layout)
    if router_logits.dim() < 1 or router_logits.shape[-1] != num_experts or \
            router_logits.numel() != tokens * num_experts:
        raise ValueError(f"router_logits: expected [..., {num_experts}] with one row per token of x "
                         f"({tokens}), got shape {tuple(router_logits.shape)}")
    if k1 != hidden:
        raise ValueError(f"w13: expected K = hidden size of x ({hidden}), got shape "
                         f"{tuple(w13.shape)} (w_layout={w_layout!r})")
    gated = activation in GATED_ACTIVATIONS
    if gated and n1 % 2:
        raise ValueError(f"w13: a gated activation needs an even N (gate and up), got {n1}")
    inter = n1 // 2 if gated else n1
    if _weight_dims(w2, "w2", w_layout) != (num_experts, hidden, inter):
        raise ValueError(f"w2: expected (E, N, K) = ({num_experts}, {hidden}, {inter}) (w_layout="
                         f"{w_layout!r}), got shape {tuple(w2.shape)}")
    for w, name in ((w13, "w13"), (w2, "w2")):
        if not isinstance(w, QuantizedWeight) and w.dtype != x.dtype:
            raise TypeError(f"{name}: expected the dtype of x ({x.dtype}), got {w.dtype}")
    for b, name, n in ((b13, "b13", n1), (b2, "b2", hidden)):
        if b is not None:
            check_tensor(b, name, dtypes=FLOAT_DTYPES, dim=2, contiguous=False)
            if tuple(b.shape) != (num_experts, n):
                raise ValueError(f"{name}: expected shape ({num_experts}, {n}), got {tuple(b.shape)}")
    if selection_bias is not None:  # topk_gating checks it too, but would call it "bias"
        check_tensor(selection_bias, "selection_bias", dtypes=FLOAT_DTYPES + (torch.float64,), dim=1,
                     contiguous=False)
        check_same_device(selection_bias, "selection_bias", x, "x")
        if selection_bias.shape[0] != num_experts:
            raise ValueError(f"selection_bias: expected {num_experts} elements (one per expert), "
                             f"got {selection_bias.shape[0]}")
    if routing == "expert_choice" and capacity is None:
        raise ValueError("capacity: expert-choice routing needs capacity (tokens per expert)")
    if capacity is not None:
        capacity = check_int(capacity, "capacity", 0, 2**31 - 1)
        if routing == "topk" and num_experts + 1 > MAX_EXPERTS:
            raise ValueError(f"capacity: the capacity mode needs E < {MAX_EXPERTS}, got E={num_experts}")
    if routing == "topk":
        k = check_int(k, "k", 1, num_experts)
    if (shared_w13 is None) != (shared_w2 is None):
        raise ValueError("shared_w13: expected shared_w13 and shared_w2 together (or neither)")
    if shared_gate is not None and shared_w13 is None:
        raise ValueError("shared_gate: a shared-expert gate needs shared_w13 and shared_w2")
    if shared_w13 is not None:
        sw13 = shared_w13 if isinstance(shared_w13, QuantizedWeight) else _check_2d(shared_w13, "shared_w13", x)
        sw2 = shared_w2 if isinstance(shared_w2, QuantizedWeight) else _check_2d(shared_w2, "shared_w2", x)
        sn, sk = sw13.shape[-2:]
        if sk != hidden or (gated and sn % 2):
            raise ValueError(f"shared_w13: expected [N, {hidden}] (an even N for a gated activation), "
                             f"got shape {tuple(sw13.shape)}")
        if tuple(sw2.shape[-2:]) != (hidden, sn // 2 if gated else sn):
            raise ValueError(f"shared_w2: expected shape ({hidden}, {sn // 2 if gated else sn}), got "
                             f"{tuple(sw2.shape)}")
        if shared_gate is not None:
            check_tensor(shared_gate, "shared_gate", dtypes=FLOAT_DTYPES, contiguous=False)
            if tuple(shared_gate.shape) not in ((1, hidden), (hidden,)):
                raise ValueError(f"shared_gate: expected shape (1, {hidden}), got {tuple(shared_gate.shape)}")
    return num_experts, k, capacity, weight_on_input


def _check_2d(w, name, x):
    check_tensor(w, name, dtypes=(torch.float16, torch.bfloat16), dim=2, contiguous=False)
    check_same_device(w, name, x, "x")
    if w.dtype != x.dtype:
        raise TypeError(f"{name}: expected the dtype of x ({x.dtype}), got {w.dtype}")
    return w


def fused_moe(x, router_logits, w13, w2, *, k, scoring="softmax", renormalize=False,
              scaling_factor=1.0, selection_bias=None, num_groups=1, topk_groups=None,
              group_scoring="top2_sum", routing="topk", capacity=None, drop_policy="position",
              activation="silu_and_mul", alpha=1.702, limit=7.0, w_layout="nk", b13=None,
              b2=None, weight_on_input=False, shared_w13=None, shared_w2=None, shared_gate=None):
    """A whole MoE block: routing, the routed experts, the combine and the shared expert.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., H]`` bfloat16 / float16 tokens (leading dimensions flattened).
    router_logits : torch.Tensor
        ``[..., E]`` router logits, one row per token (any float dtype; float32 is what
        ``MoE`` computes). The gating kernel computes the scores in float32.
    w13 : torch.Tensor or QuantizedWeight
        Expert up projections ``[E, N1, H]`` (``w_layout="nk"``) or ``[E, H, N1]``
        (``"kn"``), x's dtype; ``N1 = 2 * I`` for a gated activation (gate rows first,
        then up; interleaved for ``"swiglu_oai"``), else ``I``. Or a 4-bit
        ``QuantizedWeight`` ``[E, N1, H]`` (W4A16).
    w2 : torch.Tensor or QuantizedWeight
        Expert down projections ``[E, H, I]`` (``"nk"``) or ``[E, I, H]`` (``"kn"``).
    k : int
        Experts per token (top-k routing).
    scoring, renormalize, scaling_factor, num_groups, topk_groups, group_scoring
        The gating (see ``topk_gating``).
    selection_bias : torch.Tensor or None
        ``[E]`` bias added to the scores for the selection only (DeepSeek-V3's
        ``e_score_correction_bias``; ``topk_gating``'s ``bias``).
    routing : {"topk", "expert_choice"}
        ``"expert_choice"``: each expert takes its ``capacity`` best tokens
        (``expert_choice_gating``; k and the gating options are not used); a token's rows
        are summed in expert order.
    capacity : int or None
        Top-k routing: None is dropless; an int caps each expert's tokens (Switch/GShard;
        ``capacity_from_factor`` converts a capacity factor). Dropped assignments contribute
        zero (a token with every assignment dropped outputs only the shared expert, or
        zero). Expert choice: the tokens per expert (required).
    drop_policy : {"position", "weight"}
        Which assignments an expert over capacity keeps (see ``permute``).
    activation : str or None
        The fused activation of the first GEMM (``grouped_gemm``'s): "silu_and_mul"
        (Mixtral, Qwen, DeepSeek, Llama 4, OLMoE), "swiglu_oai" (GPT-OSS), "gelu_and_mul",
        "gelu_tanh_and_mul", or non-gated "relu" (Switch, GShard), "gelu", "gelu_tanh",
        "silu", or None.
    alpha, limit : float
        swiglu_oai's constants.
    w_layout : {"nk", "kn"}
        Layout of w13 and w2 (``"kn"``: GPT-OSS's ``[E, H, 2I]``), read in place.
    b13, b2 : torch.Tensor or None
        Expert biases ``[E, N1]`` and ``[E, H]`` (GPT-OSS).
    weight_on_input : bool
        Multiply the routing weight into the expert's input (Llama 4) instead of its output.
        Costs one ``[T * k, H]`` copy of the scaled rows.
    shared_w13, shared_w2 : torch.Tensor or None
        The shared expert, ``[N1s, H]`` and ``[H, Is]`` (nn.Linear layout), added to every
        token's output; same activation as the routed experts.
    shared_gate : torch.Tensor or None
        ``[1, H]``: the shared expert's output is scaled by ``sigmoid(x @ shared_gate^T)``
        (Qwen2-MoE, Qwen3-Next).

    Returns
    -------
    torch.Tensor
        ``[..., H]`` in x's dtype.

    Notes
    -----
    The routed output of token t is ``sum_j round(weight[t, j] * expert(x[t]))`` over its k
    slots in slot order, summed in float32 and rounded once; each expert's intermediate is
    rounded to x's dtype between the GEMMs; the shared expert's output is added in x's
    dtype. Differentiable in x, the router logits, the expert weights and biases (16-bit
    weights) and the shared expert. No host synchronization; deterministic bit for bit.
    """
    y, _ = _fused_moe(x, router_logits, w13, w2, k=k, scoring=scoring, renormalize=renormalize,
                      scaling_factor=scaling_factor, selection_bias=selection_bias,
                      num_groups=num_groups, topk_groups=topk_groups, group_scoring=group_scoring,
                      routing=routing, capacity=capacity, drop_policy=drop_policy,
                      activation=activation, alpha=alpha, limit=limit, w_layout=w_layout, b13=b13,
                      b2=b2, weight_on_input=weight_on_input, shared_w13=shared_w13,
                      shared_w2=shared_w2, shared_gate=shared_gate)
    return y


def _fused_moe(x, router_logits, w13, w2, *, k, scoring, renormalize, scaling_factor, selection_bias,
               num_groups, topk_groups, group_scoring, routing, capacity, drop_policy, activation,
               alpha, limit, w_layout, b13, b2, weight_on_input, shared_w13, shared_w2, shared_gate):
    """fused_moe, also returning the routing ids ([T, k] for top-k, None for expert choice)
    for the layer's statistics and losses."""
    num_experts, k, capacity, weight_on_input = _check_layer_args(
        x, router_logits, w13, w2, k, routing, capacity, activation, w_layout, weight_on_input, b13,
        b2, shared_w13, shared_w2, shared_gate, selection_bias)
    alpha, limit = check_number(alpha, "alpha"), check_number(limit, "limit")
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    logits = router_logits.reshape(-1, num_experts)
    tokens = x.shape[0]
    expert_args = (w13, w2, b13, b2, activation, alpha, limit, w_layout, weight_on_input)
    if routing == "topk":
        with _phase("route"):
            weights, ids = topk_gating(logits, k, scoring=scoring, bias=selection_bias,
                                       num_groups=num_groups, topk_groups=topk_groups,
                                       group_scoring=group_scoring, renormalize=renormalize,
                                       scaling_factor=scaling_factor)
        with _phase("plan"):
            row_map, offsets, gather, row_weights = _topk_plan(ids, weights, num_experts, capacity,
                                                               drop_policy)
        y_rows = _expert_rows(x, gather, offsets, row_weights, *expert_args)
        with _phase("combine"):
            y = unpermute(y_rows, row_map)
    else:
        ids = None
        with _phase("route"):
            token_idx, weights = expert_choice_gating(logits, capacity)
        with _phase("plan"):
            offsets = torch.arange(num_experts + 1, device=x.device, dtype=torch.int64) * capacity
            gather = token_idx.reshape(-1).long()
        y_rows = _expert_rows(x, gather, offsets, weights.reshape(-1), *expert_args)
        with _phase("combine"):
            y = _token_sum(y_rows, gather, tokens)
    if shared_w13 is not None:
        with _phase("shared"):
            y = y + _shared_expert(x, shared_w13, shared_w2, activation, shared_gate, alpha, limit)
    return y.reshape(shape), ids


def record_router_statistics(layer, logits, ids):
    """What a training forward leaves on the layer for the training loop: ``aux_loss`` and
    ``z_loss`` when their coefficients are set, and ``expert_counts`` (for the selection
    bias update) in training mode."""
    if layer.aux_loss_coef:
        layer.aux_loss = load_balancing_loss(logits, ids, layer.num_experts, alpha=layer.aux_loss_coef,
                                             scoring=layer.gating["scoring"])
    if layer.z_loss_coef:
        layer.z_loss = layer.z_loss_coef * router_z_loss(logits)
    if layer.selection_bias is not None and layer.training:
        layer.expert_counts = router_stats(ids, layer.num_experts)


class MoE(nn.Module):
    """A Mixture-of-Experts block on the package's kernels: ``y = MoE(...)(x)``.

    Parameters
    ----------
    hidden_size, intermediate_size, num_experts, k : int
        H, the expert width I, E and the experts per token.
    scoring, renormalize, scaling_factor, num_groups, topk_groups, group_scoring
        The gating (``topk_gating``).
    selection_bias : bool
        Keep a float32 ``selection_bias`` buffer ``[E]`` (DeepSeek-V3's
        ``e_score_correction_bias``), added to the scores for the selection only and
        updated by ``update_selection_bias`` (auxiliary-loss-free balancing).
    router_bias : bool
        A bias on the router's linear layer (GPT-OSS).
    router_dtype : torch.dtype or None
        The router's matmul runs in this dtype (default float32: the router in full
        precision, its weight kept in float32). None: in x's dtype, as some models'
        reference code does (Mixtral); the scores are float32 either way.
    routing : {"topk", "expert_choice"}
    capacity_factor : float or None
        Top-k: None is dropless; else each expert keeps at most
        ``capacity_from_factor(T, k, E, capacity_factor)`` tokens (Switch/GShard), the rest
        contribute zero. Expert choice: tokens per expert ``= ceil(T * k * factor / E)``
        (default factor 1).
    drop_policy : {"position", "weight"}
    activation, alpha, limit : the experts' activation (``fused_moe``).
    expert_bias : bool
        Biases on both expert projections (GPT-OSS).
    w_layout : {"nk", "kn"}
        Storage of the expert weights: ``w13 [E, N1, H]`` and ``w2 [E, H, I]`` ("nk"), or
        transposed ``[E, H, N1]`` and ``[E, I, H]`` ("kn").
    weight_on_input : bool
        The routing weight multiplies the expert input (Llama 4).
    shared_intermediate_size : int
        Width of the shared expert (0: none).
    shared_gate : bool
        Scale the shared expert by ``sigmoid(x @ shared_gate^T)`` (Qwen2-MoE, Qwen3-Next).
    aux_loss_coef, z_loss_coef : float
        When nonzero, each forward stores ``self.aux_loss`` (``load_balancing_loss`` with
        ``alpha=aux_loss_coef``) and ``self.z_loss`` (``z_loss_coef * router_z_loss``),
        differentiable, for the training loop to add.
    dtype, device
        Of the expert weights (bfloat16 default); the router is float32 unless
        router_dtype says otherwise.

    Attributes
    ----------
    router_weight ``[E, H]``, router_bias ``[E]``, w13, w2, b13 ``[E, N1]``, b2 ``[E, H]``,
    shared_w13 ``[N1s, H]``, shared_w2 ``[H, Is]``, shared_gate ``[1, H]``: parameters (None
    where disabled). w13 / w2 may be replaced by ``QuantizedWeight`` (see ``quantize``).
    expert_counts : after a training forward with a selection bias, the ``[E]`` int32
    assignments per expert (``router_stats``), which ``update_selection_bias`` uses.
    """

    def __init__(self, hidden_size, intermediate_size, num_experts, k, *, scoring="softmax",
                 renormalize=False, scaling_factor=1.0, num_groups=1, topk_groups=None,
                 group_scoring="top2_sum", selection_bias=False, router_bias=False,
                 router_dtype=torch.float32, routing="topk", capacity_factor=None,
                 drop_policy="position", activation="silu_and_mul", alpha=1.702, limit=7.0,
                 expert_bias=False, w_layout="nk", weight_on_input=False,
                 shared_intermediate_size=0, shared_gate=False, aux_loss_coef=0.0,
                 z_loss_coef=0.0, dtype=torch.bfloat16, device=None):
        super().__init__()
        hidden_size = check_int(hidden_size, "hidden_size", 1, 1 << 24)
        intermediate_size = check_int(intermediate_size, "intermediate_size", 1, 1 << 24)
        num_experts = check_int(num_experts, "num_experts", 1, MAX_EXPERTS)
        check_choice(routing, "routing", ROUTINGS)
        self.k = check_int(k, "k", 1, num_experts)
        check_choice(scoring, "scoring", SCORINGS)
        check_choice(activation, "activation", ACTIVATIONS)
        check_choice(w_layout, "w_layout", W_LAYOUTS)
        check_choice(drop_policy, "drop_policy", DROP_POLICIES)
        if dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"dtype: expected bfloat16 or float16 (the expert weights), got {dtype}")
        if router_dtype is not None and router_dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"router_dtype: expected a float dtype or None, got {router_dtype}")
        if capacity_factor is not None:
            capacity_factor = check_number(capacity_factor, "capacity_factor")
            if not capacity_factor > 0:
                raise ValueError(f"capacity_factor: expected a positive number, got {capacity_factor}")
        self.hidden_size, self.intermediate_size, self.num_experts = hidden_size, intermediate_size, num_experts
        self.gating = dict(scoring=scoring, renormalize=check_bool(renormalize, "renormalize"),
                           scaling_factor=check_number(scaling_factor, "scaling_factor"),
                           num_groups=num_groups, topk_groups=topk_groups, group_scoring=group_scoring)
        self.routing, self.capacity_factor, self.drop_policy = routing, capacity_factor, drop_policy
        self.activation, self.alpha, self.limit = activation, float(alpha), float(limit)
        self.w_layout = w_layout
        self.weight_on_input = check_bool(weight_on_input, "weight_on_input")
        self.router_dtype = router_dtype
        self.aux_loss_coef = check_number(aux_loss_coef, "aux_loss_coef")
        self.z_loss_coef = check_number(z_loss_coef, "z_loss_coef")
        self.aux_loss = self.z_loss = self.expert_counts = None

        n1 = 2 * intermediate_size if activation in GATED_ACTIVATIONS else intermediate_size
        factory = dict(dtype=dtype, device=device)
        router_factory = dict(dtype=router_dtype or dtype, device=device)
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **router_factory))
        self.router_bias = nn.Parameter(torch.empty(num_experts, **router_factory)) if router_bias else None
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32, device=device)
                             if selection_bias else None)

        def expert_weight(n, k_):
            shape = (num_experts, n, k_) if w_layout == "nk" else (num_experts, k_, n)
            return nn.Parameter(torch.empty(shape, **factory))

        self.w13 = expert_weight(n1, hidden_size)
        self.w2 = expert_weight(hidden_size, intermediate_size)
        self.b13 = nn.Parameter(torch.empty(num_experts, n1, **factory)) if expert_bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size, **factory)) if expert_bias else None
        shared_intermediate_size = check_int(shared_intermediate_size, "shared_intermediate_size", 0, 1 << 24)
        self.shared_intermediate_size = shared_intermediate_size
        if shared_gate and not shared_intermediate_size:
            raise ValueError("shared_gate: needs a shared expert (shared_intermediate_size > 0)")
        if shared_intermediate_size:
            sn1 = 2 * shared_intermediate_size if activation in GATED_ACTIVATIONS else shared_intermediate_size
            self.shared_w13 = nn.Parameter(torch.empty(sn1, hidden_size, **factory))
            self.shared_w2 = nn.Parameter(torch.empty(hidden_size, shared_intermediate_size, **factory))
        else:
            self.shared_w13 = self.shared_w2 = None
        self.shared_gate = nn.Parameter(torch.empty(1, hidden_size, **factory)) if shared_gate else None
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name, **overrides):
        """The layer of model family `name` (see ``moe_kernels.presets.PRESETS``): its
        routing and expert structure, at the model's sizes unless `overrides` (any
        constructor argument, e.g. ``hidden_size=1024, num_experts=64``) say otherwise."""
        from .presets import preset_config
        return cls(**preset_config(name, **overrides))

    @classmethod
    def from_hf(cls, block):
        """The layer of a transformers sparse-MoE block, sharing its weights where the
        layouts allow (see ``moe_kernels.hf.from_hf``)."""
        from .hf import from_hf
        return from_hf(block)

    def reset_parameters(self):
        """nn.Linear's initialisation for every projection (uniform in +-1/sqrt(fan_in))."""
        def uniform(p, fan_in):
            if isinstance(p, nn.Parameter):
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(p, -bound, bound)

        with torch.no_grad():
            uniform(self.router_weight, self.hidden_size)
            uniform(self.router_bias, self.hidden_size)
            uniform(self.w13, self.hidden_size)
            uniform(self.b13, self.hidden_size)
            uniform(self.w2, self.intermediate_size)
            uniform(self.b2, self.intermediate_size)
            uniform(self.shared_w13, self.hidden_size)
            uniform(self.shared_w2, max(self.shared_intermediate_size, 1))
            uniform(self.shared_gate, self.hidden_size)

    def router_logits(self, x):
        """``[..., E]`` router logits of x (float32 by default, see router_dtype)."""
        dtype = self.router_dtype or x.dtype
        bias = None if self.router_bias is None else self.router_bias.to(dtype)
        return F.linear(x.to(dtype), self.router_weight.to(dtype), bias)

    def capacity(self, num_tokens):
        """The capacity used for `num_tokens` tokens (None: dropless):
        ``capacity_from_factor(num_tokens, k, E, capacity_factor)``."""
        if self.routing == "topk" and self.capacity_factor is None:
            return None
        return capacity_from_factor(num_tokens, self.k, self.num_experts,
                                    1.0 if self.capacity_factor is None else self.capacity_factor)

    def forward(self, x, return_router_logits=False):
        """``[..., H]`` -> ``[..., H]``, in x's dtype (the expert weights' dtype).
        ``return_router_logits=True``: ``(y, logits)`` with the ``[..., E]`` router logits
        this forward computed (e.g. for a caller's auxiliary loss or a block that returns
        them, see ``moe_kernels.hf``)."""
        with _phase("route"):
            logits = self.router_logits(x)
        tokens = x.numel() // self.hidden_size
        y, ids = _fused_moe(
            x, logits, self.w13, self.w2, k=self.k, **self.gating, selection_bias=self.selection_bias,
            routing=self.routing, capacity=self.capacity(tokens), drop_policy=self.drop_policy,
            activation=self.activation, alpha=self.alpha, limit=self.limit, w_layout=self.w_layout,
            b13=self.b13, b2=self.b2, weight_on_input=self.weight_on_input, shared_w13=self.shared_w13,
            shared_w2=self.shared_w2, shared_gate=self.shared_gate)
        if ids is not None:
            record_router_statistics(self, logits, ids)
        return (y, logits) if return_router_logits else y

    @torch.no_grad()
    def update_selection_bias(self, rate=1e-3, counts=None):
        """Auxiliary-loss-free balancing (DeepSeek-V3): ``selection_bias += rate *
        sign(mean(counts) - counts)``, with the counts of the last training forward (or
        `counts`, e.g. summed over micro-batches). No host synchronization."""
        if self.selection_bias is None:
            raise ValueError("selection_bias: this layer has none (construct it with selection_bias=True)")
        counts = self.expert_counts if counts is None else counts
        if counts is None:
            raise ValueError("counts: no training forward has recorded expert counts yet; pass counts")
        return update_routing_bias(self.selection_bias, counts, rate)

    def quantize(self, group_size=128, symmetric=True):
        """Replace the routed expert weights by 4-bit int4 ``QuantizedWeight`` (W4A16,
        ``quantize_int4``); the router and the shared expert stay in 16 bits."""
        from .quant import quantize_int4
        self._require_nk()  # before quantizing: a "kn" weight would quantize along the wrong axis
        return self.load_quantized(quantize_int4(self.w13.detach(), group_size=group_size, symmetric=symmetric),
                                   quantize_int4(self.w2.detach(), group_size=group_size, symmetric=symmetric))

    def load_quantized(self, w13, w2):
        """Use 4-bit expert weights: ``QuantizedWeight`` ``[E, N1, H]`` and ``[E, H, I]``, e.g.
        from ``quant.from_gptq`` / ``from_awq`` / ``from_compressed_tensors`` /
        ``from_mxfp4`` or ``quantize_int4``. They replace the w13 / w2 parameters (which
        must be in the "nk" layout); the 4-bit weights get no gradient, x and the rest still
        do. ``.to()`` / ``.cuda()`` of the layer move them too."""
        self._require_nk()
        expected = {"w13": tuple(self.w13.shape), "w2": tuple(self.w2.shape)}
        for name, qw in (("w13", w13), ("w2", w2)):
            if not isinstance(qw, QuantizedWeight):
                raise TypeError(f"{name}: expected a QuantizedWeight, got {type(qw).__name__}")
            if tuple(qw.shape) != expected[name]:
                raise ValueError(f"{name}: expected shape {expected[name]}, got {tuple(qw.shape)}")
        for name, qw in (("w13", w13), ("w2", w2)):
            if name in self._parameters:
                del self._parameters[name]
            object.__setattr__(self, name, qw)
        return self

    def _require_nk(self):
        if self.w_layout != "nk":
            raise ValueError("w_layout: 4-bit weights are [E, N, K] (construct the layer with w_layout='nk')")

    def _apply(self, fn, recurse=True):
        # nn.Module moves parameters and buffers; the 4-bit weights are plain attributes.
        super()._apply(fn, recurse)
        for name in ("w13", "w2"):
            qw = getattr(self, name)
            if isinstance(qw, QuantizedWeight):
                object.__setattr__(self, name, qw._replace(**{n: fn(t) for n, t in qw._tensors().items()}))
        return self

    def extra_repr(self):
        quantized = isinstance(self.w13, QuantizedWeight)
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, k={self.k}, routing={self.routing!r}, "
                f"scoring={self.gating['scoring']!r}, activation={self.activation!r}, "
                f"shared_intermediate_size={self.shared_intermediate_size}"
                + (", weights=4-bit" if quantized else ""))
