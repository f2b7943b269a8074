"""The ``sparsecraft`` command's arguments and :func:`main`, which dispatches to demo, train and bench."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from ._bench import SUITES, _bench
from ._demo import _demo
from ._train import _train

DATASETS = ("digits", "teacher", "superposition", "mnist1d", "copy")
MODELS = ("mlp", "autoencoder", "cnn", "lstm", "gru", "transformer")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of usage dumps."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, received {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a sparsity fraction in (0, 1), received {text!r}"
        )
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}")
    return value


def _penalty_spec(text: str) -> str:
    from .. import penalties

    try:
        penalties.get(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(_one_line(err)) from None
    return text


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive widths like 256,256, received {text!r}"
        )
    return sizes


def _threads(text: str) -> int:
    # torch.set_num_threads(100000) crashes the process (segfault), so the count is bounded.
    most = os.cpu_count() or 1
    value = _positive_int(text)
    if value > most:
        raise argparse.ArgumentTypeError(
            f"expected a thread count from 1 to {most} (the CPUs of this machine), received {text!r}"
        )
    return value


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="torch threads, at most the CPU count (default 1: the small models here train "
        "fastest on one)",
    )


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (refused without it)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparsecraft", description="Make tensors sparse in PyTorch, and show what it did."
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,bench}", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser(
        "demo", help="the reference case, then five ways to a sparse network (about a minute)"
    )
    demo.add_argument("--out", default="sparsecraft-demo", help="folder for report.md and figures")
    demo.add_argument(
        "--quick", action="store_true", help="a much smaller run (seconds), for tests"
    )
    _add_overwrite(demo)
    _add_threads(demo)
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="train one model with a penalty and/or a target sparsity")
    tr.add_argument("--data", choices=DATASETS, default="digits")
    tr.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="default: the data set's (mlp; cnn for mnist1d; transformer for copy)",
    )
    tr.add_argument(
        "--hidden",
        type=_hidden,
        default=None,
        help="widths, e.g. 256,256 (cnn: channels; lstm/gru: state; transformer: d_model,d_ff)",
    )
    tr.add_argument(
        "--penalty",
        type=_penalty_spec,
        default=None,
        help="weight penalty spec, e.g. l1:1e-2, l1l2:1e-3:1e-4, group_lasso:1e-3:rows",
    )
    tr.add_argument(
        "--activity",
        type=_penalty_spec,
        default=None,
        help="activity penalty spec on the hidden ReLU outputs, e.g. l1:1e-3",
    )
    tr.add_argument("--target", type=_fraction, default=None, help="sparsity to reach, e.g. 0.99")
    tr.add_argument(
        "--apply",
        choices=("prox", "loss"),
        default=None,
        help="how --penalty is minimised: prox (exact zeros, default) or loss (Keras style)",
    )
    tr.add_argument(
        "--mode",
        choices=("latent", "forward_backward", "auto"),
        default=None,
        help="prox mode of --penalty (default latent)",
    )
    tr.add_argument(
        "--lr-factor",
        action="store_true",
        help="with --target and adam/adamw: raise the lr as (1 - s)^-1/2 while the weights go "
        "(TargetSparsity.lr_factor; for runs too short for the sparse network)",
    )
    tr.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="sgd")
    tr.add_argument("--lr", type=_positive_float, default=None)
    tr.add_argument("--epochs", type=_positive_int, default=30)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--out", default="sparsecraft-train", help="folder for the model, report and metrics"
    )
    _add_overwrite(tr)
    _add_threads(tr)
    tr.set_defaults(func=_train)

    bench = sub.add_parser("bench", help="run benchmark suites; writes benchmarks/results/")
    bench.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    how = bench.add_mutually_exclusive_group()
    how.add_argument(
        "--quick", action="store_true", help="tiny versions of the suites (smoke test, no files)"
    )
    how.add_argument(
        "--summarize", action="store_true",
        help="train nothing: rebuild results/<suite>.md from the saved results/<suite>.json "
             "(after running a suite as `python benchmarks/<suite>.py`)",
    )
    bench.add_argument("--dir", default=None, help="the benchmarks folder (default: ./benchmarks)")
    _add_threads(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsecraft`` command; returns the exit code.

    Every error is one line on stderr, never a traceback. Exit codes: 0 done;
    2 bad arguments, an ``--out`` that cannot be used (a file, not writable,
    earlier results without ``--overwrite``) or a setting the library refuses
    (``ValueError``, ``TypeError``); 1 a run that failed (training diverged:
    ``FloatingPointError``; a file could not be written: ``OSError``), with
    nothing saved; 130 interrupted.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        import torch

        torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as err:
        print(f"sparsecraft {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as err:
        # A run that diverged or could not write its files: it failed, not its arguments.
        print(f"sparsecraft {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sparsecraft {args.command}: interrupted", file=sys.stderr)
        return 130
