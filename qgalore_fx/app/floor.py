"""The arithmetic floor of one optimizer step: matmul FLOPs of AdamW, galore-torch and Q-GaLore at a shape.

    python -m qgalore_fx.app.floor --preset 1b --batch-size 4 --checkpointing

A step's time is bounded below by its matrix multiplications; this counts them (2 FLOPs per multiply-add), per
optimizer step of ``T = batch x seq`` tokens, for every method the benchmarks compare, so that a measured step-time
ratio can be read against the ratio the arithmetic allows (``benchmarks/bench_peers.py`` prints them side by
side). Per projected ``m x n`` matrix (out x in), rank ``r``:

=================  ===================================================================================
AdamW              forward ``2mnT`` + input gradient ``2mnT`` + weight gradient ``2mnT`` (= ``6mnT``;
                   activation checkpointing adds a second forward, ``8mnT``)
galore-torch       AdamW's work + projecting the full gradient ``2mnr`` + projecting back ``2mnr``
Q-GaLore           forward + input gradient ``4mnT`` (``6mnT`` with checkpointing), no weight gradient:
                   the projected gradient from the factors ``2rT(m + n)`` (``(dY P)^T X`` for a left
                   projection, ``P^T`` on the right likewise), and projecting back ``dW = P N`` ``2mnr``
=================  ===================================================================================

What every method does alike is counted for all: the output head (``6VhT``, ``8VhT`` with checkpointing;
``V x h``), and attention's score and value products (``4 s h T`` per layer forward for sequence ``s``,
times 3 for forward + backward, 4 with checkpointing). Elementwise work (INT8 dequantization and write-back,
Adam on the moments, norms, the softmax) and the periodic subspace refresh are not matmuls and are not counted:
the floor is what no implementation of the method can go below, not a prediction of the step time.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from qgalore_fx.app.presets import PRESETS, get_preset

METHODS = ("adamw", "galore-torch", "qgalore")


@dataclass(frozen=True)
class Floor:
    """Matmul FLOPs of one optimizer step per method, and their ratios to AdamW's."""

    preset: str
    tokens: int
    rank: int
    checkpointing: bool
    flops: dict  # method -> FLOPs per optimizer step

    def ratio(self, method: str, to: str = "adamw") -> float:
        return self.flops[method] / self.flops[to]


def projected_shapes(preset) -> list:
    """(out, in) of each projected linear of a LLaMA preset: attention q, k, v, o and the MLP's three."""
    p = get_preset(preset)
    h, i = p.hidden_size, p.intermediate_size
    kv = h // p.num_attention_heads * p.kv_heads
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * p.num_hidden_layers


def step_floor(preset, batch_size: int, seq_len: int = None, rank: int = None, checkpointing: bool = False,
               vocab_size: int = None) -> Floor:
    """The matmul floor of one optimizer step of ``batch_size x seq_len`` tokens (module docstring)."""
    p = get_preset(preset)
    seq = seq_len or p.seq_len
    r = rank or p.rank
    vocab = vocab_size or p.vocab_size or 32000
    if batch_size < 1 or seq < 1 or r < 1:
        raise ValueError(f"batch_size, seq_len and rank must be >= 1, got {batch_size}, {seq}, {r}")
    T = batch_size * seq
    passes = 4 if checkpointing else 3  # forward, input gradient, weight gradient (+ the re-forward)
    shared = 2 * vocab * p.hidden_size * T * passes  # the head (the embedding is a gather)
    shared += 4 * seq * p.hidden_size * T * passes * p.num_hidden_layers
    linears = projected_shapes(p)
    dense = sum(2 * m * n * T * passes for m, n in linears)
    galore = dense + sum(4 * m * n * min(r, m, n) for m, n in linears)
    qgalore = sum(2 * m * n * T * (passes - 1) + 2 * min(r, m, n) * T * (m + n) + 2 * m * n * min(r, m, n)
                  for m, n in linears)
    return Floor(p.name, T, r, checkpointing,
                 {"adamw": dense + shared, "galore-torch": galore + shared, "qgalore": qgalore + shared})


def table(rows) -> str:
    """Markdown: one line per (preset, batch, checkpointing)."""
    out = ["| preset | tokens / step | rank | checkpointing | Q-GaLore / AdamW | galore-torch / AdamW "
           "| Q-GaLore / galore-torch |", "|---|---:|---:|---|---:|---:|---:|"]
    for f in rows:
        out.append(f"| {f.preset} | {f.tokens} | {f.rank} | {'yes' if f.checkpointing else 'no'} | "
                   f"{f.ratio('qgalore'):.3f} | {f.ratio('galore-torch'):.3f} | "
                   f"{f.ratio('qgalore', 'galore-torch'):.3f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (a second forward)")
    args = ap.parse_args(argv)
    print(table([step_floor(args.preset, b, args.seq_len, args.rank, args.checkpointing) for b in args.batch_size]))


if __name__ == "__main__":
    main()
