"""The lr choice of benchmarks/quality_sweep.py: best value, edges, extension, mean ± sd, the --lrs parser."""

import importlib.util
import math
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "quality_sweep.py"
_spec = importlib.util.spec_from_file_location("quality_sweep", _PATH)
qs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qs)


@pytest.mark.parametrize(
    "ppl, lr, edge",
    [
        ({5e-4: 320.0, 1e-3: 300.0, 2e-3: 310.0}, 1e-3, None),
        ({5e-4: 290.0, 1e-3: 300.0, 2e-3: 310.0}, 5e-4, "low"),
        ({5e-4: 330.0, 1e-3: 300.0, 2e-3: 280.0}, 2e-3, "high"),
        # a diverged run (nan or inf) loses to every finite one, wherever it sits
        ({5e-4: 330.0, 1e-3: 300.0, 2e-3: math.nan}, 1e-3, None),
        ({5e-4: math.inf, 1e-3: 300.0, 2e-3: 310.0}, 1e-3, None),
        # the dict's order does not matter
        ({2e-3: 310.0, 5e-4: 320.0, 1e-3: 300.0}, 1e-3, None),
    ],
)
def test_best_lr(ppl, lr, edge):
    assert qs.best_lr(ppl) == (lr, edge)


def test_best_lr_all_diverged_is_an_edge():
    lr, edge = qs.best_lr({1e-3: math.nan, 2e-3: math.nan, 4e-3: math.inf})
    assert edge is not None and lr in (1e-3, 4e-3)


def test_extend_grid_one_geometric_step():
    assert qs.extend_grid([5e-4, 1e-3, 2e-3], "high") == pytest.approx(4e-3)
    assert qs.extend_grid([2e-3, 5e-4, 1e-3], "low") == pytest.approx(2.5e-4)
    assert qs.extend_grid([3e-4, 1e-3, 3e-3], "low") == pytest.approx(9e-5)
    with pytest.raises(ValueError, match="edge"):
        qs.extend_grid([1e-3, 2e-3], "middle")
    with pytest.raises(ValueError, match="two values"):
        qs.extend_grid([1e-3], "low")


def test_mean_sd_is_the_sample_sd():
    mean, sd = qs.mean_sd([300.0, 310.0, 320.0])
    assert mean == pytest.approx(310.0) and sd == pytest.approx(10.0)
    assert qs.mean_sd([300.0]) == (300.0, None)


def test_parse_lrs():
    assert qs.parse_lrs(["adamw=1e-3,5e-4,2e-3", "qgalore = 1e-2,2e-2"]) == {
        "adamw": [5e-4, 1e-3, 2e-3], "qgalore": [1e-2, 2e-2]}
    for bad in ("adamw", "adamw=", "adamw=1e-3,1e-3", "adamw=-1e-3,1e-3", "adamw=nan,1e-3"):
        with pytest.raises(ValueError, match="--lrs"):
            qs.parse_lrs([bad])


def test_transfer_takes_one_lr_per_method_and_marks_it():
    with pytest.raises(SystemExit):
        qs.parse_args(["--lrs", "adamw=1e-3", "--steps", "60"])  # a sweep needs three values
    with pytest.raises(SystemExit):
        qs.parse_args(["--lrs", "adamw=1e-3,2e-3", "--transfer", "quality-tiny.json", "--steps", "60"])
    args = qs.parse_args(["--lrs", "adamw=1e-3", "--transfer", "quality-tiny.json", "--steps", "60",
                          "--max-extend", "2"])
    assert args.grids == {"adamw": [1e-3]} and args.max_extend == 0
    run = {"method": "adamw", "lr": 1e-3, "seed": 0, "val_ppl": 400.0, "rest_lr": None, "persistent_bytes": 2**20,
           "median_step_s": 0.5}
    doc = {"settings": {"seeds": [0], "methods": ["adamw"], "transfer": "quality-tiny.json"},
           "runs": {qs._run_key("adamw", 1e-3, 0): run}}
    row = qs.markdown_table(doc).splitlines()[-1]
    assert "0.001 (transferred)" in row and "edge" not in row and "400.0 (n=1)" in row
