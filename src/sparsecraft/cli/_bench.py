"""``sparsecraft bench``: load the benchmark suites from benchmarks/, run them and summarise."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._present import _console, _markdown_table, _print_table

SUITES = ("weights", "activity", "overhead", "export", "control", "architectures")


def _bench_dir(given: str | None) -> Path:
    if given is not None:
        path = Path(given)
    else:
        here = Path.cwd() / "benchmarks"
        path = here if here.is_dir() else Path(__file__).resolve().parents[3] / "benchmarks"
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
        if args.summarize:
            saved = folder / "results" / f"{name}.json"
            if not saved.is_file():
                console.print(f"[red]No saved results for {name}: expected {saved}; run the suite first[/red]")
                return 2
            result, seconds, where = json.loads(saved.read_text()), 0.0, f"saved results/{name}.json"
        else:
            run = _load_suite(folder, name)
            console.rule(f"[bold]bench: {name}{' (quick)' if args.quick else ''}")
            t0 = time.perf_counter()
            result = run(quick=args.quick)
            seconds = time.perf_counter() - t0
            where = "quick run, no file written" if args.quick else f"results/{name}.json"
        headers, rows = _summary_rows(result)
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
