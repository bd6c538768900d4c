"""Process growth of loading a ~117M-parameter fp32 checkpoint with transformers, plain vs quant_method qgalore_fx.

    python benchmarks/bench_hf_load.py [--rank 128] [--dir /tmp/qgalore-hf-load]
    python benchmarks/bench_hf_load.py --preset 7b --dtype bf16 --rank 1024 --dir /tmp/qgalore-hf-load-7b

The checkpoint (``--preset``): ``117m``, a LLaMA of 116.6M parameters (hidden 768, 12 layers, intermediate 2304,
vocab 32000, tied embeddings), or ``7b``, LLaMA-7B's shape (6.74B parameters); written once with random weights
(normal, std 0.02) in ``--dtype`` safetensors shards of at most 2 GB, one tensor generated at a time. Each mode runs in a fresh
subprocess, which records its RSS after ``import torch, transformers, qgalore_fx`` and its peak RSS
(``ru_maxrss``) after ``from_pretrained`` and one forward of 1 x 128 tokens:

Growth is also given from the RSS after importing the model's code (``transformers.models.llama.modeling_llama``,
which ``from_pretrained`` imports either way: about 200 MiB of Python modules, the same for both loads).

``plain``    ``AutoModelForCausalLM.from_pretrained(dir)``
``qgalore``  ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=QGaLoreQuantizationConfig(rank))``
``qgalore-lean``  the same with ``QGaLoreQuantizationConfig(rank, lean=True)``
``...-bf16``  any of them with ``dtype=torch.bfloat16`` as well: ``plain-bf16`` a bf16 model; ``qgalore-bf16`` and
              ``qgalore-lean-bf16`` store what is not projected (embeddings, norms, head) in bf16
              (``--modes plain,qgalore,qgalore-lean,qgalore-bf16,qgalore-lean-bf16,plain-bf16``)

Ratios are against ``plain`` (the fp32 load, whatever dtype the other rows use).

Prints a markdown table: growth = peak - RSS after the imports, and the ratio qgalore / plain.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

SHAPES = {
    "117m": dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False),
}
VOCAB = 32000


def write_checkpoint(path: Path, preset: str, dtype: str) -> None:
    """A random checkpoint of the preset's shape, written shard by shard (never the whole model in memory)."""
    import json as _json

    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(**SHAPES[preset], dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    path.mkdir(parents=True, exist_ok=True)
    shard, size, index, files = {}, 0, {}, []
    gen = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            files.append(name)
            index.update({k: name for k in shard})
            shard, size = {}, 0

    seen = set()
    for key, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:  # a tied weight is saved once, as save_pretrained does
            continue
        seen.add(id(p))
        if "norm" in key:
            t = torch.ones(tuple(p.shape), dtype=torch_dtype)
        else:
            t = (torch.randn(tuple(p.shape), generator=gen) * 0.02).to(torch_dtype)
        nbytes = t.numel() * t.element_size()
        if size + nbytes > 2 * 10**9:
            flush()
        shard[key], size = t, size + nbytes
    flush()
    total = sum((path / f).stat().st_size for f in files)
    (path / "model.safetensors.index.json").write_text(_json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": index}))
    config.save_pretrained(path)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, path: str, rank: int, threshold: bool, device: str = "cpu", seq: int = 128) -> None:
    import torch
    import transformers

    import qgalore_fx
    from qgalore_fx.memory import set_cpu_mmap_threshold

    torch.set_num_threads(2)
    if threshold:  # freed blocks of 1 MiB and more go back to the OS at once (glibc keeps them otherwise)
        set_cpu_mmap_threshold()
    before = _rss_mib()
    import transformers.models.llama.modeling_llama  # noqa: F401  the model's code, which loading imports anyway

    code = _rss_mib()
    method, *flags = mode.split("-")
    if method not in ("plain", "qgalore") or not set(flags) <= {"lean", "bf16"} or (method == "plain" and "lean" in flags):
        raise SystemExit(f"unknown mode {mode!r}: plain[-bf16] or qgalore[-lean][-bf16]")
    kwargs = {"dtype": torch.bfloat16} if "bf16" in flags else {}
    if method == "qgalore":
        options = {"lean": True} if "lean" in flags else {}
        kwargs["quantization_config"] = qgalore_fx.QGaLoreQuantizationConfig(rank=rank, **options)
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    loaded = _rss_mib()
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None
    print(json.dumps({"mode": mode, "device": device, "max_memory_allocated_mib": gpu, "before_mib": before, "model_code_mib": code - before, "after_load_mib": loaded, "peak_mib": peak, "load_peak_mib": load_peak,
                      "growth_mib": peak - before, "load_growth_mib": peak - code, "loss": loss, "params": model.num_parameters(),
                      "logical_params": qgalore_fx.logical_parameters(model) if method != "plain" else
                      model.num_parameters()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=128, help="projection rank (default: 128)")
    p.add_argument("--dir", default="/tmp/qgalore-hf-load", help="where the checkpoint is written")
    p.add_argument("--preset", choices=sorted(SHAPES), default="117m", help="checkpoint shape (default: 117m)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="checkpoint dtype (default: fp32)")
    p.add_argument("--modes", default="plain,qgalore", help="which loads to run (default: plain,qgalore)")
    p.add_argument("--device", default="cpu", help="where the model is loaded (device_map={'': device}); on CUDA "
                                                   "the table adds torch.cuda.max_memory_allocated")
    p.add_argument("--mmap-threshold", action="store_true",
                   help="in both processes, return freed blocks >= 1 MiB to the OS (qgalore_fx.memory."
                        "set_cpu_mmap_threshold); default: glibc's own behaviour")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        child(args._child[0], args._child[1], args.rank, args.mmap_threshold, args.device)
        return
    path = Path(args.dir)
    if not (path / "config.json").exists():  # in its own process: ru_maxrss survives exec into the children
        print(f"writing a {args.preset} {args.dtype} checkpoint to {path}", file=sys.stderr)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"from bench_hf_load import write_checkpoint; from pathlib import Path; "
                        f"write_checkpoint(Path({str(path)!r}), {args.preset!r}, {args.dtype!r})"], check=True)
    rows = {}
    for mode in args.modes.split(","):
        flags = (["--mmap-threshold"] if args.mmap_threshold else []) + ["--device", args.device]
        out = subprocess.run([sys.executable, __file__, "--rank", str(args.rank), *flags, "--_child", mode, str(path)],
                             capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    print("| load | num_parameters() | RSS after imports MiB | model code MiB | after load MiB "
          "| peak after one forward MiB | growth MiB | x plain | growth without the code MiB | x plain | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = rows.get("plain")
    for mode, r in rows.items():
        ratio = r["growth_mib"] / base["growth_mib"] if base else float("nan")
        load_ratio = r["load_growth_mib"] / base["load_growth_mib"] if base else float("nan")
        print(f"| {mode} | {r['params'] / 1e6:.2f}M | {r['before_mib']:.0f} | {r['model_code_mib']:.0f} | "
              f"{r['after_load_mib']:.0f} | {r['peak_mib']:.0f} | {r['growth_mib']:.0f} | {ratio:.2f} | "
              f"{r['load_growth_mib']:.0f} | {load_ratio:.2f} | {r['loss']:.4f} |" + (f" GPU max allocated {r['max_memory_allocated_mib']:.0f} MiB"
                                        if r.get("max_memory_allocated_mib") is not None else ""))


if __name__ == "__main__":
    main()
