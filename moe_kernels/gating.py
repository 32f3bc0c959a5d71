"""Routing ops: fused top-k gating."""

from . import reference
from ._backend import native_module, selected_backend
from ._checks import FLOAT_DTYPES, check_int, check_tensor

MAX_EXPERTS = 4096


def topk_gating(logits, k, *, renormalize=False):
    """Select the top-k experts of each token in one fused pass.

    Parameters
    ----------
    logits : torch.Tensor
        ``[T, E]`` router logits, float32 / float16 / bfloat16, contiguous;
        ``1 <= E <= 4096``.
    k : int
        Experts per token, ``1 <= k <= E``.
    renormalize : bool
        Divide the k weights of a token by their sum.

    Returns
    -------
    weights : torch.Tensor
        ``[T, k]`` float32: ``softmax(logits)`` at the selected experts (renormalized if
        asked), in descending order.
    ids : torch.Tensor
        ``[T, k]`` int32 expert indices; ties go to the lower index.

    Notes
    -----
    Selection compares the logits in float32. A NaN logit ranks as -inf (it is chosen only
    after every number) and, as in ``torch.softmax``, makes its token's weights NaN.
    """
    check_tensor(logits, "logits", dtypes=FLOAT_DTYPES, dim=2)
    num_experts = logits.shape[1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"logits: expected 1 to {MAX_EXPERTS} experts (columns), got {num_experts}")
    check_int(k, "k", 1, num_experts)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected a bool, got {type(renormalize).__name__}")

    backend = selected_backend(logits, "logits")
    if backend == "reference":
        return reference.topk_gating(logits, k, renormalize=renormalize)
    return native_module(backend).topk_gating(logits, k, renormalize)
