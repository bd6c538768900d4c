"""The ``qgalore-fx`` application, built on the library.

- :mod:`qgalore_fx.app.train`: the pre-training loop (``TrainConfig``, ``train``);
- :mod:`qgalore_fx.app.options`: the options ``pretrain`` and ``finetune`` share, the transform's
  taken from ``QGaLoreConfig``;
- :mod:`qgalore_fx.app.data`: corpus reading, the BPE tokenizer and its cache, batching;
- :mod:`qgalore_fx.app.presets`: LLaMA shapes (``tiny`` .. ``7b``) and their default ranks;
- :mod:`qgalore_fx.app.planner`: memory per training method on the ``meta`` device;
- :mod:`qgalore_fx.app.cli`: the ``qgalore-fx`` command line (``pretrain``, ``memory``).

These modules import the library (``qgalore_fx`` and its submodules); the library
never imports them, so ``import qgalore_fx`` loads no tokenizer, plotting or
progress-bar code.
"""
