"""Routing ops: fused top-k gating (softmax / sigmoid, bias, group-limited), its backward,
router statistics and losses, the auxiliary-loss-free bias update, expert-choice and hash
routing.

Softmax scores follow ``torch.softmax``: a token whose logits hold a NaN or a +inf (or are
all -inf) gets NaN probabilities for every expert (``inf - inf`` in the max subtraction),
in ``topk_gating`` and ``expert_choice_gating`` alike, on every backend. Clamp the logits
first if they can overflow. Sigmoid scores are elementwise: +inf gives 1, -inf gives 0."""

import torch

from . import reference
from ._backend import selected_backend
from ._checks import (FLOAT_DTYPES, check_bool, check_choice, check_int, check_number,
                      check_same_device, check_tensor)
from ._library import native_call, register_op
from ._limits import MAX_COUNTED_EXPERTS, MAX_EXPERTS

SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
FLOAT32_MAX = 3.4028234663852886e38


def _check_logits(logits):
    check_tensor(logits, "logits", dtypes=FLOAT_DTYPES, dim=2)
    num_experts = logits.shape[1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"logits: expected 1 to {MAX_EXPERTS} experts (columns), got {num_experts}")
    return num_experts


def _group_topn(group_scoring):
    """n of group_scoring "max" (1) or "top{n}_sum" (n >= 1)."""
    if group_scoring == "max":
        return 1
    if isinstance(group_scoring, str) and group_scoring.startswith("top") and group_scoring.endswith("_sum"):
        digits = group_scoring[3:-4]
        if digits.isascii() and digits.isdigit() and not digits.startswith("0") and len(digits) <= 9:
            return int(digits)
    raise ValueError(f"group_scoring: expected 'max' or 'top{{n}}_sum' (n >= 1, e.g. 'top2_sum'), "
                     f"got {group_scoring!r}")


def _fake_topk_gating(backend, logits, k, renormalize, scoring, bias, num_groups, topk_groups,
                      group_scoring, scaling_factor):
    shape = (logits.shape[0], k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)


register_op("topk_gating",
            "(str backend, Tensor logits, int k, bool renormalize, str scoring, Tensor? bias, "
            "int num_groups, int topk_groups, str group_scoring, float scaling_factor) "
            "-> (Tensor, Tensor)", _fake_topk_gating)


def _fake_topk_gating_backward(backend, grad_weights, logits, ids, scoring, renormalize,
                               scaling_factor):
    return torch.empty_like(logits)


register_op("topk_gating_backward",
            "(str backend, Tensor grad_weights, Tensor logits, Tensor ids, str scoring, "
            "bool renormalize, float scaling_factor) -> Tensor", _fake_topk_gating_backward)


class _TopkGatingFunction(torch.autograd.Function):
    """The native kernels forward and backward; the selection is piecewise constant, so
    only the weights carry gradient, and only to the logits."""

    @staticmethod
    def forward(ctx, logits, bias, backend, k, scoring, num_groups, topk_groups, group_scoring,
                renormalize, scaling_factor):
        weights, ids = native_call(backend, "topk_gating", logits, k, renormalize, scoring, bias,
                                   num_groups, topk_groups, group_scoring, scaling_factor)
        ctx.save_for_backward(logits, ids)
        ctx.mark_non_differentiable(ids)
        ctx.config = (backend, scoring, renormalize, scaling_factor)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, grad_ids):
        logits, ids = ctx.saved_tensors
        backend, scoring, renormalize, scaling_factor = ctx.config
        grad_logits = native_call(backend, "topk_gating_backward", grad_weights.float().contiguous(),
                                  logits, ids, scoring, renormalize, scaling_factor)
        return (grad_logits,) + (None,) * 9


