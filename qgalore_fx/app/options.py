"""The options ``qgalore-fx pretrain`` and ``qgalore-fx finetune`` share, declared once.

The transform options are not declared here at all: they are the :class:`qgalore_fx.config.QGaLoreConfig`
fields marked for the command line (:func:`qgalore_fx.config.cli_fields`). :func:`with_transform_options`
gives a run's config dataclass (``TrainConfig``, ``FinetuneConfig``) one field per such option, with the
library's type, default and metadata (help, choices), and :func:`transform_options` reads them back. The
run options both applications have in common are declared below.
"""

from __future__ import annotations

import dataclasses

from qgalore_fx.config import cli_fields

__all__ = ["AUTOCAST_MODES", "transform_options", "with_transform_options"]

#: ``autocast``: "auto" is bf16 autocast on cuda and none on cpu.
AUTOCAST_MODES = ("auto", "bf16", "off")


def with_transform_options(cls):
    """Give ``cls`` one field per option of :func:`qgalore_fx.config.cli_fields` (before ``@dataclass``).

    Each field has the ``QGaLoreConfig`` field's type, default and metadata, so the options are
    declared once, in the library. ``rank`` has no default there; here it defaults to None, which
    the run resolves (the preset's rank, or the fine-tuning default).
    """
    annotations = cls.__dict__.get("__annotations__", {})
    for f in cli_fields():
        if f.name in annotations:
            raise TypeError(f"{cls.__name__}.{f.name} is a QGaLoreConfig option; do not redeclare it")
        required = f.default is dataclasses.MISSING
        annotations[f.name] = f"{f.type} | None" if required else f.type
        setattr(cls, f.name, dataclasses.field(default=None if required else f.default, metadata=f.metadata))
    cls.__annotations__ = annotations
    return cls


def transform_options(config) -> dict:
    """The transform options of a ``@with_transform_options`` config, by name, as they are (``rank`` may be None)."""
    return {f.name: getattr(config, f.name) for f in cli_fields()}
