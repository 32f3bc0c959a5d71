"""Expert parallelism: the MoE layer with its routed experts sharded over a process group.

``ExpertParallelMoE`` holds the experts ``[r*L, (r+1)*L)`` of rank r (``L = E / W`` for a
group of W ranks); the router, its selection bias and the shared expert are replicated.
Each rank routes its own tokens, then::

    route       router logits and topk_gating, exactly as ``MoE`` (same code)
    plan        permute_plan over the E global experts: rows grouped by expert ascending,
                hence by destination rank (rank r owns a contiguous range of experts)
    dispatch    the rows (x gathered through the plan) and their routing weights (float32)
                go to the ranks that own their experts: an all-to-all
    local_plan  permute_plan over the L local experts of the received rows
    gemm1/gemm2 the local grouped GEMMs (``layer._expert_rows``: the first reads the
                received rows in place through the local plan's gather, the second applies
                the routing weight to each row as ``row_scale`` before rounding)
    combine     the expert rows go back to their source ranks in the order they came (the
                reverse all-to-all), then ``unpermute`` sums each token's rows in slot order
    shared      the (replicated) shared expert on the rank's own tokens

Every row's GEMM is independent of the other rows and each token's rows are combined in
slot order as in the single-process layer, so on any number of ranks the output is the
single-process ``MoE``'s, bit for bit (as long as nothing is dropped).

Two modes of exchange:

``mode="exact"``: the per-expert counts are exchanged on the device (a fixed-size
all-to-all of ``E`` int64), then copied to the host once (the only host sync), which gives
the exact split sizes of one ``all_to_all_single`` of the rows and one of their weights.
No padding is sent or computed; the shapes depend on the routing (no CUDA graph).

``mode="capacity"``: each (source rank, expert) pair has a fixed buffer of ``capacity``
rows (``permute_plan`` with ``capacity``: the Switch/GShard position rule, the first
``capacity`` assignments in (token, slot) order are kept). The send buffer ``[E, C, H]`` is
``[W destinations, L, C, H]``, exchanged by an equal-split all-to-all; the kept counts
``[E]`` travel the same way and stay on the device. No host sync, static shapes: CUDA-graph
capturable. Assignments over capacity are dropped (they contribute zero, as in ``MoE``'s
capacity mode) and counted in the ``dropped`` buffer (int64, cumulative, on the device).

The received buffer ``[W, L, C, H]`` holds, per (source, local expert), a valid prefix of
``counts[w, l]`` rows. The masked layout of ``grouped_gemm`` (``[L, S, K]`` + ``counts[L]``)
cannot take it as it is: expert l's rows are W separate prefixes, not one prefix of its
``W*C`` rows, so it would need a compaction copy, or computing all ``W*C`` rows (padding
included). Instead a local ``permute_plan`` over the valid rows (a slot past its prefix is
routed to an extra, non-local expert L) gives the contiguous layout's offsets and gather:
the GEMM reads the valid rows in place and computes no padding row, from counts that never
leave the device.

Backward: through the same exchanges in reverse (the backward of dispatch is an
all-to-all with the splits swapped, i.e. a combine, and vice versa). Expert-weight
gradients on a rank are those of its local experts (every source's rows included: equal
to the single-process layer's gradient slice). Router and shared-expert gradients are the
rank's partial ones (its own tokens): sum them over the ranks (as data parallelism does)
to get the single-process gradient of the concatenated batch.
"""


import torch
import torch.distributed as dist
from torch import nn

from ._checks import check_choice, check_int, check_number
from .layer import MoE, _expert_rows, _gather_rows, _phase, _shared_expert, record_router_statistics
from .permute import DROP_POLICIES, capacity_from_factor, permute_plan, unpermute
from .quant import QuantizedWeight
from .routing import topk_gating, update_routing_bias

MODES = ("exact", "capacity")
EP_PHASES = ("route", "plan", "dispatch", "local_plan", "gemm1", "gemm2", "combine", "shared")


# ---------------------------------------------------------------------------------------
# The exchange.