def topk_gating(logits, k, *, scoring="softmax", bias=None, num_groups=1, topk_groups=None,
                group_scoring="top2_sum", renormalize=False, scaling_factor=1.0):
    """Select the top-k experts of each token in one fused pass.

    Parameters
    ----------
    logits : torch.Tensor
        ``[..., E]`` router logits, ``1 <= E <= 4096``; the kernels read ``[T, E]``
        contiguous float32 / float16 / bfloat16. Leading dimensions are flattened (free for
        a contiguous tensor); a non-contiguous tensor costs one ``.contiguous()`` copy; float64
        costs one copy to float32 (the kernels compute in float32 either way).
    k : int
        Experts per token, ``1 <= k <= E`` (no cap below E) and at most the eligible
        experts ``topk_groups * E / num_groups``.
    scoring : {"softmax", "sigmoid", "sqrtsoftplus"}
        Scores: softmax over the E experts, elementwise sigmoid, or elementwise
        ``sqrt(softplus(x))`` (Transformer Engine; ``softplus(x) = log(1 + e^x)``).
    bias : torch.Tensor, optional
        ``[E]`` float32 (a float16 / bfloat16 / float64 or non-contiguous bias costs one
        small copy to contiguous float32), same device: added to the scores for the *selection* only (groups
        and experts); the weights are the unbiased scores and the bias gets no gradient.
    num_groups : int
        Split the experts into this many equal, contiguous groups (must divide E).
    topk_groups : int, optional
        Only the experts of the best ``topk_groups`` groups are eligible (default: all).
    group_scoring : str
        Group score: ``"top{n}_sum"``, the sum of its n largest (biased) scores, added
        largest first (``"top2_sum"``: DeepSeek-V3), or ``"max"`` (= ``"top1_sum"``,
        DeepSeek-V2). With groups, n must be at most the experts per group.
    renormalize : bool
        Divide the k weights of a token by their sum, computed as a softmax of the log
        scores over the k chosen experts: finite (weights and gradient) also where every
        chosen score underflows to 0, e.g. sigmoid of logits below about -88.
    scaling_factor : float
        Multiply the weights by this (after renormalizing); ``|scaling_factor|`` at most
        the float32 maximum.

    Returns
    -------
    weights : torch.Tensor
        ``[..., k]`` float32: the scores of the selected experts (renormalized, scaled), in
        selection order. Differentiable in ``logits`` (a backward kernel on cuda/simt).
    ids : torch.Tensor
        ``[..., k]`` int32 expert indices, best first.

    Notes
    -----
    Selection values are the logits without a bias (exact; softmax and sigmoid are
    monotonic), else score + bias, compared in float32; ties go to the lower expert (and
    group) index. A NaN value (logit, selection value or group score) ranks as -inf:
    after every number, tied with -inf, the tie going to the lower index. A NaN logit
    makes all of its token's weights NaN, for every scoring. Group-limited
    selection is equal to masking the dropped groups' experts out of the top-k.
    GPT-OSS routing (softmax over the k selected logits) is ``scoring="softmax",
    renormalize=True``.
    """
    check_tensor(logits, "logits", dtypes=FLOAT_DTYPES + (torch.float64,), contiguous=False)
    if logits.dim() < 1:
        raise ValueError("logits: expected a tensor of shape [..., E], got a 0-D tensor")
    num_experts = logits.shape[-1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"logits: expected 1 to {MAX_EXPERTS} experts (last dimension), "
                         f"got {num_experts}")
    leading = logits.shape[:-1]
    check_int(k, "k", 1, num_experts)
    check_choice(scoring, "scoring", SCORINGS)
    if bias is not None:
        check_tensor(bias, "bias", dtypes=FLOAT_DTYPES + (torch.float64,), dim=1, contiguous=False)
        check_same_device(bias, "bias", logits, "logits")
        if bias.shape[0] != num_experts:
            raise ValueError(f"bias: expected {num_experts} elements (one per expert), "
                             f"got {bias.shape[0]}")
    check_int(num_groups, "num_groups", 1, num_experts)
    if num_experts % num_groups:
        raise ValueError(f"num_groups: expected a divisor of the number of experts "
                         f"({num_experts}), got {num_groups}")
    if topk_groups is None:
        topk_groups = num_groups
    check_int(topk_groups, "topk_groups", 1, num_groups)
    topn = _group_topn(group_scoring)
    group_size = num_experts // num_groups
    if num_groups > 1 and topn > group_size:
        raise ValueError(f"group_scoring: {group_scoring!r} needs at least {topn} experts per "
                         f"group, got {group_size}")
    if k > topk_groups * group_size:
        raise ValueError(f"k: expected k <= the eligible experts topk_groups * E / num_groups "
                         f"({topk_groups * group_size}), got {k}")
    renormalize = check_bool(renormalize, "renormalize")
    scaling_factor = check_number(scaling_factor, "scaling_factor")
    if abs(scaling_factor) > FLOAT32_MAX:
        raise ValueError(f"scaling_factor: expected |scaling_factor| <= {FLOAT32_MAX:.8g} "
                         f"(float32 max: the weights are float32), got {scaling_factor:.6g}")

    backend = selected_backend(logits, "logits")
    # The kernels take [T, E] contiguous float32/float16/bfloat16 logits and a contiguous
    # float32 bias; anything else is converted here, in one copy at most (none when the
    # input already has that form).
    x = logits.reshape(-1, num_experts)
    if x.dtype == torch.float64:
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
    else:
        x = x.contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()  # a small [E] copy at most
    if backend == "reference":
        weights, ids = reference.topk_gating(x, k, scoring=scoring, bias=bias, num_groups=num_groups,
                                             topk_groups=topk_groups, group_scoring=group_scoring,
                                             renormalize=renormalize, scaling_factor=scaling_factor)
    elif torch.is_grad_enabled() and x.requires_grad:
        weights, ids = _TopkGatingFunction.apply(x, bias, backend, k, scoring, num_groups,
                                                 topk_groups, group_scoring, renormalize,
                                                 float(scaling_factor))
    else:
        weights, ids = native_call(backend, "topk_gating", x, k, renormalize, scoring, bias,
                                   num_groups, topk_groups, group_scoring, float(scaling_factor))
    return weights.reshape(*leading, k), ids.reshape(*leading, k)


