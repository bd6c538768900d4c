"""Time of one Adam update of a Q-GaLore low-rank state, and the state's bytes.

Run: ``.venv/bin/pytest benchmarks/bench_adam8bit.py --benchmark-enable``
(add ``--benchmark-json=out.json`` to keep the figures; BENCHMARKS.md
was written from such a run).

Measures one Adam direction update (what a projected layer runs every step) for
the two low-rank shapes of 1M elements, for the pure-torch reference (the
library's ``adam_direction_masked_``) and bitsandbytes' kernel, with 8-bit and
32-bit moments (both from tests/adam_peers.py). ``extra_info`` carries
the state's exact bytes so the memory ratio sits next to the time.
Gradients come from the tests' ``make_case`` so benchmark and tests use the
same data.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from qgalore_fx.kernels.adam8bit import AdamState

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from adam_peers import adam_direction  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "_adam8bit_cases", Path(__file__).resolve().parents[1] / "tests" / "test_adam8bit.py"
)
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
make_case = _cases.make_case

SHAPES = [(4096, 256), (1024, 1024)]


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("backend", ["torch", "bitsandbytes"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adam_direction(benchmark, shape, backend, bits):
    _, grads = make_case(shape, steps=4)
    state = AdamState.zeros(shape, bits=bits)
    step = [0]

    def update():
        step[0] += 1
        return adam_direction(grads[step[0] % len(grads)], state, step[0], backend=backend)

    benchmark.extra_info.update(
        shape=list(shape), backend=backend, bits=state.bits, state_bytes=state.nbytes,
        fp32_state_bytes=2 * 4 * state.shape.numel(), torch_threads=torch.get_num_threads(),
    )
    n = benchmark.pedantic(update, rounds=15, iterations=1, warmup_rounds=3)
    assert n.shape == shape and torch.isfinite(n).all()
