"""The matmul floor model (qgalore_fx.app.floor): hand-counted cases and the orderings the method implies."""

import pytest

from qgalore_fx.app.floor import projected_shapes, step_floor
from qgalore_fx.app.presets import get_preset


def test_nano_counts_by_hand():
    p = get_preset("nano")
    f = step_floor("nano", batch_size=2, seq_len=8, rank=4, vocab_size=100)
    T, h, L = 16, p.hidden_size, p.num_hidden_layers
    shapes = projected_shapes("nano")
    assert len(shapes) == 7 * L
    shared = 2 * 100 * h * T * 3 + 4 * 8 * h * T * 3 * L
    dense = sum(6 * m * n * T for m, n in shapes)
    assert f.flops["adamw"] == dense + shared
    assert f.flops["galore-torch"] == dense + shared + sum(4 * m * n * min(4, m, n) for m, n in shapes)
    assert f.flops["qgalore"] == shared + sum(4 * m * n * T + 2 * min(4, m, n) * T * (m + n) + 2 * m * n * min(4, m, n)
                                              for m, n in shapes)


@pytest.mark.parametrize("preset", ["60m", "1b", "7b"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_qgalore_is_below_galore_torch_and_gains_on_adamw_with_tokens(preset, checkpointing):
    ratios = [step_floor(preset, b, checkpointing=checkpointing).ratio("qgalore") for b in (1, 4, 16)]
    assert ratios == sorted(ratios, reverse=True)  # its per-step projection cost is amortized over more tokens
    for b in (1, 4, 16):
        f = step_floor(preset, b, checkpointing=checkpointing)
        assert f.flops["qgalore"] < f.flops["galore-torch"] and f.flops["adamw"] < f.flops["galore-torch"]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        step_floor("1b", 0)