def _group_info(group):
    """(world size, rank) of `group`; (1, 0) without an initialized process group."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_to_all(x, out_splits, in_splits, group):
    """all_to_all_single along dim 0; splits None: equal splits (output shaped as x)."""
    x = x.contiguous()
    world, _ = _group_info(group)
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((rows, *x.shape[1:]))
    if world == 1:
        return out.copy_(x) if rows else out
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _AllToAllFunction(torch.autograd.Function):
    """An all-to-all whose backward is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x, out_splits=None, in_splits=None, group=None):
    """Differentiable ``all_to_all_single`` along dim 0 (``out_splits`` / ``in_splits``:
    rows received from / sent to each rank, host ints; None: equal splits)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _AllToAllFunction.apply(x, out_splits, in_splits, group)
    return _all_to_all(x, out_splits, in_splits, group)


def dispatch(x, ids, weights, num_experts, *, group=None, capacity=None, drop_policy="position"):
    """Send each kept assignment's token row and routing weight to the rank owning its expert.

    Parameters
    ----------
    x : ``[T, H]`` tokens of this rank. ids, weights : ``[T, k]`` from ``topk_gating``.
    num_experts : E (global), a multiple of the group's size W; rank r owns experts
        ``[r*L, (r+1)*L)``.
    capacity : None (exact mode) or rows per (source rank, expert) (capacity mode).

    Returns
    -------
    (rows, row_weights, counts, handle, stats): the received rows (exact: ``[R, H]``, the
    sources' rows one after the other, each source's grouped by local expert; capacity:
    ``[W*L*C, H]``, i.e. ``[W, L, C, H]`` with a valid prefix per (source, expert)), their
    float32 weights, the received counts ``[W, L]`` int64 (on the device), the handle
    ``(source plan, send splits, receive splits)`` for ``combine``, and a dict of host
    figures (rows and bytes sent; ``*_remote``: to other ranks). In capacity mode the dict
    also has ``"dropped"``: the ``[]`` int64 number of this rank's assignments over
    capacity, on the device.
    """
    world, rank = _group_info(group)
    if num_experts % world:
        raise ValueError(f"num_experts: expected a multiple of the process group's size ({world}), "
                         f"got {num_experts}")
    local = num_experts // world
    tokens, k = ids.shape
    elem = x.element_size()
    hidden = x.shape[1]
    with _phase("plan"):
        plan = permute_plan(ids, num_experts, capacity=capacity, drop_policy=drop_policy,
                            weights=weights)
        if capacity is None:
            counts = plan.offsets[1:] - plan.offsets[:-1]  # [E] rows per expert
        else:
            counts = (plan.gather.view(num_experts, capacity) >= 0).sum(1)  # kept, <= C
    stats = {}
    with _phase("dispatch"):
        send = _gather_rows(x, plan.gather)
        recv_counts = _all_to_all(counts.to(torch.int64), None, None, group)  # [W*L]: (source, l)
        stats["count_bytes"] = recv_counts.numel() * 8
        if capacity is None:
            # The one device-to-host copy: what this rank sends to each rank and receives.
            host = torch.cat([counts.view(world, local).sum(1), recv_counts]).cpu()
            send_splits = host[:world].tolist()
            recv_splits = host[world:].view(world, local).sum(1).tolist()
        else:
            send_splits = recv_splits = None
            stats["dropped"] = tokens * k - counts.sum()
        rows = all_to_all(send, recv_splits, send_splits, group)
        row_weights = all_to_all(plan.weights, recv_splits, send_splits, group)
        rows_sent = send.shape[0]
        rows_remote = rows_sent - (rows_sent // world if send_splits is None else send_splits[rank])
        stats.update(rows_sent=rows_sent, rows_received=rows.shape[0], rows_sent_remote=rows_remote,
                     dispatch_bytes=rows_sent * (hidden * elem + 4),
                     dispatch_bytes_remote=rows_remote * (hidden * elem + 4))
    recv_counts = recv_counts.view(world, local)
    return rows, row_weights, recv_counts, (plan, send_splits, recv_splits), stats


def local_plan(recv_counts, row_weights, capacity=None, num_rows=None):
    """permute_plan of the received rows over the L local experts: (row_map, offsets
    [L + 1], gather, weights). Exact mode: row i of source w belongs to the local expert
    its position in w's counts says (repeat_interleave with the host-known total).
    Capacity mode: slot (w, l, c) is expert l's row if c < counts[w, l], else it goes to
    the extra expert L (not local: no row, nothing computed).

    ``recv_counts``, ``row_weights``: dispatch's counts ``[W, L]`` and weights; `num_rows`:
    the received rows (exact mode). Returns ``(row_map, offsets, gather, weights)``: the
    grouped GEMM's ``offsets`` / ``gather`` over the received rows and ``row_scale``; and
    ``row_map`` ``[rows, 1]``, which ``unpermute`` uses to put the expert rows back in the
    received order. No host sync."""
    world, local = recv_counts.shape
    device = recv_counts.device
    experts = torch.arange(local, device=device).repeat(world)
    if capacity is None:
        num_rows = row_weights.shape[0] if num_rows is None else num_rows
        local_ids = torch.repeat_interleave(experts, recv_counts.reshape(-1), output_size=num_rows)
        plan = permute_plan(local_ids.view(-1, 1), local, weights=row_weights.view(-1, 1))
        return plan.row_map, plan.offsets, plan.gather, plan.weights
    slot = torch.arange(capacity, device=device)
    valid = slot.unsqueeze(0) < recv_counts.reshape(-1, 1)
    local_ids = torch.where(valid, experts.unsqueeze(1), local).view(-1, 1)
    plan = permute_plan(local_ids, local + 1, weights=row_weights.view(-1, 1), expert_range=(0, local))
    return plan.row_map, plan.offsets[:local + 1], plan.gather, plan.weights


def combine(y_rows, handle, group=None):
    """The reverse exchange and the combine: ``y_rows`` (the received rows' expert outputs,
    in the order they were received, routing weight applied) go back to their sources
    (``handle`` from ``dispatch``: the same splits, swapped); each token's rows are summed
    in slot order (``unpermute``, as the single-process layer). Returns ``[T, H]``."""
    source_plan, send_splits, recv_splits = handle
    with _phase("combine"):
        back = all_to_all(y_rows, send_splits, recv_splits, group)
        return unpermute(back, source_plan.row_map)


# ---------------------------------------------------------------------------------------
# The module.

class ExpertParallelMoE(nn.Module):
    """``MoE`` with its routed experts sharded over the ranks of a process group.

    Parameters
    ----------
    layer : MoE or dict
        The full single-process layer (its weights are copied: this rank keeps experts
        ``[r*L, (r+1)*L)`` and the replicated router and shared expert), or ``MoE``
        constructor arguments (the full layer is built, initialised as ``MoE`` does, and
        sliced; seed every rank the same). Top-k routing, dropless (no
        ``capacity_factor``), 16-bit expert weights.
    process_group : ProcessGroup or None
        None: the default group (or a single process when torch.distributed is not
        initialized). E must be a multiple of its size.
    mode : {"exact", "capacity"}
        See the module docstring: exact split sizes after one host copy of the counts, or
        fixed per-(source, expert) buffers (no host sync, drops over capacity).
    capacity_factor : float
        Capacity mode: ``C = ceil(T * k * capacity_factor / E)`` rows per (source rank,
        expert) for T tokens on the rank (``MoE.capacity``'s rule); ignored if `capacity`.
    capacity : int or None
        Capacity mode: C directly.
    drop_policy : {"position", "weight"}
        Capacity mode: which assignments an expert's buffer keeps (``permute``).

    Attributes
    ----------
    dropped : ``[]`` int64 buffer: assignments (token, expert) dropped over capacity by this
        rank since construction (or ``dropped.zero_()``), on the device; never synced.
    last_exchange : host dict of the last forward: rows and bytes sent by the dispatch
        (``dispatch_bytes``, rows + float32 weights; ``*_remote``: to other ranks), by the
        combine (``combine_bytes``) and the count exchange (``count_bytes``). The backward
        sends the same amounts in the other direction.
    """

    def __init__(self, layer, process_group=None, *, mode="exact", capacity_factor=1.0,
                 capacity=None, drop_policy="position"):
        super().__init__()
        if isinstance(layer, dict):
            layer = MoE(**layer)
        if not isinstance(layer, MoE):
            raise TypeError(f"layer: expected a MoE or a dict of MoE arguments, got {type(layer).__name__}")
        check_choice(mode, "mode", MODES)
        check_choice(drop_policy, "drop_policy", DROP_POLICIES)
        if layer.routing != "topk":
            raise ValueError("layer: expert parallelism supports top-k routing (not expert_choice)")
        if layer.capacity_factor is not None:
            raise ValueError("layer: expected a dropless layer (capacity_factor=None); the expert-parallel "
                             "capacity is mode='capacity' with its own capacity_factor")
        if isinstance(layer.w13, QuantizedWeight):
            raise ValueError("layer: 4-bit expert weights are not supported by ExpertParallelMoE")
        world, rank = _group_info(process_group)
        num_experts = layer.num_experts
        if num_experts % world:
            raise ValueError(f"num_experts: expected a multiple of the process group's size ({world}), "
                             f"got {num_experts}")
        if capacity is not None:
            capacity = check_int(capacity, "capacity", 0, 2**31 - 1)
        capacity_factor = check_number(capacity_factor, "capacity_factor")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor: expected a positive number, got {capacity_factor}")
        self.process_group, self.mode, self.world_size, self.rank = process_group, mode, world, rank
        self.capacity_factor, self.fixed_capacity, self.drop_policy = capacity_factor, capacity, drop_policy
        self.num_local_experts = num_experts // world
        self.expert_start = rank * self.num_local_experts
        self.expert_end = self.expert_start + self.num_local_experts
        for name in ("hidden_size", "intermediate_size", "num_experts", "k", "gating", "activation", "alpha",
                     "limit", "w_layout", "weight_on_input", "router_dtype", "aux_loss_coef", "z_loss_coef",
                     "shared_intermediate_size"):
            setattr(self, name, getattr(layer, name))
        self.gating = dict(self.gating)
        self.aux_loss = self.z_loss = self.expert_counts = None
        self.last_exchange = None

        def param(t, local=False):
            if t is None:
                return None
            data = t.detach()
            return nn.Parameter(data[self.expert_start:self.expert_end].clone() if local else data.clone(),
                                requires_grad=t.requires_grad)

        self.router_weight = param(layer.router_weight)
        self.router_bias = param(layer.router_bias)
        self.register_buffer("selection_bias", None if layer.selection_bias is None
                             else layer.selection_bias.detach().clone())
        self.w13, self.w2 = param(layer.w13, True), param(layer.w2, True)
        self.b13, self.b2 = param(layer.b13, True), param(layer.b2, True)
        self.shared_w13, self.shared_w2 = param(layer.shared_w13), param(layer.shared_w2)
        self.shared_gate = param(layer.shared_gate)
        self.register_buffer("dropped", torch.zeros((), dtype=torch.int64, device=layer.router_weight.device))

    @classmethod
    def from_moe(cls, layer, process_group=None, **kwargs):
        """This rank's shard of the single-process `layer` (same as the constructor)."""
        return cls(layer, process_group, **kwargs)

    def capacity(self, num_tokens):
        """Rows per (source rank, expert) in capacity mode for `num_tokens` tokens on a rank
        (None in exact mode): `capacity`, or ``ceil(T * k * capacity_factor / E)`` in
        integer arithmetic."""
        if self.mode == "exact":
            return None
        if self.fixed_capacity is not None:
            return self.fixed_capacity
        return capacity_from_factor(num_tokens, self.k, self.num_experts, self.capacity_factor)

    router_logits = MoE.router_logits

    def forward(self, x):
        """``[..., H]`` -> ``[..., H]``: this rank's tokens through the sharded layer. Every
        rank of the group calls it (collectives), with any number of tokens in exact mode
        and the same capacity in capacity mode (the same T, or a fixed ``capacity``); for a
        backward, x.requires_grad must be the same on every rank."""
        if x.dtype != self.w13.dtype or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected [..., {self.hidden_size}] in {self.w13.dtype}, got shape "
                             f"{tuple(x.shape)} in {x.dtype}")
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        tokens = x.shape[0]
        with _phase("route"):
            logits = self.router_logits(x)
            weights, ids = topk_gating(logits, self.k, bias=self.selection_bias, **self.gating)
        capacity = self.capacity(tokens)
        rows, row_weights, recv_counts, handle, stats = dispatch(
            x, ids, weights, self.num_experts, group=self.process_group, capacity=capacity,
            drop_policy=self.drop_policy)
        if capacity is not None:
            with torch.no_grad():
                self.dropped.add_(stats.pop("dropped"))
        with _phase("local_plan"):
            local_row_map, offsets, gather, local_weights = local_plan(
                recv_counts, row_weights, capacity, rows.shape[0])
        y_rows = _expert_rows(rows, gather, offsets, local_weights, self.w13, self.w2, self.b13, self.b2,
                              self.activation, self.alpha, self.limit, self.w_layout, self.weight_on_input)
        with _phase("combine"):
            y_rows = unpermute(y_rows, local_row_map)  # back to the received order (one row each)
        y = combine(y_rows, handle, self.process_group)
        row_bytes = self.hidden_size * y_rows.element_size()
        recv_splits = handle[2]
        own = y_rows.shape[0] // self.world_size if recv_splits is None else recv_splits[self.rank]
        stats.update(combine_bytes=y_rows.shape[0] * row_bytes,
                     combine_bytes_remote=(y_rows.shape[0] - own) * row_bytes)
        self.last_exchange = stats
        if self.shared_w13 is not None:
            with _phase("shared"):
                y = y + _shared_expert(x, self.shared_w13, self.shared_w2, self.activation, self.shared_gate,
                                       self.alpha, self.limit)
        record_router_statistics(self, logits, ids)
        return y.reshape(shape)

    @torch.no_grad()
    def update_selection_bias(self, rate=1e-3, counts=None):
        """``MoE.update_selection_bias`` with the counts summed over the group (an
        all-reduce on the device, no host sync), so every replica of the bias stays equal."""
        if self.selection_bias is None:
            raise ValueError("selection_bias: this layer has none")
        counts = self.expert_counts if counts is None else counts
        if counts is None:
            raise ValueError("counts: no training forward has recorded expert counts yet; pass counts")
        counts = counts.clone()
        if self.world_size > 1:
            dist.all_reduce(counts, group=self.process_group)
        return update_routing_bias(self.selection_bias, counts, rate)

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, local_experts=[{self.expert_start}, {self.expert_end}), "
                f"k={self.k}, mode={self.mode!r}, world_size={self.world_size}")
