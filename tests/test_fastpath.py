"""QGALORE_FX_REFERENCE=1 forces the pure-torch references everywhere, the CUDA kernels included.

The CUDA registrations of the custom ops are called here directly on CPU tensors, with the Triton launchers
replaced by stand-ins: with the switch set they must return the reference's result and never call a
launcher; without it they call the launcher. The fused 8-bit Adam step's switch is tested in
tests/test_adam8bit.py.
"""

import pytest
import torch

from qgalore_fx.kernels import fastpath
from qgalore_fx.kernels.quant import dequantize_reference, quantize_reference

triton_modules = pytest.importorskip("qgalore_fx.kernels.quant_triton")
from qgalore_fx.kernels import int8_matmul as mm  # noqa: E402


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv(fastpath.ENV_REFERENCE, "1")


def _replace_triton(monkeypatch, fn):
    for module, name in ((triton_modules, "quantize_triton"), (triton_modules, "dequantize_triton"),
                         (mm, "int8_matmul_triton"), (mm, "int8_matmul_t_triton")):
        monkeypatch.setattr(module, name, fn)


def test_cuda_kernels_run_the_reference_when_forced(monkeypatch, forced):
    def never(*args):
        raise AssertionError("a Triton launcher was called although QGALORE_FX_REFERENCE=1")

    _replace_triton(monkeypatch, never)
    x = torch.randn(8, 512)
    codes, scales = triton_modules._quantize_cuda(x, 8, 256, None)
    ref_codes, ref_scales = quantize_reference(x, 8, 256, None)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    back = triton_modules._dequantize_cuda(codes, scales, 8, 256, [8, 512], torch.float32)
    assert torch.equal(back, dequantize_reference(codes, scales, 8, 256, [8, 512], torch.float32))
    a = torch.randn(4, 512)
    assert torch.equal(mm._int8_matmul_cuda(a, codes, scales, 256), mm.int8_matmul_reference(a, codes, scales, 256))
    g = torch.randn(4, 8)
    assert torch.equal(mm._int8_matmul_t_cuda(g, codes, scales, 256), mm.int8_matmul_t_reference(g, codes, scales, 256))


def test_cuda_kernels_use_triton_otherwise(monkeypatch):
    monkeypatch.delenv(fastpath.ENV_REFERENCE, raising=False)
    calls = []
    _replace_triton(monkeypatch, lambda *args: calls.append(args) or "triton")
    codes = torch.zeros(8, 512, dtype=torch.int8)
    scales = torch.zeros(16)
    assert triton_modules._quantize_cuda(torch.randn(8, 512), 8, 256, None) == "triton"
    assert triton_modules._dequantize_cuda(codes, scales, 8, 256, [8, 512], torch.float32) == "triton"
    assert mm._int8_matmul_cuda(torch.randn(4, 512), codes, scales, 256) == "triton"
    assert mm._int8_matmul_t_cuda(torch.randn(4, 8), codes, scales, 256) == "triton"
    assert len(calls) == 4


@pytest.mark.parametrize("value, expect", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_switch_values(monkeypatch, value, expect):
    monkeypatch.setenv(fastpath.ENV_REFERENCE, value)
    assert fastpath.reference_forced() is expect
