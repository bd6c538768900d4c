"""Rank above the tokens of a step: does a larger Adam eps help the low-rank update's weak directions?

    python benchmarks/bench_rank_over_tokens.py [--steps 600] [--eps 1e-8,1e-6,1e-5,1e-4,1e-3] [--ranks 64,16]

When a step sees T tokens, its weight gradient has rank at most T. At a refresh the projection's top T
directions carry that gradient and the other r - T (rank r > T, as at 7B with rank 1024 and 256 tokens per step)
were picked from singular values near zero. Adam divides each coordinate of the low-rank gradient R by its own
sqrt(v), so a coordinate that only ever sees a little gradient still moves by about lr. A floor on v, or an eps
of the order of |R|, would shrink those moves. This measures whether it helps: ``compare.py``'s ``qgalore``
(the library's defaults and its default lr) on the ``tiny`` LLaMA with batch 1 x ``--seq-len`` tokens, once per
Adam eps and rank, and prints final validation perplexity. eps 1e-8 is the default; the grid climbs five
decades, up to where eps damps most coordinates of R. A rank below the tokens is the control: an eps effect that
shows there as well is not about r > T.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq-len", type=int, default=32, help="tokens per step (batch 1; default: 32)")
    p.add_argument("--ranks", default="64,16", help="comma list (default: 64 > T, and 16 < T as the control)")
    p.add_argument("--eps", default="1e-8,1e-6,1e-5,1e-4,1e-3", help="comma list of Adam eps values")
    p.add_argument("--control-eps", default="1e-8,1e-4", help="eps values run at ranks below the tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="the projected group's peak lr (default: the library's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgalore-rank-tokens-") as tmp:
        for rank in (int(r) for r in args.ranks.split(",")):
            grid = args.eps if rank > args.seq_len else args.control_eps
            for eps in (float(e) for e in grid.split(",")):
                out = pathlib.Path(tmp) / f"r{rank}-e{eps:g}"
                cmd = [sys.executable, str(HERE / "compare.py"), "--preset", "tiny", "--steps", str(args.steps),
                       "--batch-size", "1", "--seq-len", str(args.seq_len), "--rank", str(rank),
                       "--methods", "qgalore", "--threads", str(args.threads), "--seed", str(args.seed),
                       "--eps", repr(eps), "--out-dir", str(out)] + (["--lr", repr(args.lr)] if args.lr else [])
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                result = json.loads((out / "compare-tiny.json").read_text())["results"][0]
                rows.append({"rank": rank, "tokens": args.seq_len, "eps": eps, "lr": result["lr"], "val_ppl": result["val_ppl"],
                             "final_train_loss": result["final_train_loss"]})
                print(f"rank {rank:>4}  tokens {args.seq_len}  eps {eps:<8g} val ppl {result['val_ppl']:.2f}",
                      flush=True)
    print("\n| rank | tokens per step | lr | Adam eps | validation perplexity |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rank']} | {r['tokens']} | {r['lr']:g} | {r['eps']:g} | {r['val_ppl']:.2f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
