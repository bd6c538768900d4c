"""Peak host memory of transforming a ~1B-parameter LLaMA: meta-device materialization vs fp32 first.

    python benchmarks/bench_materialize.py [--preset 1b] [--rank 512]

Each mode runs in a fresh subprocess and reports its peak RSS (``ru_maxrss``):
``meta``   builds the model on the meta device and lets ``transform`` materialize each projected layer
           straight into INT8 (everything else initialized in place);
``fp32``   builds the model in fp32 on the CPU first, then transforms it.
Prints a markdown table.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {  # LLaMA shapes of the Q-GaLore/GaLore pre-training table
    "60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32),
}


def child(mode: str, preset: str, rank: int) -> None:
    import torch
    import transformers

    import qgalore_fx

    torch.set_num_threads(2)
    cfg = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=256, **SHAPES[preset])
    t0 = time.perf_counter()
    if mode == "meta":
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        model = qgalore_fx.transform(model, rank=rank)
    else:
        model = transformers.LlamaForCausalLM(cfg)
        model = qgalore_fx.transform(model, rank=rank)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    projected = sum(m.in_features * m.out_features for _, m in qgalore_fx.projected_layers(model))
    stored = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(mode=mode, seconds=seconds, peak_rss=peak, model_bytes=stored,
                          parameters=params + projected)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--child", choices=["meta", "fp32"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.preset, args.rank)
        return
    rows = []
    for mode in ("meta", "fp32"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--preset", args.preset,
                              "--rank", str(args.rank)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[1]["peak_rss"]
    print(f"LLaMA-{args.preset} ({rows[0]['parameters'] / 1e9:.2f} B parameters), rank {args.rank}\n")
    print("| mode | peak RSS | ratio to fp32-first | model tensors after transform | time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_rss'] / 2**30:.2f} GiB | {r['peak_rss'] / base:.2f}x | "
              f"{r['model_bytes'] / 2**30:.2f} GiB | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