# ----------------------------------------------------------------------------------------
# The ops below (everything but topk_gating) accept what users naturally pass: logits of
# shape [..., E] (leading dimensions flattened into tokens), non-contiguous views (copied)
# and float64 (converted to float32); ids as int32 or int64 (torch.topk's dtype).

LOGIT_DTYPES = FLOAT_DTYPES + (torch.float64,)
ID_DTYPES = (torch.int32, torch.int64)


def _logit_rows(logits):
    """`logits` [..., E] as the [T, E] rows the kernels take (T = product of the leading
    dimensions): a view when the tensor is contiguous and float32 / float16 / bfloat16; a
    copy when it is not contiguous; float64 converted to float32 (a copy). Differentiable.
    Returns (rows, E)."""
    check_tensor(logits, "logits", dtypes=LOGIT_DTYPES, contiguous=False)
    if logits.dim() == 0:
        raise ValueError("logits: expected a tensor of shape [..., E], got a 0-D tensor")
    num_experts = logits.shape[-1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"logits: expected 1 to {MAX_EXPERTS} experts (last dimension), "
                         f"got {num_experts}")
    rows = logits.reshape(logits.shape[:-1].numel(), num_experts)
    if rows.dtype == torch.float64:
        rows = rows.float()
    return rows.contiguous(), num_experts


def _id_rows(ids, logits, num_experts):
    """`ids` [..., k] int32 / int64 with the leading dimensions of `logits` [..., E], as
    [T, k] (a view, or a copy when not contiguous)."""
    check_tensor(ids, "ids", dtypes=ID_DTYPES, contiguous=False)
    check_same_device(ids, "ids", logits, "logits")
    if ids.dim() != logits.dim() or ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"ids: expected shape [..., k] with the leading dimensions of logits "
                         f"{tuple(logits.shape[:-1])}, got {tuple(ids.shape)}")
    return ids.reshape(ids.shape[:-1].numel(), ids.shape[-1]).contiguous()


def _check_num_experts(num_experts, logits_experts):
    check_int(num_experts, "num_experts", 1, MAX_EXPERTS)
    if logits_experts != num_experts:
        raise ValueError(f"logits: expected {num_experts} experts in the last dimension "
                         f"(num_experts), got {logits_experts}")
    return num_experts


def _fake_router_stats(backend, ids, num_experts):
    return ids.new_empty((num_experts,), dtype=torch.int32)


register_op("router_stats", "(str backend, Tensor ids, int num_experts) -> Tensor", _fake_router_stats)


