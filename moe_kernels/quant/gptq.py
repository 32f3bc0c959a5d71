"""GPTQ checkpoints (AutoGPTQ / GPTQModel "gptq" format, 4 bits) to and from QuantizedWeight.

Tensors of one linear layer (a leading expert dimension E is allowed on each):

- ``qweight``: int32 ``[K/8, N]``, packed along K: element k = 8r + i of output column n
  sits at bits 4i..4i+3 of ``qweight[r, n]`` (the int32 read as its unsigned bit pattern),
  in *logical* K order even for act-order checkpoints.
- ``qzeros``: int32 ``[K/g, N/8]``, packed along N: the zero point of column 8c + i at bits
  4i of ``qzeros[group, c]``, stored minus one: effective zero = stored + 1 (1..16). GPTQ's
  symmetric checkpoints store 7 everywhere (zero 8).
- ``scales``: float16 (or bfloat16) ``[K/g, N]``.
- ``g_idx``: int32/int64 ``[K]``, the group of each logical input column: arange(K) // g,
  or any order with g members per group for act-order (desc_act) checkpoints.

An element dequantizes to ``(q - (stored_zero + 1)) * scale[g_idx[k], n]``. Verified against
AutoGPTQ's ``QuantLinear.pack`` / forward (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py:
``qweight[row] |= intweight[j] << (bits * (j - i))``, ``zeros -= 1`` before packing qzeros
the same way along N, ``zeros + 1`` when unpacking).

Act-order: QuantizedWeight stores each group contiguously, so the importer sorts the
columns by group (perm = stable argsort of g_idx) and the exporter writes them back in
logical order with g_idx[perm[j]] = j // g. Checkpoints that store zeros without the minus
one ("gptq_v2") are not this format.
"""

import torch

from .._checks import check_bool, check_tensor
from ..reference import quant as _ref
from ._int32 import check_int4, check_packed, check_shape, nibbles_to_words, words_to_nibbles
from .weight import INT4_SCALE_DTYPES, QuantizedWeight, check_group_size

INDEX_DTYPES = (torch.int32, torch.int64)


def _act_order_perm(g_idx, lead, k, group_size, groups):
    """perm [*lead, K] int32 sorting the columns by group, or None when g_idx is the plain
    arange(K) // group_size."""
    check_tensor(g_idx, "g_idx", dtypes=INDEX_DTYPES, contiguous=False)
    check_shape(g_idx, "g_idx", (*lead, k), "the group of each input column K")
    g_idx = g_idx.long()
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx: expected group indices 0..{groups - 1}, got values "
                         f"{int(g_idx.min())}..{int(g_idx.max())}")
    span = k // groups
    plain = torch.arange(k, device=g_idx.device) // span
    if bool((g_idx == plain).all()):
        return None
    counts = torch.nn.functional.one_hot(g_idx, groups).sum(-2)  # [*lead, G]
    if not bool((counts == span).all()):
        raise ValueError(f"g_idx: every group must have exactly {span} columns (group_size), got "
                         f"group sizes {sorted(set(counts.reshape(-1).tolist()))}")
    return torch.sort(g_idx, dim=-1, stable=True).indices.to(torch.int32)


def from_gptq(qweight, qzeros, scales, g_idx=None, *, group_size, sym=True):
    """A QuantizedWeight (int4) from GPTQ tensors (see the module docstring for the layout).

    Parameters
    ----------
    qweight : torch.Tensor int32 [K/8, N] or [E, K/8, N]
    qzeros : torch.Tensor int32 [G, N/8] or [E, G, N/8], or None when sym
    scales : torch.Tensor float16/bfloat16 [G, N] or [E, G, N]
    g_idx : torch.Tensor int32/int64 [K] or [E, K], or None (plain group order)
    group_size : int
        -1 (per-channel: G = 1) or a positive multiple of 32 dividing K.
    sym : bool
        True: every zero must be 8 and the result has zeros=None.
    """
    check_packed(qweight, "qweight")
    lead = tuple(qweight.shape[:-2])
    k, n = 8 * qweight.shape[-2], qweight.shape[-1]
    if n % 8:
        raise ValueError(f"qweight: expected N a multiple of 8 (qzeros packs 8 columns per int32), "
                         f"got N={n} (shape {tuple(qweight.shape)})")
    group_size, groups = check_group_size(group_size, k)
    sym = check_bool(sym, "sym")
    check_tensor(scales, "scales", dtypes=INT4_SCALE_DTYPES, contiguous=False)
    check_shape(scales, "scales", (*lead, groups, n), f"[G, N], {groups} groups for K={k}")

    zeros = None
    if qzeros is None:
        if not sym:
            raise ValueError("qzeros: required when sym=False")
    else:
        check_tensor(qzeros, "qzeros", dtypes=(torch.int32,), contiguous=False)
        check_shape(qzeros, "qzeros", (*lead, groups, n // 8), "[G, N/8]")
        zeros = words_to_nibbles(qzeros) + 1  # stored zero - 1
        if sym:
            if not bool((zeros == 8).all()):
                raise ValueError("qzeros: sym=True expects every zero point 8 (stored 7); this "
                                 "checkpoint is asymmetric (pass sym=False)")
            zeros = None

    codes = words_to_nibbles(qweight.transpose(-1, -2))  # [*lead, N, K], logical order
    perm = None if g_idx is None else _act_order_perm(g_idx, lead, k, group_size, groups)
    if perm is not None:
        codes = codes.gather(-1, perm.long().unsqueeze(-2).expand(codes.shape))
    return QuantizedWeight("int4", _ref.pack_codes(codes), scales.contiguous().clone(), zeros,
                           group_size=group_size, perm=perm)


def to_gptq(qw):
    """GPTQ tensors of an int4 QuantizedWeight: dict(qweight, qzeros, scales, g_idx,
    group_size, sym), so that ``from_gptq(**to_gptq(qw))`` rebuilds it.

    g_idx is always returned (arange(K) // group_size without perm). Zeros None are written
    as stored 7 with sym=True. A zero point 0 cannot be stored (stored - 1 = -1): ValueError.
    """
    check_int4(qw, perm_ok=True, n_multiple=8, k_multiple=8, fmt="GPTQ")
    if qw.zeros is not None and bool((qw.zeros == 0).any()):
        raise ValueError("qw: GPTQ stores zero points minus one and cannot store a zero point of 0")
    lead, k = qw.shape[:-2], qw.in_features
    span = k // qw.num_groups
    codes = _ref.unpack_codes(qw.codes)
    groups_of = (torch.arange(k, device=qw.device) // span).to(torch.int32)
    if qw.perm is None:
        g_idx = groups_of.expand(*lead, k).contiguous()
    else:
        index = qw.perm.long()
        codes = torch.empty_like(codes).scatter_(-1, index.unsqueeze(-2).expand(codes.shape), codes)
        g_idx = torch.empty_like(qw.perm).scatter_(-1, index, groups_of.expand(*lead, k).contiguous())
    zeros = torch.full_like(qw.scales, 8, dtype=torch.uint8) if qw.zeros is None else qw.zeros
    return {
        "qweight": nibbles_to_words(codes).transpose(-1, -2).contiguous(),
        "qzeros": nibbles_to_words(zeros - 1),
        "scales": qw.scales.clone(),
        "g_idx": g_idx,
        "group_size": qw.group_size,
        "sym": qw.zeros is None,
    }
