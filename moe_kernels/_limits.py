"""The ops' limits, defined once in csrc/kernels/common/limits.h; setup.py records them in
_build_info at build time, so the Python checks use the numbers the kernels are built with."""

try:
    from ._build_info import limits as _limits
except ImportError as exc:  # an unbuilt source tree
    raise ImportError("moe_kernels is not built: install it (pip install --no-build-isolation .) "
                      "or build in place (python setup.py build_ext --inplace)") from exc

MAX_EXPERTS = _limits["MAX_EXPERTS"]
MAX_COUNTED_EXPERTS = _limits["MAX_COUNTED_EXPERTS"]
MAX_ALIGN = _limits["MAX_ALIGN"]
