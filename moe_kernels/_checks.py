"""Argument checks shared by every public op: each error names the argument."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, name, *, dtypes=None, dim=None, contiguous=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}, got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")


def check_int(value, name, low, high):
    """`value` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected {low} <= {name} <= {high}, got {value}")


def check_same_device(t, name, ref, ref_name):
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), "
                         f"got one on {t.device}")


def check_pair_weights(weights, name, pairs, pairs_name):
    """`weights` are float32 routing weights, one per (token, slot) of `pairs` [T, k]."""
    check_tensor(weights, name, dtypes=(torch.float32,), dim=2)
    check_same_device(weights, name, pairs, pairs_name)
    if weights.shape != pairs.shape:
        raise ValueError(f"{name}: expected shape {tuple(pairs.shape)} (like {pairs_name}), got "
                         f"{tuple(weights.shape)}")
