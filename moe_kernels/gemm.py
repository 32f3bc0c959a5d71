"""Grouped expert GEMM: every expert's matmul in one launch, on tensor cores, with the
expert boundaries read on the device and the activation fused into the epilogue."""

import collections

import torch

from . import reference
from .reference.gemm import ACTIVATIONS, GATED as GATED_ACTIVATIONS
from ._backend import native_module, selected_backend
from ._checks import check_choice, check_number, check_same_device, check_tensor
from ._library import absent, native_call, register_op
from ._limits import MAX_EXPERTS
from .quant import ops as quant_ops
from .quant.weight import QuantizedWeight

# Codes of the kernels' Activation enum (csrc/kernels/gemm/gemm.h).
_ACTIVATION_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}
# The built tile configurations ("<tile_m>x<tile_n>"), in the order of the GemmTile enum.
TILE_CONFIGS = ("128x128", "64x64", "16x64")
W_LAYOUTS = ("nk", "kn")
MMA_DTYPES = (torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)

GemmConfig = collections.namedtuple(
    "GemmConfig", ["variant", "tile_m", "tile_n", "tile_k", "warps", "stages", "split_k", "grid", "name"])


def _gemm_config(raw):
    return GemmConfig(raw["variant"], raw["tile_m"], raw["tile_n"], raw["tile_k"], raw["warps"],
                      raw["stages"], raw["split_k"], raw["grid"], TILE_CONFIGS[raw["tile"]])


def _check_activation(activation):
    if activation is not None:
        check_choice(activation, "activation", ACTIVATIONS[1:])
    return activation


def _forced_tile(config):
    if config is None:
        return -1
    return TILE_CONFIGS.index(check_choice(config, "config", TILE_CONFIGS))


def gemm_config(m, n, k, num_experts, *, w_layout="nk", activation=None, rows_per_expert=None,
                arch=None, num_sms=None, config=None, quantized=False):
    """The tile configuration ``grouped_gemm`` launches for a problem (its heuristic, in C++).

    Parameters
    ----------
    m, n, k, num_experts : int
        Rows of y (contiguous layout; ``E * S`` for masked), columns of the product (before
        a gated activation halves them), reduction size, experts.
    rows_per_expert : int or None
        S of the masked layout (None: contiguous).
    arch : int or None
        Compute capability * 10 (80, 89, 90, 100, 120); None: the current GPU's, else 90.
    num_sms : int or None
        Multiprocessors; None: the current GPU's, else 132 (an H100 SXM).
    config : str or None
        A forced configuration (one of ``TILE_CONFIGS``), as ``grouped_gemm(config=...)``.
    quantized : bool
        For 4-bit weights (a ``QuantizedWeight``): the same tiles, each 64 deep.

    Returns
    -------
    GemmConfig (named tuple): variant ("prefill" or "decode"), tile_m, tile_n, tile_k, warps,
    stages, split_k (always 1: the reduction is never split, so sums are deterministic),
    grid (0 here: the persistent grid is sized at launch), name.
    """
    check_choice(w_layout, "w_layout", W_LAYOUTS)
    _check_activation(activation)
    if arch is None or num_sms is None:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            arch = arch if arch is not None else props.major * 10 + props.minor
            num_sms = num_sms if num_sms is not None else props.multi_processor_count
        arch = 90 if arch is None else arch
        num_sms = 132 if num_sms is None else num_sms
    module = native_module("cuda" if "cuda" in _native_names() else "simt")
    return _gemm_config(module.gemm_config(
        int(arch), int(num_sms), int(m), int(n), int(k), int(num_experts), rows_per_expert is not None,
        int(rows_per_expert or 0), _ACTIVATION_CODE[activation], w_layout == "kn", bool(quantized),
        _forced_tile(config)))


def _native_names():
    from ._backend import available_backends
    return available_backends()


def _aligned(t):
    """t as a contiguous tensor whose data starts 16-byte aligned (the kernels copy rows 16
    bytes at a time): a copy only when it is not already."""
    t = t.contiguous()
    if torch.compiler.is_compiling():
        return t  # a traced graph has no data pointers; the adapter still checks alignment
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check_index_tensor(t, name, size, ref, ref_name):
    check_tensor(t, name, dtypes=INDEX_DTYPES, dim=1, contiguous=False)
    check_same_device(t, name, ref, ref_name)
    if t.shape[0] != size:
        raise ValueError(f"{name}: expected {size} entries, got shape {tuple(t.shape)}")
    return t.contiguous()


