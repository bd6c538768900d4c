"""Integrations above the transform: they use :func:`qgalore_fx.transform`, nothing below imports them.

* :mod:`qgalore_fx.integrations.transformers` — ``quant_method: "qgalore_fx"`` for transformers'
  ``from_pretrained(..., quantization_config=...)`` and ``save_pretrained``.
"""
