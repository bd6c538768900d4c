"""Checkpoint size on disk: a qgalore_fx training checkpoint vs a bf16 model and an fp32 AdamW checkpoint.

    .venv/bin/python benchmarks/bench_checkpoint.py [--preset 60m] [--rank 128] [--steps 2] [--write]

Builds the paper's LLaMA of ``--preset`` (``qgalore_fx.app.presets``, 60M: hidden 512, intermediate
1376, 8 layers, 8 heads, vocabulary 32,000, untied embeddings) on the CPU, transforms it with
``rank``, runs ``--steps`` training steps (so every optimizer state exists: projections,
low-rank 8-bit moments, 8-bit AdamW moments of embeddings/norms/head), then measures:

* ``qgalore_fx checkpoint``: ``save_checkpoint`` of model + optimizer + scheduler + RNG, the
  bytes of every file in the directory, split into ``model.safetensors`` (INT8 codes + scales
  and the other parameters in fp32), ``state.safetensors`` (optimizer state, RNG) and the JSON
  metadata; and the time of the save and of a verified ``load_checkpoint`` (median of 3);
* ``bf16 dense model``: ``export_dense(model, torch.bfloat16).save_pretrained`` — the bytes of
  its ``*.safetensors`` (weights only, no training state);
* ``fp32 model + fp32 AdamW``: computed from tensor sizes, not written: 4 bytes per parameter
  for the weights plus 8 for ``exp_avg``/``exp_avg_sq``, plus a 4-byte ``step`` per tensor —
  what ``torch.save({"model": ..., "optimizer": AdamW.state_dict()})`` holds.

Ratios are against the fp32 AdamW checkpoint. Prints a markdown table; ``--write`` also
writes it to benchmarks/results/checkpoint.md (pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import qgalore_fx
from qgalore_fx.checkpoint import MODEL_FILE, STATE_FILE, load_checkpoint, save_checkpoint
from qgalore_fx.export import export_dense
from qgalore_fx.app.presets import build_model, get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dir_bytes(path: str, suffix: str = "") -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(suffix))


def fp32_adamw_bytes(model: torch.nn.Module) -> int:
    params = list(model.parameters())
    return sum(p.numel() for p in params) * (4 + 4 + 4) + 4 * len(params)


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(preset: str, rank: int, steps: int, seq: int, batch: int) -> str:
    torch.manual_seed(0)
    dense = build_model(preset, seq_len=seq)
    n_params = sum(p.numel() for p in dense.parameters())
    fp32_bytes = fp32_adamw_bytes(dense)
    model = qgalore_fx.transform(dense, rank=rank)
    del dense
    opt = qgalore_fx.optimizer(model, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    vocab = model.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        save_s, load_s = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            save_checkpoint(ckpt, model, opt, sched, step=steps)
            save_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            load_checkpoint(ckpt, model, opt, sched)
            load_s.append(time.perf_counter() - t0)
        q_model = os.path.getsize(os.path.join(ckpt, MODEL_FILE))
        q_state = os.path.getsize(os.path.join(ckpt, STATE_FILE))
        q_total = dir_bytes(ckpt)
        q_meta = q_total - q_model - q_state

        hf_dir = os.path.join(tmp, "bf16")
        export_dense(model, dtype=torch.bfloat16).save_pretrained(hf_dir)
        bf16_bytes = dir_bytes(hf_dir, ".safetensors")

    projected = {f"{name}.{b}" for name, _ in qgalore_fx.projected_layers(model)
                 for b in ("weight_codes", "weight_scales", "anchor")}
    state = model.state_dict()
    int8_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k in projected)
    other_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k not in projected)
    int8_params = sum(m.in_features * m.out_features for _, m in qgalore_fx.projected_layers(model))
    other_params = sum(t.numel() for k, t in state.items() if k not in projected)

    p = get_preset(preset)
    rows = [
        ("fp32 model + fp32 AdamW state (computed)", fp32_bytes, "weights + exp_avg + exp_avg_sq, 12 B/param"),
        ("bf16 dense model, `save_pretrained`", bf16_bytes, "weights only, no training state"),
        ("qgalore_fx checkpoint (total)", q_total, "everything needed to resume bit-exactly"),
        ("  `model.safetensors`", q_model, "INT8 codes + fp32 scales; embeddings, norms, head in fp32"),
        ("  `state.safetensors`", q_state, "INT4 projections, 8-bit moments (low-rank and AdamW), RNG"),
        ("  `checkpoint.json`", q_meta, "config, checksums, structure, Python/numpy RNG"),
    ]
    lines = [
        f"LLaMA {p.name} ({n_params / 1e6:.1f}M parameters: hidden {p.hidden_size}, intermediate "
        f"{p.intermediate_size}, {p.num_hidden_layers} layers, {p.num_attention_heads} heads, vocabulary "
        f"{vocab:,}), `transform(rank={rank})`, {steps} training steps (batch {batch} x {seq} tokens) before saving.",
        "",
        "| checkpoint | bytes on disk | size | vs fp32 + AdamW | holds |",
        "|---|---:|---:|---:|---|",
    ]
    for name, nbytes, what in rows:
        lines.append(f"| {name} | {nbytes:,} | {mib(nbytes)} | {nbytes / fp32_bytes:.3f}x | {what} |")
    lines += [
        "",
        f"Inside `model.safetensors`: the {int8_params / 1e6:.1f}M projected weights take {mib(int8_bytes)} "
        f"(INT8 + one fp32 scale per 256), the other {other_params / 1e6:.1f}M values (embeddings, head, norms; "
        f"not projected, kept in fp32 for training) take {mib(other_bytes)}. "
        f"qgalore_fx checkpoint vs bf16 dense model: {q_total / bf16_bytes:.2f}x. "
        f"save_checkpoint (write, fsync, sha256, atomic swap): median {statistics.median(save_s):.2f} s; "
        f"load_checkpoint (sha256 verify, validate, restore): median {statistics.median(load_s):.2f} s (3 runs each).",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="60m")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the table to benchmarks/results/checkpoint.md")
    args = ap.parse_args(argv)
    table = run(args.preset, args.rank, args.steps, args.seq, args.batch)
    print(table)
    if args.write:
        command = "python benchmarks/bench_checkpoint.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = (
            "## Checkpoint size on disk\n\n"
            f"Command: `.venv/bin/{command.strip()}`  \n"
            f"Machine: 2-core CPU ({platform.machine()}), torch {torch.__version__}, no GPU; 1-minute load average "
            f"{os.getloadavg()[0]:.1f} at the end (other jobs shared the cores: sizes are exact, times are not). "
            "Date: 2026-11-23.\n\n"
            f"{table}\n"
        )
        os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
        with open(os.path.join(ROOT, "benchmarks", "results", "checkpoint.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