def _weight_shape(x, w, w_layout):
    """(E, N, K) of the weight operand, checked: a 16-bit tensor or a QuantizedWeight."""
    check_tensor(x, "x", dtypes=MMA_DTYPES, contiguous=False)
    check_choice(w_layout, "w_layout", W_LAYOUTS)
    if isinstance(w, QuantizedWeight):
        if w_layout != "nk":
            raise ValueError("w_layout: a QuantizedWeight is [E, N, K] (w_layout='nk')")
        if w.device != x.device:
            raise ValueError(f"w: expected the device of x ({x.device}), got {w.device}")
        num_experts, n, k = (1, *w.shape) if w.num_experts is None else w.shape
        if n % 8:
            raise ValueError(f"w: expected N a multiple of 8, got shape {w.shape}")
    else:
        check_tensor(w, "w", dtypes=MMA_DTYPES, dim=3, contiguous=False)
        check_same_device(w, "w", x, "x")
        if w.dtype != x.dtype:
            raise TypeError(f"w: expected the dtype of x ({str(x.dtype).replace('torch.', '')}), got "
                            f"{str(w.dtype).replace('torch.', '')}")
        num_experts = w.shape[0]
        n, k = (w.shape[1], w.shape[2]) if w_layout == "nk" else (w.shape[2], w.shape[1])
        if n % 8 or k % 8 or n == 0 or k == 0:
            raise ValueError(f"w: expected N and K positive multiples of 8 (16-byte rows), got N={n}, K={k} "
                             f"(w_layout={w_layout!r}, shape {tuple(w.shape)})")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"w: expected 1 to {MAX_EXPERTS} experts, got shape {tuple(w.shape)}")
    return num_experts, n, k


def _check_args(x, w, offsets, counts, gather, w_layout, bias, activation, alpha, limit, row_scale):
    num_experts, n, k = _weight_shape(x, w, w_layout)
    _check_activation(activation)
    alpha = check_number(alpha, "alpha")
    limit = check_number(limit, "limit")
    if (offsets is None) == (counts is None):
        raise ValueError("offsets: expected exactly one of offsets (contiguous layout) and counts "
                         "(masked layout)")
    masked = counts is not None
    if masked:
        if x.dim() != 3 or x.shape[0] != num_experts or x.shape[2] != k:
            raise ValueError(f"x: expected [{num_experts}, S, {k}] for the masked layout (counts given), "
                             f"got shape {tuple(x.shape)}")
        if gather is not None:
            raise ValueError("gather: applies to the contiguous layout only (not with counts)")
        m = x.shape[0] * x.shape[1]
        counts = _check_index_tensor(counts, "counts", num_experts, x, "x")
    else:
        if x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"x: expected [rows, {k}] (K of w), got shape {tuple(x.shape)}")
        if gather is not None:
            m = gather.shape[0] if isinstance(gather, torch.Tensor) and gather.dim() == 1 else -1
            gather = _check_index_tensor(gather, "gather", m, x, "x")
        else:
            m = x.shape[0]
        check_tensor(offsets, "offsets", dtypes=INDEX_DTYPES, dim=1, contiguous=False)
        check_same_device(offsets, "offsets", x, "x")
        if offsets.shape[0] != num_experts + 1:
            raise ValueError(f"offsets: expected {num_experts + 1} entries (num_experts + 1), got shape "
                             f"{tuple(offsets.shape)}")
        offsets = offsets.to(torch.int64).contiguous()
    if m >= 1 << 31:
        raise ValueError(f"x: expected fewer than 2^31 rows, got {m}")
    if bias is not None:
        check_tensor(bias, "bias", dtypes=(torch.float32, torch.float16, torch.bfloat16), dim=2,
                     contiguous=False)
        check_same_device(bias, "bias", x, "x")
        if tuple(bias.shape) != (num_experts, n):
            raise ValueError(f"bias: expected shape ({num_experts}, {n}), got {tuple(bias.shape)}")
    if row_scale is not None:
        check_tensor(row_scale, "row_scale", dtypes=(torch.float32, torch.float16, torch.bfloat16), dim=1,
                     contiguous=False)
        check_same_device(row_scale, "row_scale", x, "x")
        if row_scale.shape[0] != m:
            raise ValueError(f"row_scale: expected {m} entries (rows of y), got shape {tuple(row_scale.shape)}")
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_boundaries_on_cpu(x, offsets, counts, gather, m)
    return offsets, counts, gather, alpha, limit, n, k