def router_stats(ids, num_experts):
    """Assignments per expert.

    Parameters
    ----------
    ids : torch.Tensor
        int32 or int64 expert ids of any shape (``[T, k]`` from ``topk_gating``, or the
        int64 indices of ``torch.topk``). The kernel reads both widths directly (int64 costs
        twice the id bytes, no conversion pass); a non-contiguous tensor is copied first.
        Entries outside ``[0, num_experts)`` (such as the -1 padding of
        ``expert_choice_gating``) are not counted.
    num_experts : int
        ``1 <= num_experts <= 65536``.

    Returns
    -------
    torch.Tensor
        ``[num_experts]`` int32 counts (a kernel on cuda/simt: a shared-memory histogram per
        block, integer atomics, deterministic). On the meta device, an empty tensor of that
        shape (the reference backend).
    """
    check_tensor(ids, "ids", dtypes=ID_DTYPES, contiguous=False)
    num_experts = check_int(num_experts, "num_experts", 1, MAX_COUNTED_EXPERTS)
    ids = ids.contiguous()
    backend = selected_backend(ids, "ids")
    if backend == "reference":
        return reference.router_stats(ids, num_experts)
    return native_call(backend, "router_stats", ids, num_experts)


def load_balancing_loss(logits, ids, num_experts, alpha=0.01, *, scoring="softmax"):
    """Switch Transformer load-balancing loss ``alpha * E * sum_i f_i * P_i``.

    ``f_i``: fraction of the ``T * k`` assignments in ``ids`` that go to expert i (from
    ``router_stats``, no gradient); ``P_i``: mean over the T tokens of the normalized score
    ``s'[t, i]``: ``softmax(logits)[t, i]`` for ``scoring="softmax"``, or for sigmoid
    routers (``scoring="sigmoid"``) the sigmoid scores divided by their sum over the E
    experts (DeepSeek-V3's normalization). Equals ``alpha`` for a perfectly uniform router.

    ``logits`` ``[..., E]`` (float32 / float16 / bfloat16 / float64: float64 is converted
    to float32, a non-contiguous tensor is copied), ``ids`` ``[..., k]`` int32 or int64
    with the same leading dimensions (tokens are the flattened leading dimensions).
    Differentiable in ``logits``. Returns a float32 scalar (NaN for T = 0).

    Hugging Face's ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE; no attention
    mask) equals ``k`` times this loss with ``alpha=1`` on the same top-k ids: it averages
    its one-hot expert mask over the tokens but sums it over the k slots.
    """
    rows, logits_experts = _logit_rows(logits)
    num_experts = _check_num_experts(num_experts, logits_experts)
    id_rows = _id_rows(ids, logits, num_experts)
    alpha = check_number(alpha, "alpha")
    check_choice(scoring, "scoring", SCORINGS)
    fraction = router_stats(id_rows, num_experts).float() / max(id_rows.numel(), 1)
    mean_score = reference.balance_scores(rows, scoring).mean(dim=0)
    return alpha * num_experts * (fraction * mean_score).sum()


def sequence_load_balancing_loss(logits, ids, num_experts, seq_len, alpha=0.0001, *,
                                 scoring="sigmoid"):
    """DeepSeek-V3's complementary sequence-wise balance loss
    ``alpha * mean over sequences of sum_i f_i * P_i``.

    The T tokens (the flattened leading dimensions of ``logits``) form ``T / seq_len``
    sequences of ``seq_len`` consecutive tokens (``[B, S, E]`` logits with
    ``seq_len=S``: one sequence per batch row). Per sequence,
    ``f_i = E / (k * seq_len) * (assignments to expert i in the sequence)`` (no gradient;
    ids outside ``[0, E)`` are not counted) and ``P_i = mean over the sequence's tokens of
    s'[t, i]``, the scores normalized to sum 1 over the experts: sigmoid scores divided by
    their sum (``scoring="sigmoid"``, DeepSeek-V3) or the softmax probabilities
    (``scoring="softmax"``). A perfectly balanced sequence gives ``alpha``.

    ``logits`` ``[..., E]`` (float64 converted to float32, non-contiguous copied), ``ids``
    ``[..., k]`` int32 / int64 with the same leading dimensions; ``seq_len`` must divide T.
    Plain PyTorch on every backend. Differentiable in ``logits``; returns a float32 scalar
    (NaN for T = 0).
    """
    rows, logits_experts = _logit_rows(logits)
    num_experts = _check_num_experts(num_experts, logits_experts)
    id_rows = _id_rows(ids, logits, num_experts)
    if id_rows.shape[1] < 1:
        raise ValueError("ids: expected at least one expert per token (k >= 1), got shape "
                         f"{tuple(ids.shape)}")
    seq_len = check_int(seq_len, "seq_len", 1, 2**62)
    if rows.shape[0] % seq_len:
        raise ValueError(f"seq_len: expected a divisor of the number of tokens ({rows.shape[0]}), "
                         f"got {seq_len}")
    alpha = check_number(alpha, "alpha")
    check_choice(scoring, "scoring", SCORINGS)
    return reference.sequence_load_balancing_loss(rows, id_rows, num_experts, seq_len, alpha,
                                                  scoring=scoring)


