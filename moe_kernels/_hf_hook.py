"""Register the ``"moe_kernels"`` experts backend with transformers without importing it.

Importing ``transformers.integrations.moe`` costs seconds, so ``import moe_kernels`` does
not. It calls ``install()`` instead: if that module is already imported, ``moe_kernels.hf``
is imported now (it registers); otherwise a one-shot meta-path finder waits for the
module's first import (every MoE model class and ``from_pretrained``'s validation of
``experts_implementation`` import it) and imports ``moe_kernels.hf`` right after the
module has executed. The finder removes itself when it fires. Costs nothing but a
``sys.meta_path`` entry when transformers is never imported."""

import importlib.abc
import importlib.util
import sys

_TARGET = "transformers.integrations.moe"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the find_spec below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            from . import hf  # noqa: F401  (registers on import)

        spec.loader.exec_module = exec_and_register
        return spec


def install():
    if _TARGET in sys.modules:
        from . import hf  # noqa: F401
    elif importlib.util.find_spec("transformers") is not None and \
            not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