def _check_boundaries_on_cpu(x, offsets, counts, gather, m):
    """Values the kernels would clamp are errors on the CPU (reading them on a GPU would be a
    host sync)."""
    if offsets is not None and offsets.numel():
        if int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) > m:
            raise ValueError(f"offsets: expected 0 = offsets[0] <= offsets[1] <= ... <= offsets[E] <= {m} "
                             f"(rows), got {offsets.tolist()}")
    if counts is not None and counts.numel():
        if int(counts.min()) < 0 or int(counts.max()) > x.shape[1]:
            raise ValueError(f"counts: expected 0 <= counts[e] <= S = {x.shape[1]}, got {counts.tolist()}")
    if gather is not None and gather.numel():
        low, high = int(gather.min()), int(gather.max())
        if low < -1 or high >= x.shape[0]:
            raise ValueError(f"gather: expected row indices of x in [0, {x.shape[0]}) or -1, got values in "
                             f"[{low}, {high}]")


def _fake_grouped_gemm(backend, x, w, offsets, counts, gather, w_kn, bias, activation, alpha, limit,
                       row_scale, save_pre, forced_tile):
    n = w.shape[2] if w_kn else w.shape[1]
    n_out = n // 2 if ACTIVATIONS[activation] in GATED_ACTIVATIONS else n
    rows = x.shape[:-1] if counts is not None else ((gather.shape[0] if gather is not None else x.shape[0]),)
    return x.new_empty((*rows, n_out)), x.new_empty((*rows, n), dtype=torch.float32) if save_pre else absent(x)


register_op("grouped_gemm",
            "(str backend, Tensor x, Tensor w, Tensor? offsets, Tensor? counts, Tensor? gather, bool w_kn, "
            "Tensor? bias, int activation, float alpha, float limit, Tensor? row_scale, bool save_pre, "
            "int forced_tile) -> (Tensor, Tensor)", _fake_grouped_gemm)


def _fake_wgrad(backend, p, p_gather, q, q_gather, num_experts, offsets, counts, rows_per_expert, m):
    return p.new_empty((num_experts, p.shape[1], q.shape[1]))


def _fake_grouped_gemm_q4(backend, x, codes, scales, zeros, format, group_size, offsets, counts, gather, bias,
                          activation, alpha, limit, row_scale, save_pre, forced_tile):
    w_shape = codes.new_empty((codes.shape[0], codes.shape[1], 2 * codes.shape[2]))
    return _fake_grouped_gemm(backend, x, w_shape, offsets, counts, gather, False, bias, activation, alpha,
                              limit, row_scale, save_pre, forced_tile)


register_op("grouped_gemm_q4",
            "(str backend, Tensor x, Tensor codes, Tensor scales, Tensor? zeros, int format, int group_size, "
            "Tensor? offsets, Tensor? counts, Tensor? gather, Tensor? bias, int activation, float alpha, "
            "float limit, Tensor? row_scale, bool save_pre, int forced_tile) -> (Tensor, Tensor)",
            _fake_grouped_gemm_q4)


register_op("grouped_gemm_wgrad",
            "(str backend, Tensor p, Tensor? p_gather, Tensor q, Tensor? q_gather, int num_experts, "
            "Tensor? offsets, Tensor? counts, int rows_per_expert, int m) -> Tensor", _fake_wgrad)


def _fake_activation_backward(backend, grad_y, pre, n, activation, alpha, limit, row_scale,
                              need_grad_row_scale):
    grad_row_scale = (grad_y.new_empty((grad_y.shape[0],), dtype=torch.float32) if need_grad_row_scale
                      else absent(grad_y))
    return grad_y.new_empty((grad_y.shape[0], n)), grad_row_scale


register_op("gemm_activation_backward",
            "(str backend, Tensor grad_y, Tensor? pre, int n, int activation, float alpha, float limit, "
            "Tensor? row_scale, bool need_grad_row_scale) -> (Tensor, Tensor)", _fake_activation_backward)


