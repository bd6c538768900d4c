"""Peak memory of a real Q-GaLore training step, phase by phase: the LLaMA-7B headline on a CPU.

    python benchmarks/bench_memory_timeline.py --preset 7b --steps 2 --threads 2   # LLaMA-7B with the defaults
    python benchmarks/bench_memory_timeline.py --preset 7b --steps 3 --threads 2 --mmap-threshold 1048576 \
        --embedding-dtype bf16                              # the lowest-memory 7B run
    python benchmarks/bench_memory_timeline.py --preset 60m --steps 3          # a quick check of the script

The model is built on the ``meta`` device from the preset's ``LlamaConfig`` and
``qgalore_fx.transform(model, rank, proj_method=...)`` materializes every projected
layer straight into INT8 (no weights file: initialized as the model would be);
activation checkpointing is on; each step is one forward + backward + ``step`` +
``zero_grad`` on ``batch x seq_len`` random tokens.

Memory is the process's resident set: a sampler thread reads ``VmRSS`` from
``/proc/self/status`` every ``--interval`` seconds and keeps the maximum per
phase (build, transform + optimizer, then forward / backward / step of each
step); ``ru_maxrss`` (the kernel's own peak) is reported beside the sampled
overall peak. ``memory_report`` gives the persistent bytes (weights, scales,
projections, moments) counted from the tensors themselves, so the transient
part of each phase is its peak minus what was resident before it. The JSON
written to ``--out`` holds every figure and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

GiB = 2**30


class RssSampler:
    """Maximum resident set size per named phase, sampled from /proc/self/status."""

    def __init__(self, interval: float):
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.on_enter = None  # called as on_enter(old_phase, new_phase) when a phase starts

    @staticmethod
    def field(name: str) -> int:
        from qgalore_fx.memory import process_memory

        value = process_memory(name)
        if value is None:
            raise RuntimeError(f"no {name} in /proc/self/status")
        return value

    @staticmethod
    def rss() -> int:
        return RssSampler.field("VmRSS")

    def _record(self) -> None:
        rss = self.rss()
        if rss > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(self.interval)

    def enter(self, phase: str) -> int:
        """Start ``phase``; returns the RSS at its start."""
        if self.on_enter is not None:
            self.on_enter(self.phase, phase)
        self._record()
        self.phase = phase
        self.order.append(phase)
        start = self.rss()
        self.peaks[phase] = start
        return start

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._record()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--rank", type=int, default=None, help="default: the preset's")
    ap.add_argument("--proj-method", default=None, help="transform's proj_method (default: the library's)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="call qgalore_fx.memory.set_cpu_mmap_threshold(BYTES) first (default: the library's own choice, "
                         "qgalore_fx.optimizer(mmap_threshold=None): set for a model of 4 GiB or more)")
    ap.add_argument("--rest-in-backward", choices=("default", "on", "off"), default="default",
                    help="qgalore_fx.optimizer(..., rest_in_backward=None/True/False): on, the embedding, norms "
                         "and head are updated inside backward and their gradients freed at once; the default "
                         "turns it on where it is valid and pays (a large untied embedding or head)")
    ap.add_argument("--embedding-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="storage of the input embedding and output head; bf16 (stochastic rounding, see "
                         "qgalore_fx.fused_rest) is measured with them updated inside backward, as planned")
    ap.add_argument("--lean", action="store_true", help="transform(..., lean=True): factored second moment, no "
                    "first moment in the projected layers' update (qgalore_fx.kernels.factored)")
    ap.add_argument("--no-plan", action="store_true", help="skip the planner's prediction (qgalore_fx.app.planner."
                    "plan_run, printed beside the measurement)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on CUDA each phase also records "
                    "torch.cuda.max_memory_allocated (reset at the phase's start)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import transformers

    import qgalore_fx
    from qgalore_fx.app.presets import get_preset, llama_config

    from qgalore_fx.memory import set_cpu_mmap_threshold

    if args.mmap_threshold is not None and not set_cpu_mmap_threshold(args.mmap_threshold):
        raise SystemExit("--mmap-threshold needs Linux with glibc")
    preset = get_preset(args.preset)
    rank = args.rank or preset.rank
    config = llama_config(preset.name, vocab_size=None if preset.vocab_size else 8192)
    rest_in_backward = {"default": None, "on": True, "off": False}[args.rest_in_backward]
    if args.embedding_dtype == "bf16" and rest_in_backward is False:
        raise SystemExit("--embedding-dtype bf16 is measured (and planned) with the embedding and head updated "
                         "inside backward")
    options = {} if args.proj_method is None else {"proj_method": args.proj_method}
    if args.lean:
        options["lean"] = True
    embedding_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.embedding_dtype]
    plan = None
    if not args.no_plan and args.device == "cpu":
        from qgalore_fx.app.planner import plan_run

        # the planner measures this process after a tiny warm-up step as the runtime part of the peak
        plan = plan_run(config, rank, batch_size=args.batch_size, seq_len=args.seq_len,
                        checkpointing=not args.no_checkpointing, rest_in_backward=rest_in_backward,
                        embedding_dtype=embedding_dtype, **options)
        print(f"planner (qgalore-fx memory --run): predicted peak {plan.peak / GiB:.2f} GiB", flush=True)
    rows = []
    cuda = torch.device(args.device).type == "cuda"
    cuda_peaks: dict[str, int] = {}
    t_all = time.perf_counter()
    def cuda_phase(old: str, new: str) -> None:  # the CUDA peak of the phase that ends, then reset
        if cuda:
            torch.cuda.synchronize()
            cuda_peaks[old] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    with RssSampler(args.interval) as sampler:
        sampler.on_enter = cuda_phase
        rss_imports = sampler.enter("build on meta + transform + optimizer")  # torch, transformers imported
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        model = qgalore_fx.transform(model, rank=rank, device=args.device, **options)
        if embedding_dtype != torch.float32:
            model.get_input_embeddings().to(embedding_dtype)
            model.get_output_embeddings().to(embedding_dtype)
        if not args.no_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        opt = qgalore_fx.optimizer(model, lr=1e-3, rest_in_backward=rest_in_backward)
        rows.append(("build on meta + transform + optimizer", time.perf_counter() - t0))
        g = torch.Generator().manual_seed(0)
        for step in range(args.steps):
            ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(args.device)
            sampler.enter(f"step {step} forward")
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            rows.append((f"step {step} forward", time.perf_counter() - t0))
            sampler.enter(f"step {step} backward (projected layers update here)")
            t0 = time.perf_counter()
            loss.backward()
            rows.append((f"step {step} backward (projected layers update here)", time.perf_counter() - t0))
            sampler.enter(f"step {step} opt.step + zero_grad")
            t0 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            rows.append((f"step {step} opt.step + zero_grad", time.perf_counter() - t0))
            print(f"step {step}: loss {loss.item():.4f}, peak so far {max(sampler.peaks.values()) / GiB:.2f} GiB",
                  flush=True)
            del loss
        sampler.enter("end")
    report = qgalore_fx.memory_report(model, opt)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # VmHWM is this process's own peak; ru_maxrss also keeps the parent's resident set at fork time across exec
    # (Linux), so a run started from a large process (e.g. pytest) reads the parent's size there.
    hwm = RssSampler.field("VmHWM")
    times = dict(rows)
    phases = [p for p in sampler.order if p in times]
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd())] + (argv or sys.argv[1:])),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "threads": args.threads},
        "mmap_threshold": args.mmap_threshold, "preset": preset.name, "rank": rank, "proj_method": args.proj_method, "lean": args.lean, "batch": args.batch_size,
        "seq_len": args.seq_len, "checkpointing": not args.no_checkpointing,
        "rest_in_backward": args.rest_in_backward, "embedding_dtype": args.embedding_dtype,
        "plan": None if plan is None else plan.to_dict(),
        "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "phases": [{"phase": p, "seconds": round(times[p], 2), "peak_rss_bytes": sampler.peaks[p],
                    **({"cuda_max_allocated_bytes": cuda_peaks.get(p)} if cuda else {})} for p in phases],
        "rss_after_imports_bytes": rss_imports,
        "peak_rss_sampled_bytes": max(sampler.peaks.values()),
        "ru_maxrss_bytes": maxrss,
        "vm_hwm_bytes": hwm,
        "persistent_bytes": report.weights_and_states,
        "report": report.to_dict(),
        "wall_seconds": round(time.perf_counter() - t_all, 1),
    }
    print(f"\n{preset.name}, rank {rank}, batch {args.batch_size} x {args.seq_len}, {args.threads} thread(s)")
    print(f"device: {result['device']}")
    print("| phase | time s | peak RSS GiB |" + (" CUDA max allocated GiB |" if cuda else "")
          + "\n|---|---:|---:|" + ("---:|" if cuda else ""))
    for row in result["phases"]:
        extra = f" {row['cuda_max_allocated_bytes'] / GiB:.2f} |" if cuda else ""
        print(f"| {row['phase']} | {row['seconds']:.1f} | {row['peak_rss_bytes'] / GiB:.2f} |{extra}")
    print(f"peak RSS (ru_maxrss) {maxrss / GiB:.2f} GiB; RSS after imports {rss_imports / GiB:.2f} GiB; "
          f"weights + states (memory_report) {report.weights_and_states / GiB:.2f} GiB")
    if plan is not None:
        print(f"planner: predicted peak {plan.peak / GiB:.2f} GiB, measured (VmHWM) {hwm / GiB:.2f} GiB "
              f"({(hwm - plan.peak) / plan.peak:+.1%})")
        print(plan)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
