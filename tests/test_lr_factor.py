"""``TargetSparsity.lr_factor``: an LR schedule for short runs with adaptive optimizers.

The measurements (the transformer, the LSTM, digits; short and long runs) are
in docs/optim.md, seventh round. Here: the values along the ramp, the hold and
the fine-tuning, that ``LambdaLR`` with it drives the steps and the fine-tuning
goes on at the same learning rate, the errors, and, on digits in a run too
short for the sparse network at the user's learning rate, the gain it is for.
"""

from __future__ import annotations

import pytest
import torch

from sparsecraft import datasets, experiments
from sparsecraft.control import TargetSparsity
from test_adamw import _batches, _setup, _step


def test_the_factor_follows_the_ramp_and_hands_over_to_fine_tune_scale():
    _, _, opt = _setup()
    ctrl = TargetSparsity(opt, target=0.96, end_step=20)
    assert ctrl.freeze_step == 27
    assert ctrl.lr_factor(0) == 1.0  # the ramp starts from 0 % zeros
    for t in (5, 10, 19, 26):
        assert ctrl.lr_factor(t) == pytest.approx((1 - ctrl.target_at(t)) ** -0.5)
    assert ctrl.lr_factor(20) == pytest.approx(5.0)  # 4 % of the weights left: × 1/sqrt(0.04)
    assert ctrl.lr_factor(27) == ctrl.lr_factor(1000) == 1.0  # frozen: fine_tune_scale's part
    assert ctrl.fine_tune_scale == pytest.approx(5.0)  # ... the same value: no jump at the freeze
    _, _, opt = _setup()
    track = TargetSparsity(opt, target=0.96, end_step=20, hold="track")
    assert track.lr_factor(1000) == pytest.approx(5.0)  # no freeze: the factor holds


def test_lambda_lr_with_it_drives_the_steps_and_the_fine_tuning_keeps_the_lr():
    model, _, opt = _setup(lr=1e-3)
    ctrl = TargetSparsity(opt, target=0.9, end_step=8)  # the zeros are fixed at step 11
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ctrl.lr_factor)
    used = []
    for x, y in _batches(14):
        # the lr of this step: the group's, times the frozen steps' own scale once frozen
        used.append(opt.param_groups[0]["lr"] * (ctrl.fine_tune_scale if opt.support_frozen else 1.0))
        _step(model, opt, x, y)
        ctrl.step()
        sched.step()
    expected = [1e-3 * (1 - ctrl.target_at(t)) ** -0.5 for t in range(11)] + [1e-3 * 0.1 ** -0.5] * 3
    assert used == pytest.approx(expected)
    assert used[10] == pytest.approx(used[11])  # no jump at the freeze
    assert opt.support_frozen


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_a_bad_step_raises(bad):
    _, _, opt = _setup()
    ctrl = TargetSparsity(opt, target=0.5, end_step=10)
    with pytest.raises(ValueError, match=r"step"):
        ctrl.lr_factor(bad)


def test_sgd_is_refused():
    _, _, opt = _setup(opt_cls=torch.optim.SGD)
    ctrl = TargetSparsity(opt, target=0.5, end_step=10)
    with pytest.raises(ValueError, match=r"adaptive inner optimizer .* Received: SGD"):
        torch.optim.lr_scheduler.LambdaLR(opt, ctrl.lr_factor)


def test_a_short_adamw_run_on_digits_learns_only_with_it():
    """10 epochs with AdamW at lr 1e-3 to 99 % zeros: too short for the sparse network
    at the user's lr (seed 0: 74.7 %; 10 seeds 81.7 % against 97.7 % in 60 epochs);
    with the factor 96 % (10 seeds: 96.1 %). ``run_target(lr_factor=True)`` is the
    loop above with ``LambdaLR(opt, ctrl.lr_factor)`` stepped after every step."""
    data = datasets.digits()
    runs = {f: experiments.run_target(data, 0.99, optimizer="adamw", lr=1e-3, epochs=10, lr_factor=f)
            for f in (False, True)}
    for r in runs.values():
        assert r.sparsity == pytest.approx(0.99, abs=1e-4)
    assert runs[True].config["lr_factor"] is True and "lr_factor" not in runs[False].config
    assert runs[True].accuracy > 0.93
    assert runs[True].accuracy > runs[False].accuracy + 0.1


def test_the_command_line_flag_runs_it_and_refuses_what_it_cannot_scale(tmp_path, capsys):
    import json

    from sparsecraft import cli

    n = torch.get_num_threads()
    try:
        out = tmp_path / "run"
        args = ["train", "--data", "digits", "--hidden", "16", "--epochs", "2", "--target", "0.9",
                "--optimizer", "adamw", "--lr-factor", "--out", str(out)]
        assert cli.main(args) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["lr_factor"] is True and metrics["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert "--lr-factor" in (out / "report.md").read_text()  # the command that reruns it
        capsys.readouterr()
        for extra, said in ((["--optimizer", "adamw"], "--target None"),
                            (["--target", "0.9"], "--optimizer sgd")):
            assert cli.main(["train", "--epochs", "1", "--lr-factor", *extra, "--out",
                             str(tmp_path / "bad")]) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and "Expected --target and --optimizer adam or adamw" in err
            assert said in err
            assert not (tmp_path / "bad").exists()
    finally:
        torch.set_num_threads(n)  # main() sets torch's thread count


def test_run_spec_refuses_it_without_a_target():
    with pytest.raises(ValueError, match=r"Expected a target with lr_factor=True.*Received: target=None"):
        experiments.run_spec(datasets.digits(), penalty="l1:1e-2", optimizer="adamw", lr_factor=True)