def _fake_column_sum(backend, inp, num_experts, offsets, counts, rows_per_expert):
    return inp.new_empty((num_experts, inp.shape[1]), dtype=torch.float32)


register_op("grouped_column_sum",
            "(str backend, Tensor inp, int num_experts, Tensor? offsets, Tensor? counts, int rows_per_expert) "
            "-> Tensor", _fake_column_sum)


def _fake_segment_row_sum(backend, inp, rows, row_start):
    return inp.new_empty((row_start.shape[0] - 1, inp.shape[1]))


register_op("segment_row_sum", "(str backend, Tensor inp, Tensor rows, Tensor row_start) -> Tensor",
            _fake_segment_row_sum)


def _gather_segments(gather, num_tokens):
    """(rows, row_start) for segment_row_sum: the rows of each token in increasing order (a
    stable sort of gather; -1 and out-of-range entries sort last and are never read). Device
    ops only: no host sync."""
    key = torch.where((gather >= 0) & (gather < num_tokens), gather.long(), num_tokens)
    sorted_key, rows = torch.sort(key, stable=True)
    row_start = torch.searchsorted(sorted_key, torch.arange(num_tokens + 1, device=gather.device))
    return rows.contiguous(), row_start.contiguous()


class _GroupedGemmFunction(torch.autograd.Function):
    """Forward and backward through the kernels. The backward needs the pre-activation (the
    product + bias) for the activation's gradient and for d row_scale: the forward saves it
    (one [M, N] float32 tensor) rather than recomputing it, which would cost a second forward
    GEMM. float32, not x's dtype: the gradient of a clamp (swiglu_oai) or relu is decided on
    the values the forward's activation saw, and rounding them would move some across the
    bounds."""

    @staticmethod
    def forward(ctx, x, w, bias, row_scale, offsets, counts, gather, w_kn, activation, alpha, limit,
                forced_tile, backend, grad_enabled, quantized=None):
        # quantized: a 4-bit weight's (scales, zeros, format code, group size), w its codes;
        # the backward dequantizes it for dx (the weight itself gets no gradient).
        code = _ACTIVATION_CODE[activation]
        # Grad mode is off inside forward: the caller passes whether it was on, and
        # needs_input_grad tells what the backward needs (under torch.no_grad it still reports
        # the parameters' requires_grad, and saving the pre-activation there would cost an
        # [M, N] float32 write in every inference call).
        training = grad_enabled and any(ctx.needs_input_grad[:4])
        save_pre = training and (activation is not None or ctx.needs_input_grad[3])
        bias32 = None if bias is None else bias.float().contiguous()
        scale32 = None if row_scale is None else row_scale.float().contiguous()
        if quantized is None:
            y, pre = native_call(backend, "grouped_gemm", x, w, offsets, counts, gather, w_kn, bias32, code,
                                 alpha, limit, scale32, save_pre, forced_tile)
        else:
            y, pre = native_call(backend, "grouped_gemm_q4", x, w, *quantized, offsets, counts, gather, bias32,
                                 code, alpha, limit, scale32, save_pre, forced_tile)
        ctx.quantized = quantized
        ctx.backend, ctx.w_kn, ctx.code, ctx.alpha, ctx.limit = backend, w_kn, code, alpha, limit
        ctx.forced_tile = forced_tile
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.scale_dtype = None if row_scale is None else row_scale.dtype
        ctx.save_for_backward(x, w, scale32, offsets, counts, gather, pre)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w, row_scale, offsets, counts, gather, pre = ctx.saved_tensors
        backend = ctx.backend
        if ctx.quantized is not None:
            w = native_call(backend, "dequantize", w, *ctx.quantized, x.dtype)
        need_x, need_w, need_bias, need_scale = ctx.needs_input_grad[:4]
        num_experts = w.shape[0]
        n = w.shape[2] if ctx.w_kn else w.shape[1]
        masked = counts is not None
        s = x.shape[1] if masked else 0
        rows = grad_y.shape[0] * (grad_y.shape[1] if masked else 1)
        gy = grad_y.to(x.dtype).contiguous().reshape(rows, grad_y.shape[-1])
        pre2 = None if pre is None else pre.reshape(rows, n)
        grad_scale = None
        if ctx.code == 0 and row_scale is None:
            grad_pre = gy
        else:
            grad_pre, grad_scale = native_call(backend, "gemm_activation_backward", gy, pre2, n, ctx.code,
                                               ctx.alpha, ctx.limit, row_scale, bool(need_scale))
        grad_x = grad_w = grad_bias = None
        if need_x:
            # dx = grad_pre . w: the same kernel with the other weight layout (no transpose).
            lhs = grad_pre.reshape(num_experts, s, n) if masked else grad_pre
            grad_rows, _ = native_call(backend, "grouped_gemm", lhs, w, offsets, counts, None, not ctx.w_kn,
                                       None, 0, 1.0, 0.0, None, False, -1)
            if gather is not None:
                segment_rows, row_start = _gather_segments(gather, x.shape[0])
                grad_x = native_call(backend, "segment_row_sum", grad_rows, segment_rows, row_start)
            else:
                grad_x = grad_rows
        if need_w:
            x2 = x.reshape(-1, x.shape[-1])
            if ctx.w_kn:  # [E, K, N]: x_e^T grad_pre_e
                grad_w = native_call(backend, "grouped_gemm_wgrad", x2, gather, grad_pre, None, num_experts,
                                     offsets, counts, s, rows)
            else:  # [E, N, K]: grad_pre_e^T x_e
                grad_w = native_call(backend, "grouped_gemm_wgrad", grad_pre, None, x2, gather, num_experts,
                                     offsets, counts, s, rows)
        if need_bias:
            grad_bias = native_call(backend, "grouped_column_sum", grad_pre, num_experts, offsets, counts,
                                    s).to(ctx.bias_dtype)
        if need_scale:
            grad_scale = grad_scale.to(ctx.scale_dtype)
        return (grad_x, grad_w, grad_bias, grad_scale if need_scale else None,
                None, None, None, None, None, None, None, None, None, None, None)


