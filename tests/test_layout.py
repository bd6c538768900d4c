"""Where things live: the library (``qgalore_fx``) never imports the application (``qgalore_fx.app``),
and each transform option is declared once, in ``QGaLoreConfig``, from which the training loop's
``TrainConfig`` and the ``qgalore-fx pretrain`` switches are derived."""

import ast
import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import qgalore_fx
from qgalore_fx.config import QGaLoreConfig, cli_fields

PACKAGE = pathlib.Path(qgalore_fx.__file__).parent
APP_ONLY = ("tokenizers", "matplotlib", "tqdm")  # what the application needs and the library must not load


# --------------------------------------------------------------------------- imports


def test_importing_the_library_loads_no_application_module():
    # torch itself imports tqdm (torch.hub) when tqdm is installed, so a module counts only if it is
    # loaded after torch is.
    code = (
        "import json, sys\n"
        "import torch\n"
        "before = set(sys.modules)\n"
        "import qgalore_fx\n"
        "import qgalore_fx.memory\n"
        "qgalore_fx.QGaLoreConfig\n"
        "qgalore_fx.memory_report\n"
        "new = sorted(set(sys.modules) - before)\n"
        "print(json.dumps({'app': [m for m in sys.modules if m.startswith('qgalore_fx.app')], 'new': new}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["app"] == []
    assert "qgalore_fx.memory" in loaded["new"] and "qgalore_fx.config" in loaded["new"]
    heavy = [m for m in loaded["new"] if m.split(".")[0] in APP_ONLY]
    assert heavy == [], f"importing the library loaded {heavy}"


def _imported_modules(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_library_modules_never_import_the_application():
    # __main__.py is not part of the library: it is ``python -m qgalore_fx``, which runs the application.
    library = [p for p in PACKAGE.rglob("*.py")
               if PACKAGE / "app" not in p.parents and p != PACKAGE / "__main__.py"]
    assert PACKAGE / "memory.py" in library and PACKAGE / "rewrite.py" in library
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p)
                                            if m == "qgalore_fx.app" or m.startswith("qgalore_fx.app."))
        for p in library
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("old", ["train", "data", "presets", "cli"])
def test_application_modules_live_only_under_app(old):
    assert importlib.util.find_spec(f"qgalore_fx.{old}") is None
    assert importlib.util.find_spec(f"qgalore_fx.app.{old}") is not None


def test_memory_keeps_only_the_accounting():
    import qgalore_fx.memory as memory

    assert memory.__all__ == ["MemoryReport", "memory_report"]
    for name in ("plan", "PlanRow", "add_memory_arguments", "run_memory", "PAPER_TABLE1", "main"):
        assert not hasattr(memory, name), name


# --------------------------------------------------------------------------- one declaration per option


def _pretrain_parser():
    from qgalore_fx.app import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["pretrain"]


def test_every_cli_field_has_a_pretrain_switch():
    actions = {a.dest: a for a in _pretrain_parser()._actions}
    exposed = cli_fields()
    assert {f.name for f in exposed} >= {"rank", "update_interval", "cos_threshold", "queue_size", "adaptive",
                                         "weight_bits", "proj_bits", "stochastic_round", "optim_bits", "fused",
                                         "scale", "proj_method"}
    for f in exposed:
        assert f.name in actions, f"QGaLoreConfig.{f.name} is marked for the CLI but has no flag"
        action = actions[f.name]
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            assert action.option_strings == ([f"--no-{flag[2:]}"] if f.default else [flag])
            assert action.const is (not f.default)
        else:
            assert action.option_strings == [flag]
            assert action.choices == f.metadata.get("choices")
        assert action.default is None  # None: not given, so the config's default applies
        assert action.help


def test_field_choices_agree_with_the_config_validation():
    for f in cli_fields():
        for value in f.metadata.get("choices", ()):
            QGaLoreConfig(rank=8, **{f.name: value})


def test_train_config_derives_its_transform_fields():
    from qgalore_fx.app.train import TrainConfig

    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for f in cli_fields():
        assert f.name in train_fields, f.name
        expected = None if f.default is dataclasses.MISSING else f.default
        assert train_fields[f.name].default == expected, f.name
    # the training-only options are not transform options
    assert "rest_lr" in train_fields and "rest_lr" not in {f.name for f in dataclasses.fields(QGaLoreConfig)}


@pytest.mark.parametrize("options, message", [
    (dict(cos_threshold=-0.5), "cos_threshold must be in [0, 1], got -0.5"),
    (dict(proj_method="bogus"), "proj_method must be one of ('subspace', 'randomized', 'full'), got 'bogus'"),
    (dict(weight_bits=4), "weight_bits must be one of (8, 16, 32), got 4"),
    (dict(update_interval=0), "update_interval must be >= 1, got 0"),
])
def test_train_config_validates_with_the_config_messages(options, message):
    from qgalore_fx.app.train import TrainConfig

    with pytest.raises(ValueError) as exc:
        TrainConfig(**options)
    assert str(exc.value) == message
    with pytest.raises(ValueError) as lib:
        QGaLoreConfig(rank=8, **options)
    assert str(lib.value) == message


