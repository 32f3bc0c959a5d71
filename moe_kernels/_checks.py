"""Argument checks shared by every public op: each error names the argument.

Scalars: what users naturally pass is accepted (numpy scalars as well as Python ones); the
checks return the value as the plain Python type the op uses.
"""

import math
import numbers

import numpy as np
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
    """`value` is an integer (Python or numpy, not a bool) in [low, high]; returns it as int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name}: expected {low} <= {name} <= {high}, got {value}")
    return value


def check_bool(value, name):
    """`value` is a bool (Python or numpy); returns it as bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def check_number(value, name):
    """`value` is a finite real number (Python or numpy, not a bool); returns it as a float.
    An int too large for a float (10**400) is not finite either."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = float("inf")
    if not math.isfinite(as_float):
        raise ValueError(f"{name}: expected a finite number, got {value:.6g}"
                         if isinstance(value, float) else f"{name}: expected a finite number, "
                         f"got an int of {len(str(abs(int(value))))} digits")
    return as_float


def check_choice(value, name, choices):
    """`value` is one of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        expected = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


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