def grouped_gemm(x, w, offsets=None, *, counts=None, gather=None, w_layout="nk", bias=None,
                 activation=None, alpha=1.702, limit=7.0, row_scale=None, config=None):
    """Every expert's matmul in one launch: ``y[rows of e] = epilogue(x_rows(e) @ w[e]^T)``.

    Parameters
    ----------
    x : torch.Tensor
        bfloat16 or float16. Contiguous layout: ``[rows, K]``; masked layout (with
        `counts`): ``[E, S, K]``. Non-contiguous or not 16-byte aligned: copied first.
    w : torch.Tensor or QuantizedWeight
        ``[E, N, K]`` (``w_layout="nk"``, nn.Linear's out x in) or ``[E, K, N]``
        (``"kn"``), x's dtype; N and K multiples of 8. Read in place in either layout.
        Or 4-bit weights (``moe_kernels.quant.QuantizedWeight``, ``[E, N, K]`` or one
        ``[N, K]`` expert; N a multiple of 8): W4A16, the codes dequantized in registers
        inside the tensor-core loop, each value rounded to x's dtype as ``dequantize``
        rounds it, so y is ``grouped_gemm(x, dequantize(w, x.dtype))`` up to fp32
        summation order (the kernels sum in the same order: equal bit for bit). Needs K a
        multiple of 32; a per-channel weight with another K is dequantized first (one
        [E, N, K] temporary). Act-order weights (``perm``) permute x's columns first (one
        gather of the activations, per row's expert). The weight gets no gradient; x,
        bias and row_scale do (the backward dequantizes it once).
    offsets : torch.Tensor or None
        Contiguous layout: ``[E + 1]`` int64 (int32 is converted), rows
        ``[offsets[e], offsets[e+1])`` of y belong to expert e; never read by the host on a
        GPU (on the CPU they are checked: ``0 = offsets[0] <= ... <= offsets[E] <= rows``).
        On a GPU out-of-order values are clamped into range, never read out of bounds.
    counts : torch.Tensor or None
        Masked layout (instead of offsets): ``[E]`` int32/int64; only the first ``counts[e]``
        rows of expert e are computed (clamped to S on a GPU); y's other rows are zero and
        cost no tensor-core work.
    gather : torch.Tensor or None
        Contiguous layout only: ``[M]`` int32/int64; row i of the product reads
        ``x[gather[i]]`` (x is then the token-ordered ``[T, K]``), -1 a zero row (as
        ``permute_plan`` returns it). M = rows of y.
    w_layout : {"nk", "kn"}
    bias : torch.Tensor or None
        ``[E, N]``, added to the product (converted to float32; the gradient comes back in
        bias's dtype).
    activation : None or str
        None, "relu", "gelu", "gelu_tanh", "silu" (y ``[M, N]``) or gated (y ``[M, N/2]``):
        "silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul" (gate = first half of N, up =
        second half), "swiglu_oai"
        (GPT-OSS: gate/up interleaved, ``(clamp(up, -limit, limit) + 1) * g *
        sigmoid(alpha * g)``, ``g = min(gate, limit)``).
    alpha, limit : float
        swiglu_oai's constants.
    row_scale : torch.Tensor or None
        ``[M]`` (float32; other float dtypes converted), multiplies each output row after the
        activation (the routing weights in the second GEMM of a layer).
    config : str or None
        Force a tile configuration (``TILE_CONFIGS``) instead of the heuristic's
        (``gemm_config`` shows the choice).

    Returns
    -------
    y : torch.Tensor
        ``[M, N or N/2]`` (masked: ``[E, S, N or N/2]``) in x's dtype; rows no expert covers
        (at or past ``offsets[E]``, past ``counts[e]``) are zero. fp32 accumulation.

    Notes
    -----
    No host synchronization on a GPU; deterministic bit for bit, forward and backward (no
    float atomics anywhere). Differentiable in x, w, bias and row_scale on every backend.
    """
    offsets, counts, gather, alpha, limit, n, k = _check_args(
        x, w, offsets, counts, gather, w_layout, bias, activation, alpha, limit, row_scale)
    forced = _forced_tile(config)  # checked on every backend; the reference has no tiles
    backend = selected_backend(x, "x")
    if isinstance(w, QuantizedWeight):
        if backend != "reference" and k % 32 == 0:
            return _grouped_gemm_q4(x, w, offsets, counts, gather, bias, activation, alpha, limit, row_scale,
                                    forced, backend)
        w = quant_ops.dequantize(w, x.dtype)  # the definition (reference), or K not a multiple of 32
        w = w if w.dim() == 3 else w.unsqueeze(0)
    if backend == "reference":
        return reference.grouped_gemm(x, w, offsets, counts=counts, gather=gather, w_layout=w_layout,
                                           bias=bias, activation=activation, alpha=alpha, limit=limit,
                                           row_scale=row_scale)
    if row_scale is not None:
        row_scale = row_scale.contiguous()
    return _GroupedGemmFunction.apply(_aligned(x), _aligned(w), bias, row_scale, offsets, counts, gather,
                                      w_layout == "kn", activation, alpha, limit, forced, backend,
                                      torch.is_grad_enabled())


