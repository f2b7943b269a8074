"""The ``sparsecraft`` command: ``demo``, ``train`` and ``bench``.

This module only parses arguments, dispatches to :mod:`sparsecraft.experiments`
(training) and the benchmark suites, and presents results with rich and
:mod:`sparsecraft.report`. A bad flag or spec is one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RunProgress", "main"]

DATASETS = ("digits", "teacher", "superposition")
SUITES = ("weights", "activity", "overhead", "export", "control")
METHOD_NOTES = {
    "dense": "no penalty",
    "l1_loss": "L1 in the loss, then threshold",
    "magnitude": "one-shot prune + fine-tune",
    "gradual": "gradual prune, cubic schedule",
    "target": "prox L1 + TargetSparsity",
    "prox": "prox L1 at a fixed λ",
    "pat": "torchao PAT",
}


# --------------------------------------------------------------------------- argument parsing


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
    from . import penalties

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


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads (default 1: the small models here train fastest on one)",
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
    _add_threads(demo)
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="train one model with a penalty and/or a target sparsity")
    tr.add_argument("--data", choices=DATASETS, default="digits")
    tr.add_argument("--model", choices=("mlp", "autoencoder"), default="mlp")
    tr.add_argument("--hidden", type=_hidden, default=None, help="hidden widths, e.g. 256,256")
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
        default="prox",
        help="prox (exact zeros, default) or loss (Keras style)",
    )
    tr.add_argument(
        "--mode", choices=("latent", "forward_backward"), default="latent", help="prox mode"
    )
    tr.add_argument("--optimizer", choices=("adam", "sgd"), default="sgd")
    tr.add_argument("--lr", type=_positive_float, default=None)
    tr.add_argument("--epochs", type=_positive_int, default=30)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--out", default="sparsecraft-train", help="folder for the model, report and metrics"
    )
    _add_threads(tr)
    tr.set_defaults(func=_train)

    bench = sub.add_parser("bench", help="run benchmark suites; writes benchmarks/results/")
    bench.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    bench.add_argument(
        "--quick", action="store_true", help="tiny versions of the suites (smoke test, no files)"
    )
    bench.add_argument("--dir", default=None, help="the benchmarks folder (default: ./benchmarks)")
    _add_threads(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsecraft`` command; returns the exit code."""
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
    except KeyboardInterrupt:
        print(f"sparsecraft {args.command}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- presentation helpers


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, width=None if sys.stdout.isatty() else 120)


