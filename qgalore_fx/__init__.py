"""qgalore_fx: Q-GaLore training as a graph transform.

    model = qgalore_fx.transform(model, rank=256)   # INT8 weights, fused low-rank update in backward
    opt = qgalore_fx.optimizer(model, lr=1e-3)      # a real torch.optim.Optimizer for the rest

Public names are imported on first use, so ``import qgalore_fx`` stays light
and submodules (kernels, passes) import without pulling in the rest.
"""

import importlib

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
    "from_pretrained": "qgalore_fx.hf",
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
