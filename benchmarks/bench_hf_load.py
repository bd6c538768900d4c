"""Process growth of loading a ~117M-parameter fp32 checkpoint with transformers, plain vs quant_method qgalore_fx.

    python benchmarks/bench_hf_load.py [--rank 128] [--dir /tmp/qgalore-hf-load]

The checkpoint: a LLaMA of 116.6M parameters (hidden 768, 12 layers, intermediate 2304, vocab 32000, tied
embeddings), saved once in fp32 safetensors with ``max_shard_size="100MB"``. Each mode runs in a fresh
subprocess, which records its RSS after ``import torch, transformers, qgalore_fx`` and its peak RSS
(``ru_maxrss``) after ``from_pretrained`` and one forward of 1 x 128 tokens:

``plain``    ``AutoModelForCausalLM.from_pretrained(dir)``
``qgalore``  ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=QGaLoreQuantizationConfig(rank))``

Prints a markdown table: growth = peak - RSS after the imports, and the ratio qgalore / plain.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

SHAPE = dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=True)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, path: str, rank: int, threshold: bool) -> None:
    import torch
    import transformers

    import qgalore_fx
    from qgalore_fx.memory import set_cpu_mmap_threshold

    torch.set_num_threads(2)
    if threshold:  # freed blocks of 1 MiB and more go back to the OS at once (glibc keeps them otherwise)
        set_cpu_mmap_threshold()
    before = _rss_mib()
    kwargs = {} if mode == "plain" else {"quantization_config": qgalore_fx.QGaLoreQuantizationConfig(rank=rank)}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    loaded = _rss_mib()
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "before_mib": before, "after_load_mib": loaded, "peak_mib": peak, "load_peak_mib": load_peak,
                      "growth_mib": peak - before, "loss": loss, "params": model.num_parameters(),
                      "logical_params": qgalore_fx.logical_parameters(model) if mode != "plain" else
                      model.num_parameters()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=128, help="projection rank (default: 128)")
    p.add_argument("--dir", default="/tmp/qgalore-hf-load", help="where the fp32 checkpoint is written")
    p.add_argument("--mmap-threshold", action="store_true",
                   help="in both processes, return freed blocks >= 1 MiB to the OS (qgalore_fx.memory."
                        "set_cpu_mmap_threshold); default: glibc's own behaviour")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        child(args._child[0], args._child[1], args.rank, args.mmap_threshold)
        return
    path = Path(args.dir)
    if not (path / "config.json").exists():
        import torch
        import transformers

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
        print(f"writing a {model.num_parameters() / 1e6:.1f}M-parameter fp32 checkpoint to {path}", file=sys.stderr)
        model.save_pretrained(path, max_shard_size="100MB")
        del model
    rows = {}
    for mode in ("plain", "qgalore"):
        flags = ["--mmap-threshold"] if args.mmap_threshold else []
        out = subprocess.run([sys.executable, __file__, "--rank", str(args.rank), *flags, "--_child", mode, str(path)],
                             capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    print("| load | parameters (logical) | RSS after imports MiB | after load MiB | peak after one forward MiB "
          "| growth MiB | x plain | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['logical_params'] / 1e6:.1f}M | {r['before_mib']:.0f} | {r['after_load_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['growth_mib']:.0f} | {r['growth_mib'] / rows['plain']['growth_mib']:.2f} | "
              f"{r['loss']:.4f} |")


if __name__ == "__main__":
    main()
