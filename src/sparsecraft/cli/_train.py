"""``sparsecraft train``: train one model with a penalty and/or a target; save it with a report."""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path
from typing import Any

from ._out import discard_out, prepare_out
from ._present import RunProgress, _console, _markdown_table, _pct, _print_table

# What a run writes into --out: an earlier run's copies are replaced only with --overwrite.
TRAIN_FILES = [
    "model.pt",
    "model.safetensors",
    "metrics.json",
    "report.md",
    "training.png",
    "layer_density.png",
    "magnitudes.png",
]


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that would change nothing (a dense model trained while asking for sparsity)."""
    given = [f"--{k} {getattr(args, k)}" for k in ("apply", "mode") if getattr(args, k) is not None]
    if given and args.penalty is None and args.target is None:
        raise ValueError(
            f"Expected a weight penalty for {' and '.join(given)}. Received: no --penalty (and no "
            "--target), so the model would train dense; add e.g. --penalty l1:1e-3"
        )
    if args.lr_factor and (args.target is None or args.optimizer == "sgd"):
        raise ValueError(
            f"Expected --target and --optimizer adam or adamw for --lr-factor (it scales an adaptive "
            f"step as the ramp removes weights). Received: --target {args.target} --optimizer {args.optimizer}"
        )
    if args.apply == "loss" and args.mode is not None:
        raise ValueError(
            f"Expected --mode only with --apply prox (it is the prox's mode). Received: --apply loss "
            f"--mode {args.mode}"
        )


def _train(args: argparse.Namespace) -> int:
    _check_flags(args)
    out = Path(args.out)
    created = prepare_out(out, TRAIN_FILES, args.overwrite)
    try:
        return _train_into(args, out)
    except BaseException:
        discard_out(out, created)  # a failed run leaves no empty folder behind
        raise


def _train_into(args: argparse.Namespace, out: Path) -> int:
    import torch

    from .. import datasets, experiments

    console = _console()
    data = datasets.load(args.data)
    with RunProgress() as progress:
        progress.start(f"train {args.data}", args.seed, args.epochs)
        r = experiments.run_spec(
            data,
            model=args.model,
            hidden=args.hidden,
            penalty=args.penalty,
            activity=args.activity,
            target=args.target,
            apply=args.apply or "prox",
            optimizer=args.optimizer,
            lr=args.lr,
            mode=args.mode or "latent",
            epochs=args.epochs,
            seed=args.seed,
            lr_factor=args.lr_factor,
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
    if data.task == "classification" and data.y_train.ndim == 2 and r.history:
        # A language model: the per-token loss on the predictable targets, and its perplexity.
        loss = r.history[-1]["test_loss"]
        rows += [["test loss (per token)", f"{loss:.4f}"], ["test perplexity", f"{math.exp(loss):.3f}"]]
    for key in ("autoencoder", "pattern"):
        for k, v in r.details.get(key, {}).items():
            rows.append([f"{key} {k}", f"{v:.4g}"])
    _print_table(console, f"sparsecraft train --data {args.data}", ["", "value"], rows)

    torch.save(r.model.state_dict(), out / "model.pt")
    saved = ["model.pt"]
    try:
        from ..export import save
    except ImportError:
        save = None
    if save is not None:
        try:
            save(r.model, out / "model.safetensors")
            saved.append("model.safetensors")
        except TypeError as err:  # a structure export.save cannot describe; the weights are saved
            reason = " ".join(str(err).split())
            console.print(f"model.safetensors not written ({reason}); model.pt has the weights.")
    metrics = {
        **r.row(),
        "history": r.history,
        "explanation": r.explanation.to_dict() if r.explanation is not None else None,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable) + "\n")
    _write_train_report(out, args, r, rows, saved)
    console.print(f"Wrote {', '.join(saved)}, metrics.json and report.md to [bold]{out}[/bold].")
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command that reruns ``args``, quoted for a POSIX shell, as the parser reads it back.

    Tuples are written as the parser takes them (``--hidden 32,16``), true
    switches as the bare flag; options left unset are left out.
    """
    words = ["sparsecraft", args.command]
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (tuple, list)):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _train_figures(out: Path, r: Any) -> list[str]:
    from .. import report

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
    lines = [
        "# sparsecraft train",
        "",
        f"`{command_line(args)}`",
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