def router_z_loss(logits):
    """Router z-loss (ST-MoE): ``mean over tokens of logsumexp(logits)^2``, float32,
    differentiable. ``logits`` ``[..., E]``: float64 is converted to float32 (a copy)."""
    rows, _ = _logit_rows(logits)
    return torch.logsumexp(rows.float(), dim=-1).square().mean()


def update_routing_bias(bias, counts, rate):
    """Auxiliary-loss-free balancing (DeepSeek-V3), in place:
    ``bias += rate * sign(mean(counts) - counts)``: under-loaded experts go up, over-loaded
    down, balanced ones stay. ``bias`` ``[E]`` float32; ``counts`` ``[E]`` (e.g. from
    ``router_stats``) on the same device. Returns ``bias``.

    Non-finite counts (NaN or inf, float32 counts only) have no meaningful sign: on the CPU
    they raise a ValueError naming ``counts``; on a GPU (and the meta device) the check
    would need a host synchronization, so none is made and every entry of ``bias`` becomes
    NaN instead (never a silent no-op; check ``torch.isfinite(bias)`` if counts can be
    non-finite)."""
    check_tensor(bias, "bias", dtypes=(torch.float32,), dim=1)
    check_tensor(counts, "counts", dtypes=(torch.int32, torch.int64, torch.float32), dim=1,
                 contiguous=False)
    check_same_device(counts, "counts", bias, "bias")
    if counts.shape != bias.shape:
        raise ValueError(f"counts: expected {bias.shape[0]} elements (one per expert), "
                         f"got {counts.shape[0]}")
    rate = check_number(rate, "rate")
    with torch.no_grad():
        load = counts.double()  # exact for any count, so the sign is exact too
        finite = torch.isfinite(load).all()
        if counts.device.type == "cpu" and not finite:
            raise ValueError("counts: expected finite counts, got NaN or inf")
        step = torch.sign(load.mean() - load)
        # torch.sign(NaN) is 0: without this, NaN counts would silently leave bias alone.
        step = torch.where(finite, step, torch.full_like(step, float("nan")))
        bias.add_(step.float(), alpha=rate)
    return bias


def _fake_expert_choice_gating(backend, logits, capacity):
    shape = (logits.shape[1], capacity)
    return logits.new_empty(shape, dtype=torch.int32), logits.new_empty(shape, dtype=torch.float32)


register_op("expert_choice_gating", "(str backend, Tensor logits, int capacity) -> (Tensor, Tensor)",
            _fake_expert_choice_gating)


def expert_choice_backward(logits, token_idx, grad_weights):
    """Gradient of expert_choice_gating's weights with respect to `logits` [T, E] (the
    selection is constant). weights[e, c] = p[t, e] with p = softmax(logits) and
    t = token_idx[e, c], so with G[t, e] the sum of the gradients of the slots holding
    (t, e), grad_logits = p * (G - sum_e G * p) per token. Padding slots (token -1) add
    nothing. Plain PyTorch ops, the logits' dtype."""
    num_tokens, num_experts = logits.shape
    p = torch.softmax(logits.float(), dim=-1)
    expert = torch.arange(num_experts, device=logits.device).unsqueeze(1)
    flat = token_idx.long() * num_experts + expert  # [E, C] position in [T, E]
    # Padding slots land in one extra element past the end, dropped after the sum.
    flat = torch.where(token_idx >= 0, flat, num_tokens * num_experts).reshape(-1)
    g = torch.zeros(num_tokens * num_experts + 1, dtype=torch.float32, device=logits.device)
    g.scatter_add_(0, flat, grad_weights.float().reshape(-1))
    g = g[:-1].view(num_tokens, num_experts)
    return (p * (g - (g * p).sum(dim=-1, keepdim=True))).to(logits.dtype)


