"""Learning-rate (and rank) sweep behind ``qgalore-fx finetune``'s defaults.

Each configuration is one ``qgalore-fx finetune`` run in its own process (so each peak RSS is its own), on the
same data, seed and held-out windows; the table printed at the end (and written to ``--out``) gives held-out
perplexity before/after, peak RSS during training and the median step time.

    python benchmarks/finetune_sweep.py --model DIR --steps 12 --batch-size 2 \\
        --runs "adamw:lr=1e-4" "adamw:lr=3e-4" "qgalore:lr=1e-3" "qgalore:lr=1e-3,rank=64"

``DIR`` is a Hugging Face directory; for SmolLM2-135M, ``examples/finetune_smollm2.py --convert-only`` writes
one from the packaged GGUF file. A run is ``METHOD:key=value,...`` with keys ``lr``, ``rest_lr``, ``rank``
(``qgalore`` only), ``lora_rank``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

FLAGS = {"lr": "--lr", "rest_lr": "--rest-lr", "rank": "--rank", "lora_rank": "--lora-rank"}


def parse_run(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    options = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    unknown = set(options) - set(FLAGS)
    if unknown:
        raise SystemExit(f"--runs {text!r}: unknown keys {sorted(unknown)}; known: {sorted(FLAGS)}")
    return method, options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--steps", default="12")
    p.add_argument("--batch-size", default="2")
    p.add_argument("--seq-len", default="256")
    p.add_argument("--eval-tokens", default="4096")
    p.add_argument("--threads", default="1")
    p.add_argument("--root", default="runs/finetune-sweep")
    p.add_argument("--out", default=None, help="JSON file for the table (default: ROOT/sweep.json)")
    args = p.parse_args()

    root = pathlib.Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for text in args.runs:
        method, options = parse_run(text)
        name = method + "".join(f"-{k}{v}" for k, v in options.items())
        run_dir = root / f"{time.strftime('%H%M%S')}-{name}"
        cmd = [sys.executable, "-m", "qgalore_fx", "finetune", "--model", args.model, "--run-dir", str(run_dir),
               "--steps", args.steps, "--batch-size", args.batch_size, "--seq-len", args.seq_len,
               "--eval-tokens", args.eval_tokens, "--threads", args.threads]
        if method != "qgalore":
            cmd += ["--baseline", method]
        for k, v in options.items():
            cmd += [FLAGS[k], v]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        s = json.loads((run_dir / "summary.json").read_text())
        rows.append({"run": text, "val_ppl_before": s["val_ppl_before"], "val_ppl": s["val_ppl"],
                     "peak_rss_train_gib": s["memory"]["train"]["peak_rss_bytes"] / 2**30,
                     "step_s": s["step_seconds_median"], "run_dir": str(run_dir)})
        print(json.dumps(rows[-1]), flush=True)
    out = pathlib.Path(args.out) if args.out else root / "sweep.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{'run':<34} {'ppl before':>10} {'ppl after':>10} {'peak RSS':>9} {'step s':>7}")
    for r in rows:
        print(f"{r['run']:<34} {r['val_ppl_before']:>10.2f} {r['val_ppl']:>10.2f} "
              f"{r['peak_rss_train_gib']:>8.2f}G {r['step_s']:>7.2f}")


if __name__ == "__main__":
    main()