def test_bogus_proj_method_names_the_option_and_the_allowed_values(capsys, monkeypatch):
    from qgalore_fx.app import cli
    from qgalore_fx.config import PROJ_METHODS

    monkeypatch.setattr(cli, "train", lambda config: pytest.fail("must not start training"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["pretrain", "--proj-method", "bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: qgalore-fx pretrain" in err
    assert "proj_method" in err and "'bogus'" in err
    assert all(repr(m) in err for m in PROJ_METHODS)


def _imports_of(path: pathlib.Path) -> set:
    """Every qgalore_fx module ``path`` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qgalore_fx"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("qgalore_fx"))
    return out


def test_the_package_has_no_import_circle():
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = f
    graph = {name: {m for m in _imports_of(f) if m in modules and m not in (name, "qgalore_fx")}
             for name, f in modules.items()}

    def reaches(start, goal, seen):
        return any(nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen))
                   for nxt in graph[start])

    circles = sorted(name for name in graph if reaches(name, name, set()))
    assert not circles, f"modules on an import circle: {circles}"
    # the transformers integration sits above the transform: nothing below imports it
    assert not [name for name, deps in graph.items()
                if "qgalore_fx.integrations.transformers" in deps and not name.startswith("qgalore_fx.app")]


# --------------------------------------------------------------------------- allowed values declared once

# The tuples of allowed values in qgalore_fx.config, and the modules that use them under their own names.
ALLOWED_VALUES = ("WEIGHT_BITS", "PROJ_BITS", "OPTIM_BITS", "PROJ_METHODS", "ALIGN_METHODS", "EPS_PLACEMENTS")


def test_modules_use_the_config_tuples_of_allowed_values():
    from qgalore_fx import config, projection
    from qgalore_fx.kernels import adam8bit

    assert projection.METHODS is config.PROJ_METHODS
    assert projection.ALIGN_METHODS is config.ALIGN_METHODS
    assert adam8bit._BITS is config.OPTIM_BITS
    fields = {f.name: f for f in dataclasses.fields(QGaLoreConfig)}
    for name, allowed in [("weight_bits", config.WEIGHT_BITS), ("proj_bits", config.PROJ_BITS),
                          ("optim_bits", config.OPTIM_BITS), ("align", config.ALIGN_METHODS),
                          ("eps_placement", config.EPS_PLACEMENTS)]:
        assert fields[name].metadata["choices"] is allowed, name


def _literal_value_sets(path: pathlib.Path):
    """(line, set of values) of every tuple, list or set literal of two or more constants in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 \
                and all(isinstance(e, ast.Constant) for e in node.elts):
            yield node.lineno, {e.value for e in node.elts}


def test_no_module_writes_out_a_tuple_of_allowed_values_again():
    # In any order: ("full", "randomized", "subspace") is PROJ_METHODS declared a second time.
    from qgalore_fx import config
    from qgalore_fx.app import options

    declared = {f"config.{name}": (PACKAGE / "config.py", set(getattr(config, name))) for name in ALLOWED_VALUES}
    declared["app.options.AUTOCAST_MODES"] = (PACKAGE / "app" / "options.py", set(options.AUTOCAST_MODES))
    again = []
    for p in sorted(PACKAGE.rglob("*.py")):
        literals = list(_literal_value_sets(p))
        for name, (home, allowed) in declared.items():
            lines = [line for line, values in literals if values == allowed]
            if p == home:
                assert len(lines) == 1, f"{name} is not declared exactly once in {home.name}: lines {lines}"
            else:
                again += [f"{p.relative_to(PACKAGE)}:{line} writes out {name}" for line in lines]
    assert again == []


def test_baselines_are_the_methods_but_qgalore():
    from qgalore_fx.app import cli, finetune, train

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for command, methods in [("pretrain", train.METHODS), ("finetune", finetune.METHODS)]:
        baseline = next(a for a in sub.choices[command]._actions if a.dest == "baseline")
        assert set(baseline.choices) == set(methods) - {"qgalore"}, command


# The QGaLoreConfig options that are not per-layer update settings: how weights are stored (the layer's
# own buffers) and which layers are projected. Every other option is an UpdateSpec field.
MODEL_WIDE_OPTIONS = {"weight_bits", "include_lm_head", "target_modules", "filter_fn", "trace"}


def test_every_option_reaches_the_layer_spec_or_is_model_wide():
    from qgalore_fx.config import SEED_STRIDE
    from qgalore_fx.lowrank import UpdateSpec

    options = {f.name for f in dataclasses.fields(QGaLoreConfig)}
    spec_fields = {f.name for f in dataclasses.fields(UpdateSpec)}
    assert options - spec_fields == MODEL_WIDE_OPTIONS
    config = QGaLoreConfig(rank=4, update_interval=9, cos_threshold=0.7, queue_size=3, adaptive=False,
                           proj_bits=8, stochastic_round=False, optim_bits=32, fused=False, scale=0.5,
                           block_size=64, proj_block_size=32, proj_method="full", align="procrustes",
                           eps_placement="galore", seed=5)
    spec = UpdateSpec.from_config(config, "layer", 16, 8, index=2)
    for name in options & spec_fields - {"seed"}:
        assert getattr(spec, name) == getattr(config, name), name
    assert spec.seed == 5 * SEED_STRIDE + 2  # each layer its own stream
    with pytest.raises(ValueError, match=r"^rank=9 is larger than min\(out, in\)=8 of layer 'layer'"):
        UpdateSpec.from_config(dataclasses.replace(config, rank=9), "layer", 16, 8, index=0)