class _ExpertChoiceFunction(torch.autograd.Function):
    """The native kernels forward, expert_choice_backward backward: only the weights carry
    gradient, the same contract as the reference backend's autograd."""

    @staticmethod
    def forward(ctx, logits, backend, capacity):
        token_idx, weights = native_call(backend, "expert_choice_gating", logits, capacity)
        ctx.save_for_backward(logits, token_idx)
        ctx.mark_non_differentiable(token_idx)
        return token_idx, weights

    @staticmethod
    def backward(ctx, grad_token_idx, grad_weights):
        logits, token_idx = ctx.saved_tensors
        return expert_choice_backward(logits, token_idx, grad_weights), None, None


def expert_choice_gating(logits, capacity):
    """Expert-choice routing: each expert takes the ``capacity`` tokens with the highest
    softmax-over-experts score.

    Parameters
    ----------
    logits : torch.Tensor
        ``[..., E]`` float32 / float16 / bfloat16 / float64, ``1 <= E <= 4096``. The tokens
        are the rows: leading dimensions are flattened (``[B, S, E]`` is ``B * S`` tokens,
        token ``b * S + s``); a non-contiguous tensor is copied and float64 is converted to
        float32 (a copy) first.
    capacity : int
        Tokens per expert C, ``0 <= C < 2**31``. C may exceed T: the slots past T are
        padding (token -1, weight 0), so the output shape does not depend on T.

    Returns
    -------
    token_idx : torch.Tensor
        ``[E, C]`` int32 flattened token indices, each expert's tokens best first; ties go
        to the lower token index; NaN ranks as -inf.
    weights : torch.Tensor
        ``[E, C]`` float32 ``softmax(logits)[token, expert]``. Differentiable in ``logits``
        on every backend (a PyTorch backward on cuda/simt); padding slots carry no gradient.
        A token whose row has a NaN or a +inf logit (or only -inf logits) has NaN
        probabilities, as ``torch.softmax`` gives.

    Notes
    -----
    On cuda/simt, two kernels: the first writes the probabilities transposed into an
    ``[E, T]`` float32 scratch (4 bytes per logit, freed on return) with coalesced reads and
    writes; the second (one block per expert) selects from its contiguous column, staged
    in shared memory up to 12288 tokens.
    """
    rows, _ = _logit_rows(logits)
    capacity = check_int(capacity, "capacity", 0, 2**31 - 1)
    if rows.shape[0] >= 2**31:
        raise ValueError("logits: expected fewer than 2**31 tokens")
    backend = selected_backend(rows, "logits")
    if backend == "reference":
        return reference.expert_choice_gating(rows, capacity)
    if torch.is_grad_enabled() and rows.requires_grad:
        return _ExpertChoiceFunction.apply(rows, backend, capacity)
    return native_call(backend, "expert_choice_gating", rows, capacity)


def _fake_hash_gating(backend, token_ids, num_experts, k):
    shape = (token_ids.shape[0], k)
    return (token_ids.new_empty(shape, dtype=torch.float32),
            token_ids.new_empty(shape, dtype=torch.int32))


register_op("hash_gating", "(str backend, Tensor token_ids, int num_experts, int k) -> (Tensor, Tensor)",
            _fake_hash_gating)


def hash_gating(token_ids, num_experts, k):
    """Hash routing: a fixed map from token id to k distinct experts, weights 1/k.

    Token t, slot j (0 <= j < k) goes to expert ``a * (((t mod E) * k + j) mod E) mod E``
    with ``a`` the smallest integer >= round(0.618034 * E) coprime to E
    (``reference.hash_multiplier``). The k slots of a token are k consecutive residues
    mod E (distinct) and ``x -> a * x mod E`` is a permutation, so any E consecutive
    token ids put exactly k tokens on every expert. Negative ids use floor modulo.

    Parameters
    ----------
    token_ids : torch.Tensor
        ``[T]`` int32 or int64.
    num_experts : int
        ``1 <= E <= 65536``.
    k : int
        ``1 <= k <= E``.

    Returns
    -------
    weights : torch.Tensor
        ``[T, k]`` float32, all ``1 / k``.
    ids : torch.Tensor
        ``[T, k]`` int32.
    """
    check_tensor(token_ids, "token_ids", dtypes=(torch.int32, torch.int64), dim=1)
    check_int(num_experts, "num_experts", 1, MAX_COUNTED_EXPERTS)
    check_int(k, "k", 1, num_experts)
    backend = selected_backend(token_ids, "token_ids")
    if backend == "reference":
        return reference.hash_gating(token_ids, num_experts, k)
    return native_call(backend, "hash_gating", token_ids, num_experts, k)
