"""Reference grouped expert GEMM: one matmul per expert in float32, the epilogue written out
in PyTorch. Differentiable by autograd (the tests take its gradients as the oracle)."""

import math

import torch

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "silu_and_mul", "gelu_and_mul",
               "gelu_tanh_and_mul", "swiglu_oai")
GATED = ("silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "swiglu_oai")


def _act(name, v):
    if name == "relu":
        return torch.relu(v)
    if name in ("gelu", "gelu_and_mul"):
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    if name in ("gelu_tanh", "gelu_tanh_and_mul"):
        return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    if name in ("silu", "silu_and_mul"):
        return v * torch.sigmoid(v)
    return v


def epilogue(h, activation, alpha, limit):
    """The activation on the fp32 product + bias h [..., N]; gated ones return [..., N/2]."""
    if activation == "swiglu_oai":
        gate = h[..., 0::2].clamp(max=limit)
        up = h[..., 1::2].clamp(min=-limit, max=limit)
        return (up + 1.0) * gate * torch.sigmoid(alpha * gate)
    if activation in GATED:
        half = h.shape[-1] // 2
        return _act(activation, h[..., :half]) * h[..., half:]
    return _act(activation, h)


def expert_row_ranges(num_experts, m, offsets=None, counts=None, rows_per_expert=0):
    """[(begin, count)] per expert, as the kernels clamp them (reads the boundaries on the host)."""
    ranges = []
    for e in range(num_experts):
        if offsets is not None:
            begin = min(max(int(offsets[e]), 0), m)
            end = min(max(int(offsets[e + 1]), begin), m)
            ranges.append((begin, end - begin))
        else:
            ranges.append((e * rows_per_expert, min(max(int(counts[e]), 0), rows_per_expert)))
    return ranges


def grouped_gemm(x, w, offsets=None, *, counts=None, gather=None, w_layout="nk", bias=None,
                 activation=None, alpha=1.702, limit=7.0, row_scale=None):
    """See moe_kernels.grouped_gemm. Computes in float32, returns x's dtype."""
    num_experts = w.shape[0]
    w_nk = w if w_layout == "nk" else w.transpose(1, 2)
    n = w_nk.shape[1]
    n_out = n // 2 if activation in GATED else n
    masked = counts is not None
    if masked:
        s = x.shape[1]
        rows = x.reshape(-1, x.shape[-1])
        m = num_experts * s
    else:
        s = 0
        if gather is not None:
            # -1 (or any index outside x) reads a zero row.
            valid = (gather >= 0) & (gather < x.shape[0])
            padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
            rows = padded[torch.where(valid, gather.long(), x.shape[0])]
        else:
            rows = x
        m = rows.shape[0]
    # Rows no expert covers stay zero; slice assignment keeps the graph for autograd.
    result = torch.zeros((m, n_out), dtype=torch.float32, device=x.device)
    for e, (begin, count) in enumerate(expert_row_ranges(num_experts, m, offsets, counts, s)):
        h = rows[begin:begin + count].float() @ w_nk[e].float().t()
        if bias is not None:
            h = h + bias[e].float()
        out = epilogue(h, activation, alpha, limit)
        if row_scale is not None:
            out = out * row_scale[begin:begin + count, None].float()
        result[begin:begin + count] = out
    result = result.to(x.dtype)
    return result.reshape(num_experts, s, n_out) if masked else result
