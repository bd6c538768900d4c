"""qgalore_fx: Q-GaLore training as a graph transform.

    model = qgalore_fx.transform(model, rank=256)   # INT8 weights, fused low-rank update in backward
    opt = qgalore_fx.optimizer(model, lr=1e-3)      # a real torch.optim.Optimizer for the rest

or, with transformers, straight from a checkpoint into INT8:

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qgalore_fx.QGaLoreQuantizationConfig(rank=256))

Public names are imported on first use, so ``import qgalore_fx`` stays light
and submodules (kernels, passes) import without pulling in the rest. The
transformers quantization method ``"qgalore_fx"`` is registered as soon as
transformers' quantizer registry is imported (now, if it already is), so
``import qgalore_fx`` costs no transformers import of its own.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

__version__ = "0.1.0"

_EXPORTS = {
    "QGaLoreConfig": "qgalore_fx.config",
    "QGaLoreLinear": "qgalore_fx.layers",
    "QGaLoreOptimizer": "qgalore_fx.optim",
    "optimizer": "qgalore_fx.optim",
    "transform": "qgalore_fx.rewrite",
    "explain": "qgalore_fx.rewrite",
    "is_transformed": "qgalore_fx.rewrite",
    "projected_layers": "qgalore_fx.rewrite",
    "logical_parameters": "qgalore_fx.rewrite",
    "save_checkpoint": "qgalore_fx.checkpoint",
    "load_checkpoint": "qgalore_fx.checkpoint",
    "read_checkpoint": "qgalore_fx.checkpoint",
    "export_dense": "qgalore_fx.export",
    "memory_report": "qgalore_fx.memory",
    "from_pretrained": "qgalore_fx.integrations.transformers",
    "QGaLoreQuantizationConfig": "qgalore_fx.integrations.transformers",
    "register_layer_handler": "qgalore_fx.handlers",
    "LayerHandler": "qgalore_fx.handlers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qgalore_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


_REGISTRY = "transformers.quantizers.auto"  # where transformers keeps its quantization methods


def _register_with_transformers() -> None:
    try:
        importlib.import_module("qgalore_fx.integrations.transformers")
    except Exception as e:  # another transformers: training works, from_pretrained(quantization_config=) doesn't
        warnings.warn(f"qgalore_fx could not register quant_method 'qgalore_fx' with transformers: {e}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports :mod:`qgalore_fx.integrations.transformers` right after transformers' quantizer registry."""

    def __init__(self):
        self._loader = None

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY or self._loader is not None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _register_with_transformers()


if _REGISTRY in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
