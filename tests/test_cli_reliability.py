"""The ``sparsecraft`` command never loses a run or reports a failure as success.

Checks of ``--out`` happen before training; a diverged run exits non-zero
and saves nothing; a run whose weights are all zero still writes its
report; the command recorded in report.md runs again as written.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch

from sparsecraft import cli, experiments, report
from sparsecraft.cli._main import _parser


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a run starts: these arguments must be refused before training."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(experiments, "run_spec", refuse)
    monkeypatch.setattr(experiments, "compare", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_all_zero_weights_still_write_the_report_and_rerunnable_command(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--penalty", "l1:10", "--epochs", "1", "--hidden", "32,16", "--out", str(out)]
    assert cli.main(argv) == 0
    metrics = (out / "metrics.json").read_text()
    assert '"sparsity": 1.0' in metrics  # every weight is zero
    text = (out / "report.md").read_text()
    assert (out / "training.png").stat().st_size > 1000
    # The recorded command is read back by the CLI's own parser into the same arguments.
    line = next(s for s in text.splitlines() if s.startswith("`sparsecraft train"))
    words = shlex.split(line.strip("`"))
    assert words[:1] == ["sparsecraft"] and "--hidden" in words
    again = vars(_parser().parse_args(words[1:]))
    want = vars(_parser().parse_args(argv))
    assert again.pop("func") is want.pop("func")
    assert again == want and again["hidden"] == (32, 16)


@pytest.mark.parametrize(
    "history",
    [
        [{"epoch": 1, "sparsity": 1.0, "metric": 0.1}],
        [{"step": 1, "measured": 1.0, "target_now": 1.0, "scale": 1.0}],
        [{"epoch": 1, "sparsity": 0.95}, {"epoch": 2, "sparsity": 1.0}],
    ],
)
def test_training_figure_at_full_sparsity(tmp_path, history):
    path = report.plot_training(history, tmp_path / "t.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diverged_run_exits_1_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "diverged"
    argv = ["train", "--lr", "1e6", "--epochs", "1", "--hidden", "16", "--out", str(out)]
    assert cli.main(argv) == 1
    err = one_line_error(capsys)
    assert err.startswith("sparsecraft train: error: Expected a finite loss") and "diverged" in err
    assert not out.exists()  # the folder this run created is gone, no NaN file left


def test_train_stops_before_a_non_finite_loss_reaches_the_weights():
    from sparsecraft.datasets import digits

    data = digits()
    model = experiments.build_model(data, (8,), 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # a step would change every weight
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")  # x @ W gives inf/NaN logits: loss NaN at once
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="finite loss"):
        experiments.train(model, data, opt, epochs=1)
    for n, p in model.named_parameters():  # no backward, no step: nothing else became NaN
        assert torch.equal(p, before[n]), n


def test_non_finite_weights_after_a_finite_loss_are_caught(monkeypatch):
    from sparsecraft.datasets import digits

    data = digits()
    model = experiments.build_model(data, (8,), 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def poison():
        with torch.no_grad():
            model[2].bias.fill_(float("nan"))  # after the last step of the epoch

    steps = experiments.steps_per_epoch(data)
    calls = []
    with pytest.raises(FloatingPointError, match=r"2\.bias"):
        experiments.train(model, data, opt, epochs=1,
                          after_step=lambda: calls.append(1) or (len(calls) == steps and poison()))


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    afile = tmp_path / "results"
    afile.write_text("not a folder")
    assert cli.main(["train", "--out", str(afile), "--epochs", "1"]) == 2
    assert "is a file" in one_line_error(capsys)
    assert cli.main(["train", "--out", str(afile / "sub"), "--epochs", "1"]) == 2
    assert "can be written" in one_line_error(capsys)
    assert cli.main(["demo", "--quick", "--out", str(afile)]) == 2
    assert "is a file" in one_line_error(capsys)
    assert afile.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused_before_training(tmp_path, capsys, no_training):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert cli.main(["train", "--out", str(folder), "--epochs", "1"]) == 2
        assert "can be written" in one_line_error(capsys)
    finally:
        folder.chmod(0o700)


def test_earlier_results_need_overwrite(tmp_path, capsys, no_training):
    out = tmp_path / "done"
    out.mkdir()
    (out / "report.md").write_text("an earlier run")
    assert cli.main(["train", "--out", str(out), "--epochs", "1"]) == 2
    err = one_line_error(capsys)
    assert "report.md" in err and "--overwrite" in err
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert (out / "report.md").read_text() == "an earlier run"
    # With --overwrite the checks pass and training starts (here: refused by the fixture).
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["train", "--out", str(out), "--epochs", "1", "--overwrite"])


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--threads", "100000"], "expected a thread count from 1 to"),
        (["--threads", "0"], "expected a positive integer"),
        (["--apply", "loss"], "Expected a weight penalty for --apply loss"),
        (["--mode", "forward_backward"], "Expected a weight penalty for --mode forward_backward"),
        (["--penalty", "l1:1e-3", "--apply", "loss", "--mode", "latent"], "--mode only with"),
    ],
)
def test_flags_that_would_crash_or_do_nothing_are_refused(tmp_path, capsys, no_training, extra,
                                                          expected):
    out = tmp_path / "never"
    assert cli.main(["train", "--out", str(out), "--epochs", "1", *extra]) == 2
    assert expected in one_line_error(capsys)
    assert not out.exists()