class RunProgress:
    """Rich progress bars for :func:`sparsecraft.experiments.compare` (one bar per run, by epoch).

    Use as a context manager; pass :meth:`start` as ``on_run_start`` and
    :meth:`epoch` as ``on_epoch``. Bars go to stderr.
    """

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=_console(stderr=True),
        )
        self._task: Any = None

    def __enter__(self) -> RunProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            # A failed run shows its one-line error, not half-drawn bars.
            for task in self._progress.tasks:
                self._progress.update(task.id, visible=False)
        self._progress.__exit__(exc_type, exc, tb)

    def start(self, label: str, seed: int, epochs: int) -> None:
        """A new bar of ``epochs`` steps for the run ``label`` (seed ``seed``)."""
        if self._task is not None:
            self._progress.update(self._task, visible=True)
        self._task = self._progress.add_task(f"{label} (seed {seed})", total=epochs, info="")

    def epoch(self, epoch: int, record: dict[str, float]) -> None:
        """Advance the current bar and show the epoch's metric and sparsity."""
        if self._task is None:
            self.start("run", 0, epoch + 1)
        info = []
        if "metric" in record:
            info.append(f"metric {record['metric']:.4f}")
        if "sparsity" in record:
            info.append(f"zeros {100 * record['sparsity']:.2f}%")
        self._progress.update(self._task, completed=epoch + 1, info="  ".join(info))


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _print_table(
    console: Any, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    from . import report

    records = [dict(zip(headers, map(str, r), strict=True)) for r in rows]
    report.print_table(console, records, list(headers), title=title)


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- demo


def _method_rows(results: Sequence[Any]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "method",
        "what it does",
        "test accuracy",
        "vs dense",
        "exact zeros",
        "non-zero params",
        "wall time",
    ]
    dense = next((r.accuracy for r in results if r.method == "dense"), None)
    rows = [
        [
            r.method,
            METHOD_NOTES.get(r.method, ""),
            _pct(r.accuracy),
            "" if dense is None else f"{100 * (r.accuracy - dense):+.2f} pt",
            _pct(r.sparsity),
            f"{r.nonzero:,}",
            f"{r.seconds:.1f} s",
        ]
        for r in results
    ]
    return headers, rows


def _demo(args: argparse.Namespace) -> int:
    from . import datasets, experiments

    console = _console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    console.rule("[bold]1. The reference case: L1(0.1) on a tensor, a kernel and an activity")
    ref = experiments.reference_case()
    for name, case in ref.items():
        console.print(f"[bold]{name}[/bold]: {case['formula']} = [bold]{case['value']:.6g}[/bold]")
        if case["explanation"] is not None:
            console.print(case["explanation"])

    epochs = experiments.DEMO_EPOCHS["quick" if args.quick else "full"]
    console.rule("[bold]2. Five ways to a sparse digits MLP (64-256-256-10)")
    if args.quick:
        console.print(f"--quick: a 64-32-10 MLP, {epochs} epochs per method (a smoke test).")
    else:
        console.print(
            f"Each method trains {epochs} epochs with one seed and one setting; the benchmarks "
            "sweep each method's knob over 3 seeds (docs/benchmarks.md)."
        )
    console.print("Exact zeros are counted over the weight matrices; wall time is per method.")
    data = datasets.digits()
    with RunProgress() as progress:
        results = experiments.compare(
            data,
            experiments.demo_plan(args.quick),
            seeds=(0,),
            epochs=epochs,
            on_run_start=progress.start,
            on_epoch=progress.epoch,
        )
    headers, rows = _method_rows(results)
    _print_table(console, "digits: five ways to a sparse network", headers, rows)
    by = {r.method: r for r in results}
    l1 = by["l1_loss"]
    console.print(
        f"L1 in the loss left [bold]{_pct(l1.details['sparsity_before_threshold'])}[/bold] "
        "exact zeros "
        f"(SGD steps oscillate around 0); thresholding at |w| <= {l1.config['tol']:g} made "
        f"{_pct(l1.sparsity)}. The prox makes exact zeros during training."
    )
    _write_demo_report(out, ref, results, epochs, time.perf_counter() - t_start)
    console.print(
        f"Wrote [bold]{out / 'report.md'}[/bold] and its figures "
        f"({time.perf_counter() - t_start:.0f} s in all)."
    )
    return 0


def _demo_figures(out: Path, results: Sequence[Any]) -> list[str]:
    from . import report

    by = {r.method: r for r in results}
    figures = []
    dense = by.get("dense")
    curves = {r.method: [(r.sparsity, r.accuracy)] for r in results if r.method != "dense"}
    if curves:
        figures.append(
            report.plot_pareto(
                curves,
                out / "pareto.png",
                dense_accuracy=dense.accuracy if dense else None,
                title="digits: accuracy vs exact-zero sparsity, one run per method",
            )
        )
    l1 = by.get("l1_loss")
    if l1 is not None and "model_before_threshold" in l1.artifacts:
        figures.append(
            report.plot_magnitudes(
                l1.artifacts["model_before_threshold"],
                out / "magnitudes_l1_loss.png",
                title="L1 in the loss: weights small, none exactly zero (before thresholding)",
            )
        )
    target = by.get("target")
    if target is not None:
        figures.append(
            report.plot_magnitudes(
                target.model,
                out / "magnitudes_target.png",
                title="sparsecraft prox + TargetSparsity: exact zeros",
            )
        )
        history = target.artifacts.get("controller_history") or target.history
        figures.append(
            report.plot_training(
                history,
                out / "training_target.png",
                title="TargetSparsity: measured sparsity follows the ramp",
            )
        )
        figures.append(
            report.plot_layer_density(
                target.model, out / "layer_density_target.png", title="non-zeros per layer (target)"
            )
        )
    return figures


def _write_demo_report(
    out: Path, ref: dict[str, Any], results: Sequence[Any], epochs: int, seconds: float
) -> None:
    figures = _demo_figures(out, results)
    headers, rows = _method_rows(results)
    lines = ["# sparsecraft demo", "", "## 1. The reference case", ""]
    for name, case in ref.items():
        lines.append(f"* **{name}**: {case['formula']} = {case['value']:.6g}")
        if case["explanation"] is not None:
            lines += ["", "```", str(case["explanation"]), "```", ""]
    lines += [
        "",
        f"## 2. Five ways to a sparse digits MLP ({epochs} epochs each, seed 0)",
        "",
        _markdown_table(headers, rows),
        "",
    ]
    l1 = next((r for r in results if r.method == "l1_loss"), None)
    if l1 is not None:
        lines += [
            f"L1 in the loss left {_pct(l1.details['sparsity_before_threshold'])} exact zeros; "
            f"thresholding |w| <= {l1.config['tol']:g} gave {_pct(l1.sparsity)}.",
            "",
        ]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    lines += [
        "",
        f"Total time: {seconds:.0f} s. The benchmarks (60 epochs, 3 seeds, knob sweeps) are in "
        "docs/benchmarks.md.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    import torch

    from . import datasets, experiments

    console = _console()
    data = datasets.load(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with RunProgress() as progress:
        progress.start(f"train {args.data}", args.seed, args.epochs)
        r = experiments.run_spec(
            data,
            model=args.model,
            hidden=args.hidden,
            penalty=args.penalty,
            activity=args.activity,
            target=args.target,
            apply=args.apply,
            optimizer=args.optimizer,
            lr=args.lr,
            mode=args.mode,
            epochs=args.epochs,
            seed=args.seed,
            on_epoch=progress.epoch,
        )
    if r.explanation is not None and r.explanation.rows:
        console.print(r.explanation)
    metric = "test accuracy" if data.task == "classification" else "test MSE"
    value = _pct(r.accuracy) if data.task == "classification" else f"{-r.accuracy:.5g}"
    rows = [
        [metric, value],
        ["exact zeros (weights)", _pct(r.sparsity)],
        ["non-zero params", f"{r.nonzero:,}"],
        ["wall time", f"{r.seconds:.1f} s"],
    ]
    for key in ("autoencoder", "pattern"):
        for k, v in r.details.get(key, {}).items():
            rows.append([f"{key} {k}", f"{v:.4g}"])
    _print_table(console, f"sparsecraft train --data {args.data}", ["", "value"], rows)

    torch.save(r.model.state_dict(), out / "model.pt")
    saved = ["model.pt"]
    try:
        from .export import save
    except ImportError:
        save = None
    if save is not None:
        save(r.model, out / "model.safetensors")
        saved.append("model.safetensors")
    metrics = {
        **r.row(),
        "history": r.history,
        "explanation": r.explanation.to_dict() if r.explanation is not None else None,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable) + "\n")
    _write_train_report(out, args, r, rows, saved)
    console.print(f"Wrote {', '.join(saved)}, metrics.json and report.md to [bold]{out}[/bold].")
    return 0


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _train_figures(out: Path, r: Any) -> list[str]:
    from . import report

    figures = [
        report.plot_training(
            r.artifacts.get("controller_history") or r.history,
            out / "training.png",
            title="sparsity over training",
        ),
        report.plot_layer_density(r.model, out / "layer_density.png"),
        report.plot_magnitudes(r.model, out / "magnitudes.png"),
    ]
    return figures


def _write_train_report(
    out: Path, args: argparse.Namespace, r: Any, rows: list[list[str]], saved: list[str]
) -> None:
    figures = _train_figures(out, r)
    flags = [
        f"--{k} {v}"
        for k, v in vars(args).items()
        if k not in ("func", "command") and v not in (None, False)
    ]
    lines = [
        "# sparsecraft train",
        "",
        f"`sparsecraft train {' '.join(flags)}`",
        "",
        _markdown_table(["", "value"], rows),
        "",
    ]
    if r.explanation is not None and r.explanation.rows:
        lines += [
            "## Regularization terms (at the end of training)",
            "",
            "```",
            str(r.explanation),
            "```",
            "",
        ]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    lines += ["", f"Files: {', '.join(saved)}, metrics.json.", ""]
    (out / "report.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- bench


def _bench_dir(given: str | None) -> Path:
    if given is not None:
        path = Path(given)
    else:
        here = Path.cwd() / "benchmarks"
        path = here if here.is_dir() else Path(__file__).resolve().parents[2] / "benchmarks"
    if not path.is_dir():
        raise FileNotFoundError(
            f"Expected a benchmarks folder. Received: --dir={str(path)!r}, which is not one"
        )
    return path


def _load_suite(folder: Path, name: str) -> Callable[..., dict]:
    path = folder / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected the suite file {path}. Received: --suite={name!r}, which it lacks"
        )
    spec = importlib.util.spec_from_file_location(f"sparsecraft_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module.run


def _summary_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """A suite's ``summary`` rows (a list of flat dicts) or, failing that, its top-level numbers."""
    summary = result.get("summary")
    if isinstance(summary, list) and summary and all(isinstance(s, dict) for s in summary):
        headers = list(dict.fromkeys(k for s in summary for k in s))
        return headers, [[_cell(s.get(h, "")) for h in headers] for s in summary]
    flat = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
    flat.update(
        {
            f"targets.{k}": v
            for k, v in (result.get("targets") or {}).items()
            if isinstance(v, (int, float, str, bool))
        }
    )
    return ["key", "value"], [[k, _cell(v)] for k, v in flat.items()]


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _bench(args: argparse.Namespace) -> int:
    console = _console()
    folder = _bench_dir(args.dir)
    names = SUITES if args.suite == "all" else (args.suite,)
    sections = []
    for name in names:
        run = _load_suite(folder, name)
        console.rule(f"[bold]bench: {name}{' (quick)' if args.quick else ''}")
        t0 = time.perf_counter()
        result = run(quick=args.quick)
        seconds = time.perf_counter() - t0
        headers, rows = _summary_rows(result)
        where = "quick run, no file written" if args.quick else f"results/{name}.json"
        _print_table(console, f"{name} ({seconds:.0f} s; {where})", headers, rows)
        sections.append(f"## {name}\n\n{_markdown_table(headers, rows)}\n")
    if args.quick:
        # A smoke run: its numbers must not replace the results of a real run.
        return 0
    results = folder / "results"
    results.mkdir(exist_ok=True)
    target = results / ("summary.md" if args.suite == "all" else f"{args.suite}.md")
    target.write_text(
        "# sparsecraft benchmarks\n\n"
        + "\n".join(sections)
        + f"\nMachine: {os.cpu_count()} CPU cores.\n"
    )
    console.print(f"Wrote [bold]{target}[/bold].")
    return 0


if __name__ == "__main__":
    sys.exit(main())