def _act_order_columns(x, perm, offsets, counts, gather):
    """x with each row's columns in its expert's act-order (stored) order: row i of the
    product reads x_rows[i, perm[e(i)]]. Returns (x, gather) for the kernel: rows already
    gathered (gather keeps only its -1 entries). Device ops, no host sync; costs one
    [M, K] copy of the activations and its index."""
    perm = perm.long()
    if perm.dim() == 1:
        return x.index_select(-1, perm), gather
    if counts is not None:  # masked [E, S, K]
        return torch.gather(x, 2, perm.unsqueeze(1).expand_as(x)), None
    m = x.shape[0] if gather is None else gather.shape[0]
    rows = torch.arange(m, device=x.device)
    expert = torch.searchsorted(offsets[1:], rows, right=True).clamp(max=perm.shape[0] - 1)
    if gather is not None:
        valid = (gather >= 0) & (gather < x.shape[0])
        x = x.index_select(0, torch.where(valid, gather.long(), 0))
        gather = torch.where(valid, rows, -1)
    return torch.gather(x, 1, perm.index_select(0, expert)), gather


def _grouped_gemm_q4(x, qw, offsets, counts, gather, bias, activation, alpha, limit, row_scale, forced, backend):
    if qw.perm is not None:
        x, gather = _act_order_columns(x, qw.perm, offsets, counts, gather)
    codes, scales, zeros, format_code, group_size = quant_ops.kernel_operands(qw)
    if row_scale is not None:
        row_scale = row_scale.contiguous()
    return _GroupedGemmFunction.apply(_aligned(x), codes, bias, row_scale, offsets, counts, gather, False,
                                      activation, alpha, limit, forced, backend, torch.is_grad_enabled(),
                                      (scales, zeros, format_code, group_size))
