"""Throughput of block quantization (qgalore_fx.kernels) at block size 256.

Run: .venv/bin/pytest benchmarks/bench_quant.py --benchmark-enable [-s]

Each case records in ``benchmark.extra_info``: the bytes moved (input read + codes and scales
written for quantize; codes and scales read + output written for dequantize) and the effective
bandwidth ``GB/s = bytes / median time`` (1 GB = 1e9 bytes). With ``-s`` it also prints them.
The CPU cases time the torch reference (the ops' default kernel); the CUDA cases time the
Triton kernels and are skipped without a GPU.
"""

import pytest
import torch

from qgalore_fx.kernels import make_seed, num_blocks, quantize_reference, dequantize_reference

BLOCK_SIZE = 256
SIZES = {"1M": 1 << 20, "16M": 1 << 24}
# CPU cases at 1 and 2 threads: on a shared 2-core machine the 2-thread timings include waits
# for a descheduled OpenMP thread, so both are recorded.
BACKENDS = ["cpu-reference-1thread", "cpu-reference-2threads", "cuda-triton"]


def make_input(numel: int, device: str, dtype=torch.float32) -> torch.Tensor:
    """A weight-like tensor: [numel / 4096, 4096], seeded."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(numel // 4096, 4096, generator=gen) * 0.02).to(device=device, dtype=dtype)


@pytest.fixture
def torch_threads():
    """Set torch's intra-op thread count for one case and restore it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _functions(backend: str, set_threads):
    if backend.startswith("cpu-reference"):
        set_threads(1 if backend.endswith("1thread") else 2)
        return "cpu", quantize_reference, dequantize_reference
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the Triton kernels are timed on GPU only")
    from qgalore_fx.kernels.quant_triton import dequantize_triton, quantize_triton

    return "cuda", quantize_triton, dequantize_triton


def _run(benchmark, fn, nbytes: int, device: str, rounds: int):
    def timed():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        bytes_moved=nbytes, median_s=median, effective_GBps=nbytes / median / 1e9, threads=torch.get_num_threads()
    )
    print(f"\n{benchmark.name}: median {median * 1e3:.2f} ms, {nbytes / median / 1e9:.2f} GB/s")


def _code_bytes(bits: int, numel: int) -> int:
    return numel if bits == 8 else (numel + 1) // 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize(benchmark, torch_threads, bits, rounding, size, backend):
    device, quantize, _ = _functions(backend, torch_threads)
    numel = SIZES[size]
    x = make_input(numel, device)
    seed = make_seed(0, device=device) if rounding == "stochastic" else None
    nbytes = numel * x.element_size() + _code_bytes(bits, numel) + 4 * num_blocks(numel, BLOCK_SIZE)
    _run(benchmark, lambda: quantize(x, bits, BLOCK_SIZE, seed), nbytes, device, rounds=5 if numel > 1 << 22 else 20)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize(benchmark, torch_threads, bits, size, backend):
    device, quantize, dequantize = _functions(backend, torch_threads)
    numel = SIZES[size]
    x = make_input(numel, device)
    codes, scales = quantize(x, bits, BLOCK_SIZE, None)
    shape = list(x.shape)
    nbytes = codes.numel() * codes.element_size() + scales.numel() * 4 + numel * x.element_size()
    _run(
        benchmark,
        lambda: dequantize(codes, scales, bits, BLOCK_SIZE, shape, torch.float32),
        nbytes, device, rounds=5 if numel > 1 << 22 else 20,
    )
