import pytest
import torch

import moe_kernels

BACKENDS = moe_kernels.available_backends()
if "simt" not in BACKENDS:
    # The emulator is how every kernel is tested without a GPU: never skip it silently.
    pytest.exit(f"moe_kernels._simt cannot be imported from {moe_kernels.__file__}: "
                f"{moe_kernels._backend._import_errors.get('simt')}. Install the package "
                "(pip install --no-build-isolation .) and run `pytest tests` from the repo root, "
                "not `python -m pytest` (which imports the unbuilt source tree).", returncode=1)
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """A backend that runs our kernel sources: simt always, cuda when a GPU is present."""
    return request.param


def misaligned_copy(t, device):
    """A copy of `t` on `device` whose data starts one element past an aligned address.
    Built on the device itself: copying a misaligned CPU view to a GPU would realign it,
    and the kernels' unaligned fallbacks would go untested there."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    view = base[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def native(backend):
    return moe_kernels._backend.native_module(backend)


def run(backend, fn, *args, **kwargs):
    with moe_kernels.use_backend(backend):
        return fn(*args, **kwargs)


def needs_observer():
    """Skips a test of the emulator's memory observer (race detector, alignment, traffic)
    in the AddressSanitizer build, which cannot carry it."""
    from moe_kernels import _build_info

    if not getattr(_build_info, "simt_observer", False):
        pytest.skip("the AddressSanitizer build of _simt has no memory observer")
