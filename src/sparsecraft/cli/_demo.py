"""``sparsecraft demo``: the reference case, five ways to a sparse digits MLP, export, a report."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._out import discard_out, prepare_out
from ._present import RunProgress, _console, _markdown_table, _pct, _print_table

METHOD_NOTES = {
    "dense": "no penalty",
    "l1_loss": "L1 in the loss, then threshold",
    "magnitude": "one-shot prune + fine-tune",
    "gradual": "gradual prune, cubic schedule",
    "target": "prox L1 + TargetSparsity",
    "prox": "prox L1 at a fixed λ",
    "pat": "torchao PAT",
}
EXPORT_HEADERS = [
    "model",
    "CSR layers",
    "params",
    "FLOPs",
    "file",
    "ms, batch 1",
    "ms, test batch",
    "max abs diff",
]


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


def _export_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = [*EXPORT_HEADERS]
    headers[6] = f"ms, batch {summary['test_batch']}"
    rows = [
        [
            r["model"],
            f"{r['sparse_layers']['batch1']}/{r['sparse_layers']['of']} · "
            f"{r['sparse_layers']['test']}/{r['sparse_layers']['of']}",
            f"{r['params']:,}",
            f"{r['flops']:,}",
            f"{r['file_bytes'] / 1024:,.1f} KiB",
            f"{r['ms_batch1']:.3f}",
            f"{r['ms_test']:.3f}",
            "-" if r["model"] == "original" else f"{r['max_abs_diff']:.1e}",
        ]
        for r in summary["rows"]
    ]
    return headers, rows


def _export_note(summary: dict[str, Any]) -> str:
    s, cut = summary["structured"], summary["cut"]
    threads = summary["threads"]
    return (
        f"{_pct(s['fraction'])} of the weights lie in all-zero rows or columns, "
        f"{_pct(s['removable_fraction'])} outside the model's input columns and output rows "
        f"(compact keeps the input and output shapes). compact removed {_pct(cut['flops'])} "
        f"of the FLOPs and {_pct(cut['params'])} of the parameters (biases included; "
        f"{_pct(s['removable_param_fraction'])} of them lie in removable zero rows/columns). "
        "to_sparse stores a layer as CSR only where that is measured >= 1.1x faster for the "
        "batch (CSR layers: at batch 1 · at the test batch). FLOPs per sample (2 per "
        "multiply-add; a CSR layer counts its stored weights only). Latency in ms: median of "
        f"{summary['repeats']} interleaved rounds, each timed run warm, {threads} "
        f"thread{'s' * (threads != 1)}. Max abs diff: largest output difference from the "
        "original over the test set."
    )


def _demo(args: argparse.Namespace) -> int:
    console = _console()
    out = Path(args.out)
    # Checked before the minute of training; report.md marks an earlier demo's folder.
    created = prepare_out(out, ["report.md"], args.overwrite)
    try:
        return _demo_into(args, out, console)
    except BaseException:
        discard_out(out, created)
        raise


def _demo_into(args: argparse.Namespace, out: Path, console: Any) -> int:
    from .. import datasets, experiments

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
    console.rule("[bold]3. Export: compact and to_sparse of the target model")
    summary = experiments.export_summary(by["target"].model, data, out)
    headers, rows = _export_rows(summary)
    _print_table(console, "target model: original, to_sparse, compact", headers, rows)
    console.print(_export_note(summary))
    _write_demo_report(out, ref, results, epochs, time.perf_counter() - t_start, summary)
    console.print(
        f"Wrote [bold]{out / 'report.md'}[/bold] and its figures "
        f"({time.perf_counter() - t_start:.0f} s in all)."
    )
    return 0


def _demo_figures(out: Path, results: Sequence[Any]) -> list[str]:
    from .. import report

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
    out: Path,
    ref: dict[str, Any],
    results: Sequence[Any],
    epochs: int,
    seconds: float,
    summary: dict[str, Any],
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
    headers, rows = _export_rows(summary)
    files = ", ".join(f"`{r['file']}`" for r in summary["rows"])
    lines += [
        "",
        "## 3. Export: compact and to_sparse of the target model",
        "",
        _markdown_table(headers, rows),
        "",
        _export_note(summary),
        "",
        f"Files (sparsecraft.save, in this folder): {files}.",
        "",
        f"Total time: {seconds:.0f} s. The benchmarks (60 epochs, 3 seeds, knob sweeps) are in "
        "docs/benchmarks.md.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
