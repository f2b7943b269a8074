"""Tests of the ``sparsecraft`` command: demo end to end, train on each data set, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsecraft import cli

ROOT = Path(__file__).resolve().parents[1]
DEMO_COLUMNS = [
    "method",
    "what it does",
    "test accuracy",
    "vs dense",
    "exact zeros",
    "non-zero params",
    "wall time",
]
EXPORT_COLUMNS = ["model", "CSR layers", "params", "FLOPs", "file", "ms, batch 1", "ms, batch 450"]
EXPORT_MODELS = ["original", "to_sparse", "compact", "compact + to_sparse"]


@pytest.fixture(autouse=True)
def _restore_threads():
    # main() sets torch's thread count (default 1); give the rest of the suite its own back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_quick_writes_the_report_and_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4.8" in printed  # the reference tensor case
    for column in DEMO_COLUMNS:
        assert column in printed
    report = (out / "report.md").read_text()
    header = "| " + " | ".join(DEMO_COLUMNS) + " |"
    assert header in report
    export_header = next(line for line in report.splitlines() if line.startswith("| model |"))
    rows = [
        line
        for line in report.split("## 3.")[0].splitlines()
        if line.startswith("| ") and line != header
    ]
    assert [r.split("|")[1].strip() for r in rows] == [
        "dense",
        "l1_loss",
        "magnitude",
        "gradual",
        "target",
    ]
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d\d %", cells[2]) and re.fullmatch(r"\d+\.\d\d %", cells[4])
        assert re.fullmatch(r"[+-]\d+\.\d\d pt", cells[3])
    # The L1-in-the-loss row is reported with its 0 % exact zeros before thresholding.
    assert "0.00 % exact zeros" in report
    for figure in (
        "pareto.png",
        "magnitudes_l1_loss.png",
        "magnitudes_target.png",
        "training_target.png",
        "layer_density_target.png",
    ):
        assert (out / figure).stat().st_size > 1000
        assert f"({figure})" in report
    # 3. Export: the target model before and after compact / to_sparse.
    for column in EXPORT_COLUMNS:
        assert column in printed and f"| {column}" in export_header
    export = {}
    for line in report.split("## 3.")[1].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in EXPORT_MODELS:
            export[cells[0]] = cells
    assert list(export) == EXPORT_MODELS
    assert "median of 15 interleaved rounds" in report and "{" not in report.split("## 3.")[1]
    params = {k: int(v[2].replace(",", "")) for k, v in export.items()}
    flops = {k: int(v[3].replace(",", "")) for k, v in export.items()}
    assert params["compact"] <= params["original"] and flops["compact"] < flops["original"]
    assert float(export["compact"][7]) <= 1e-5  # compact keeps the outputs
    for model, cells in export.items():
        assert re.fullmatch(r"\d/\d · \d/\d", cells[1])
        assert re.fullmatch(r"[\d,.]+ KiB", cells[4])
        assert float(cells[5]) > 0 and float(cells[6]) > 0
        stem = "target" + ("" if model == "original" else "_" + model.replace(" + ", "_"))
        assert (out / f"{stem}.safetensors").stat().st_size > 0
    from sparsecraft.export import load

    small = load(out / "target_compact.safetensors")
    assert sum(p.numel() for p in small.parameters()) == params["compact"]


@pytest.mark.parametrize(
    ("data", "extra"),
    [
        ("digits", ["--penalty", "l1:1e-2", "--hidden", "16"]),
        ("teacher", ["--penalty", "l1:3e-3", "--target", "0.5"]),
        (
            "superposition",
            [
                "--model",
                "autoencoder",
                "--activity",
                "l1:0.1",
                "--hidden",
                "16",
                "--optimizer",
                "adam",
            ],
        ),
    ],
)
def test_train_writes_model_metrics_and_report(tmp_path, capsys, data, extra):
    out = tmp_path / data
    args = ["train", "--data", data, "--epochs", "1", "--out", str(out), *extra]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == data and metrics["epochs"] == 1 and len(metrics["history"]) == 1
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # The saved weights are the ones measured: same exact-zero count.
    zeros = sum(int((v == 0).sum()) for k, v in state.items() if v.ndim >= 2)
    numel = sum(v.numel() for k, v in state.items() if v.ndim >= 2)
    assert metrics["sparsity"] == pytest.approx(zeros / numel)
    from sparsecraft.export import load

    loaded = load(out / "model.safetensors")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k])
    report = (out / "report.md").read_text()
    assert "sparsecraft train" in report and "(training.png)" in report
    assert (out / "training.png").exists()
    if data == "teacher":
        assert metrics["sparsity"] >= 0.5 - 1e-3  # the target was reached (finalize)
        assert "pattern" in metrics
    if data == "superposition":
        assert 0 <= metrics["autoencoder"]["recovered"] <= 1
        assert metrics["explanation"]["terms"][0]["kind"] == "activity"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["train", "--data", "mnist"],
            ("invalid choice: 'mnist'", "digits", "teacher", "superposition"),
        ),
        (["train", "--penalty", "l3:1e-3"], "Expected a penalty name among"),
        (["train", "--penalty", "l1:abc"], "Expected a number"),
        (["train", "--target", "1.5"], "expected a sparsity fraction in (0, 1)"),
        (["train", "--epochs", "0"], "expected a positive integer"),
        (["train", "--optimizer", "rmsprop"], ("choose from", "adam", "sgd")),
        (
            ["bench", "--suite", "nope"],
            ("choose from", "weights", "activity", "overhead", "export", "control", "all"),
        ),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, args, expected):
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err
    for part in (expected,) if isinstance(expected, str) else expected:
        assert part in err
    assert err.startswith("sparsecraft")


def test_library_errors_are_one_line_too(tmp_path, capsys):
    # A spec that parses but cannot reach a target: refused by the library, in one line.
    args = [
        "train",
        "--data",
        "digits",
        "--penalty",
        "l2:1e-3",
        "--target",
        "0.9",
        "--epochs",
        "1",
        "--hidden",
        "8",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sparsecraft train: error: Expected")
    assert (
        cli.main(
            [
                "train",
                "--data",
                "digits",
                "--model",
                "autoencoder",
                "--epochs",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "autoencod" in capsys.readouterr().err


def test_console_script_has_no_traceback_on_bad_flags():
    exe = Path(sys.executable).with_name("sparsecraft")
    if not exe.exists():
        pytest.skip("console script not installed")
    proc = subprocess.run(
        [str(exe), "train", "--data", "nope"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_bench_dispatches_to_a_suite_file(tmp_path, capsys):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "weights.py").write_text(
        "def run(quick=False):\n"
        "    return {'summary': [{'method': 'toy', 'quick': quick, 'value': 0.5}]}\n"
    )
    assert cli.main(["bench", "--suite", "weights", "--quick", "--dir", str(folder)]) == 0
    assert "| toy | True | 0.5 |" not in capsys.readouterr().out  # rich table, not markdown
    assert not (folder / "results").exists()  # a quick run writes no summary
    assert cli.main(["bench", "--suite", "weights", "--dir", str(folder)]) == 0
    table = (folder / "results" / "weights.md").read_text()
    assert "| method | quick | value |" in table and "| toy | False | 0.5 |" in table
    assert cli.main(["bench", "--suite", "activity", "--dir", str(folder)]) == 2
    assert "activity.py" in capsys.readouterr().err


def test_bench_summarize_rebuilds_the_markdown_from_saved_results_without_running(tmp_path, capsys):
    folder = tmp_path / "benchmarks"
    (folder / "results").mkdir(parents=True)
    # A suite file that would fail if run: --summarize must only read the saved JSON.
    (folder / "weights.py").write_text("def run(quick=False):\n    raise RuntimeError('ran')\n")
    (folder / "results" / "weights.json").write_text(json.dumps({"summary": [{"method": "toy", "value": 0.25}]}))
    assert cli.main(["bench", "--suite", "weights", "--summarize", "--dir", str(folder)]) == 0
    assert "| toy | 0.25 |" in (folder / "results" / "weights.md").read_text()
    assert cli.main(["bench", "--suite", "activity", "--summarize", "--dir", str(folder)]) == 2
    assert "activity.json" in capsys.readouterr().out
    # The two flags exclude each other (a usage error: exit 2, argparse's message).
    assert cli.main(["bench", "--summarize", "--quick", "--dir", str(folder)]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
