"""Dequant-matmul against a plain matmul of the same shape, in the same run.

    python benchmarks/bench_matmul.py --device cuda --size 4096 --tokens 4096      # on a GPU (bf16)
    python benchmarks/bench_matmul.py --device cpu --size 1024 --tokens 512        # here (fp32 references)
    python benchmarks/bench_matmul.py --device cpu --size 4096 --out-features 11008 --tokens 256 --repeats 5 \
        [--mmap-threshold 1048576]        # a LLaMA-7B MLP weight, 256 tokens, with glibc's policy or the fixed threshold

For a weight of ``size x size`` stored as INT8 codes + per-256 scales and ``tokens`` rows of activations,
it times, per direction (forward ``x @ W.T`` = ``qgalore_fx::int8_matmul``, input gradient ``g @ W`` =
``qgalore_fx::int8_matmul_t``):

- ``op``: the custom op as the library dispatches it (Triton on CUDA unless ``QGALORE_FX_REFERENCE=1``,
  the torch reference elsewhere);
- ``reference``: the pure-torch reference (dequantize to the activation dtype, then one matmul);
- ``dense``: ``torch.mm`` with a dense weight of the activation dtype (bf16 on CUDA, fp32 on CPU) — the
  baseline: what the same layer costs without INT8 storage.

It checks the op against the reference first (max abs error, relative to the output's scale) and prints
medians of ``--repeats`` timed runs (CUDA events on GPU, ``perf_counter`` on CPU) and the ratio to ``dense``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _timer(device: str):
    import torch

    if device.startswith("cuda"):
        def run(fn, repeats: int) -> float:
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, repeats: int) -> float:
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=4096, help="the weight is out-features x size")
    ap.add_argument("--out-features", type=int, default=None, help="rows of the weight (default: --size)")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="qgalore_fx.host_allocator.set_cpu_mmap_threshold(BYTES) first (default: glibc's policy)")
    ap.add_argument("--tokens", type=int, default=4096, help="rows of activations (batch x sequence)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args(argv)

    import torch

    import qgalore_fx.kernels  # noqa: F401  (registers the ops)
    from qgalore_fx.kernels.int8_matmul import int8_matmul_reference, int8_matmul_t_reference
    from qgalore_fx.kernels.quant import quantize_blockwise

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mmap_threshold is not None:
        from qgalore_fx.host_allocator import set_cpu_mmap_threshold

        if not set_cpu_mmap_threshold(args.mmap_threshold):
            raise SystemExit("--mmap-threshold needs Linux with glibc")
    out_features = args.out_features or args.size
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(out_features, args.size, generator=g) * 0.02).to(device)
    q = quantize_blockwise(w, bits=8, block_size=256)
    codes, scales = q.codes.reshape(w.shape), q.scales
    dense = q.dequantize(dtype).reshape(w.shape)  # the same values as the INT8 weight, stored dense
    x = torch.randn(args.tokens, args.size, generator=g).to(device=device, dtype=dtype)
    gy = torch.randn(args.tokens, out_features, generator=g).to(device=device, dtype=dtype)
    run = _timer(args.device)
    rows = []
    for name, a, op, ref, dense_fn in (
        ("forward x @ W.T", x, torch.ops.qgalore_fx.int8_matmul, int8_matmul_reference, lambda: x @ dense.T),
        ("input grad g @ W", gy, torch.ops.qgalore_fx.int8_matmul_t, int8_matmul_t_reference, lambda: gy @ dense),
    ):
        got, want = op(a, codes, scales, 256).float(), ref(a, codes, scales, 256).float()
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        t_op = run(lambda: op(a, codes, scales, 256), args.repeats)
        t_ref = run(lambda: ref(a, codes, scales, 256), args.repeats)
        t_dense = run(dense_fn, args.repeats)
        rows.append({"direction": name, "op_s": t_op, "reference_s": t_ref, "dense_s": t_dense,
                     "op_vs_dense": t_op / t_dense, "reference_vs_dense": t_ref / t_dense, "max_rel_err": err})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{device_name}, weight {out_features}x{args.size} int8 (block 256), {args.tokens} tokens, {dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, mmap threshold "
          f"{args.mmap_threshold if args.mmap_threshold is not None else 'glibc default'}")
    print("| direction | op ms | reference ms | dense mm ms | op / dense | reference / dense | op vs reference err |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['direction']} | {r['op_s'] * 1e3:.3f} | {r['reference_s'] * 1e3:.3f} | {r['dense_s'] * 1e3:.3f} "
              f"| {r['op_vs_dense']:.2f} | {r['reference_vs_dense']:.2f} | {r['max_rel_err']:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "size": args.size, "out_features": out_features,
                       "mmap_threshold": args.mmap_threshold, "tokens": args.tokens, "dtype": str(dtype),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
