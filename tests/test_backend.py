import warnings

import pytest
import torch

import moe_kernels
from moe_kernels import _backend


def test_available_backends():
    names = moe_kernels.available_backends()
    assert names[-1] == "reference" and "simt" in names
    assert ("cuda" in names) == (_backend._native("cuda") is not None and torch.cuda.is_available())


def test_default_routes_cpu_to_reference():
    assert _backend.selected_backend(torch.empty(1), "x") == "reference"


def test_use_backend_nests_and_restores():
    x = torch.empty(1)
    with moe_kernels.use_backend("simt"):
        assert _backend.selected_backend(x, "x") == "simt"
        with moe_kernels.use_backend("reference"):
            assert _backend.selected_backend(x, "x") == "reference"
        assert _backend.selected_backend(x, "x") == "simt"
    assert _backend.selected_backend(x, "x") == "reference"


def test_env_selects_backend(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "simt")
    assert _backend.selected_backend(torch.empty(1), "x") == "simt"
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend: expected one of"):
        _backend.selected_backend(torch.empty(1), "x")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend: expected one of"):
        with moe_kernels.use_backend("tpu"):
            pass


def test_simt_runs_the_kernel_source():
    """Under use_backend('simt') the op goes through the emulated kernel, not torch."""
    from moe_kernels import _simt

    assert _simt.target == "simt"
    x = torch.randn(3, 8)
    with moe_kernels.use_backend("simt"):
        got = moe_kernels.topk_gating(x, 2)
    expected = _simt.topk_gating(x, 2, False)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_missing_cuda_module_is_reported(monkeypatch):
    monkeypatch.setitem(_backend._modules, "cuda", None)
    monkeypatch.setitem(_backend._import_errors, "cuda", "it was not built: no CUDA toolkit found")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: it was not built"):
        _backend.native_module("cuda")


def test_custom_op_unknown_backend_is_named():
    """The torch.library surface takes the backend name as an argument: a wrong one is a
    ValueError naming it, not a bare KeyError."""
    with pytest.raises(ValueError, match="backend: expected 'cuda' or 'simt'.*'bogus'"):
        torch.ops.moe_kernels.router_stats("bogus", torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="backend: expected 'cuda' or 'simt'.*'reference'"):
        torch.ops.moe_kernels.router_stats("reference", torch.zeros(4, dtype=torch.int32), 4)


def test_custom_op_with_every_output_absent():
    """unpermute_backward asked for neither gradient returns two absent (0-dim) outputs
    instead of raising StopIteration."""
    grad_y, y_perm = torch.randn(3, 4), torch.randn(6, 4)
    row_map = torch.arange(6).view(3, 2)
    grad_y_perm, grad_weights = torch.ops.moe_kernels.unpermute_backward(
        "simt", grad_y, y_perm, row_map, None, False, False)
    assert grad_y_perm.dim() == 0 and grad_weights.dim() == 0
