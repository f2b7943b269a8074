"""Tests of sparsecraft.experiments: each method's promise, against an outside count or library."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sparsecraft import datasets, experiments
from sparsecraft.experiments import _pruning

TINY = {"hidden": (16,), "epochs": 2}


@pytest.fixture(scope="module")
def digits():
    return datasets.digits()


@pytest.fixture(scope="module")
def teacher():
    return datasets.teacher_student(
        n_in=12, hidden=(6,), n_out=3, density=0.3, n_train=512, n_test=256, task="regression"
    )


# --------------------------------------------------------------------------- measuring


def test_weight_sparsity_counts_torch_prune_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    sparsity, nonzero = experiments.weight_sparsity(model)
    mask = model[0].weight_mask
    expected_zeros = int((mask == 0).sum())
    assert expected_zeros == 40
    assert sparsity == pytest.approx(expected_zeros / (80 + 32))
    dense = sum(
        int(torch.count_nonzero(p)) for n, p in model.named_parameters() if "weight_orig" not in n
    )
    assert nonzero == dense + int(mask.sum())
    assert experiments.weight_names(model) == ["0.weight", "2.weight"]


def test_cubic_sparsity_matches_zhu_gupta_formula():
    final, end = 0.9, 100
    for t in (0, 10, 50, 99, 100, 150):
        p = min(t / end, 1.0)
        assert experiments.cubic_sparsity(t, final, end) == pytest.approx(
            final + (0 - final) * (1 - p) ** 3
        )
    values = [experiments.cubic_sparsity(t, final, end) for t in range(0, 120)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[0] == 0 and values[-1] == final


def test_global_masks_keep_the_largest_magnitudes():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(7, 5, generator=g), torch.randn(3, 11, generator=g)]
    masks = _pruning._global_masks(weights, 0.6)
    flat = np.concatenate([w.abs().flatten().numpy() for w in weights])
    k = round(0.6 * flat.size)
    cut = np.sort(flat)[k - 1]
    kept = np.concatenate([m.flatten().numpy() for m in masks])
    assert (~kept).sum() == k
    np.testing.assert_array_equal(kept, flat > cut)


# --------------------------------------------------------------------------- methods


def test_magnitude_prunes_globally_then_keeps_the_mask(digits):
    dense = experiments.run_dense(digits, **TINY)
    before = copy.deepcopy(dense.model)
    r = experiments.run_magnitude(digits, 0.8, finetune_epochs=2, dense=dense, **TINY)
    # The dense result is not modified.
    for a, b in zip(before.parameters(), dense.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # Zeros are exactly the 80 % smallest magnitudes of the dense weights (one global ranking).
    weights = [m.weight.detach() for m in before.modules() if isinstance(m, nn.Linear)]
    flat = torch.cat([w.abs().flatten() for w in weights])
    cut = flat.sort().values[round(0.8 * flat.numel()) - 1]
    pruned = [m.weight for m in r.model.modules() if isinstance(m, nn.Linear)]
    for w_dense, w in zip(weights, pruned, strict=True):
        assert torch.equal(w == 0, w_dense.abs() <= cut)
    assert r.sparsity == pytest.approx(0.8, abs=1 / flat.numel())
    assert not any("_orig" in k or "_mask" in k for k in r.model.state_dict())
    assert r.seconds >= dense.seconds
    assert r.details["dense_accuracy"] == dense.accuracy


def test_gradual_reaches_the_final_sparsity_and_removes_its_hooks(digits):
    r = experiments.run_gradual(digits, 0.9, frequency=5, ramp_fraction=0.5, hidden=(16,), epochs=4)
    assert r.sparsity == pytest.approx(0.9, abs=1e-3)
    # The cubic ramp shows in the history: sparsity grows epoch by epoch up to the target.
    assert r.history[0]["sparsity"] < r.history[-1]["sparsity"]
    for m in r.model.modules():
        if isinstance(m, nn.Linear):
            assert not m.weight._backward_hooks


def test_l1_loss_leaves_no_exact_zero_until_thresholded(digits):
    runs = experiments.run_l1_loss_thresholds(digits, 1e-3, (1e-3, 1e-2, 5e-2), **TINY)
    assert [r.details["sparsity_before_threshold"] for r in runs] == [0.0] * 3
    assert runs[0].sparsity < runs[1].sparsity < runs[2].sparsity
    for r in runs:
        assert r.details["max_removed"] <= r.config["tol"]
    single = experiments.run_l1_loss(digits, 1e-3, tol=1e-2, **TINY)
    assert single.sparsity == pytest.approx(runs[1].sparsity)


@pytest.mark.skipif(not experiments.pat_available(), reason="torchao PAT not installed")
def test_prox_latent_matches_torchao_pat(digits):
    ours = experiments.run_prox(digits, 2e-2, mode="latent", **TINY)
    pat = experiments.run_pat(digits, 2e-2, **TINY)
    assert ours.sparsity > 0.05
    assert ours.nonzero == pat.nonzero
    for a, b in zip(ours.model.parameters(), pat.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_target_ends_at_the_requested_sparsity(digits):
    r = experiments.run_target(digits, 0.9, **TINY)
    numel = sum(p.numel() for p in r.model.parameters() if p.ndim >= 2)
    # finalize() makes the count exact: round(0.9 * numel) zeros.
    assert r.sparsity == pytest.approx(round(0.9 * numel) / numel)
    assert "target_now" in r.history[-1]


def test_bad_knobs_raise_value_errors(digits):
    with pytest.raises(ValueError, match="sparsity"):
        experiments.run_magnitude(digits, 1.0, **TINY)
    with pytest.raises(ValueError, match="frequency"):
        experiments.run_gradual(digits, 0.5, frequency=0, **TINY)
    with pytest.raises(ValueError, match="target"):
        experiments.run_target(digits, 0.0, **TINY)
    with pytest.raises(ValueError, match="optimizer"):
        experiments.run_dense(digits, optimizer="lbfgs", **TINY)
    with pytest.raises(ValueError, match="method"):
        experiments.compare(digits, {"nope": {}})


# --------------------------------------------------------------------------- comparing


def test_compare_reuses_the_dense_run_for_magnitude(digits):
    started = []
    results = experiments.compare(
        digits,
        [("dense", {}), ("magnitude", {"sparsity": 0.5, "finetune_epochs": 1})],
        seeds=(0, 1),
        on_run_start=lambda *a: started.append(a),
        **TINY,
    )
    assert [r.method for r in results] == ["dense", "magnitude", "dense", "magnitude"]
    assert [s[0] for s in started] == ["dense", "magnitude"] * 2
    for dense, mag in (results[:2], results[2:]):
        assert mag.details["dense_accuracy"] == dense.accuracy
        assert mag.details["dense_seconds"] == dense.seconds
    assert results[0].config["seed"] == 0 and results[2].config["seed"] == 1


def test_summarize_and_best_within():
    def run(method, acc, sp, seed, **cfg):
        return experiments.RunResult(
            method, acc, sp, 10, 1.0, nn.Linear(1, 1), config={"seed": seed, **cfg}
        )

    rows = experiments.summarize(
        [
            run("prox", 0.9, 0.5, 0, lam=1),
            run("prox", 0.8, 0.7, 1, lam=1),
            run("prox", 0.7, 0.9, 0, lam=2),
        ]
    )
    assert len(rows) == 2
    assert rows[0]["accuracy"] == pytest.approx(0.85) and rows[0]["sparsity"] == pytest.approx(0.6)
    assert rows[0]["accuracy_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert rows[0]["seeds"] == 2
    assert experiments.best_within(rows, 0.86, 0.01)["lam"] == 1
    assert experiments.best_within(rows, 0.71, 0.01)["lam"] == 2
    assert experiments.best_within(rows, 0.99, 0.01) is None


def test_pattern_f1_is_invariant_to_hidden_unit_order(teacher):
    t = teacher.meta["teacher"]
    student = copy.deepcopy(t)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        student[0].weight.copy_(t[0].weight[perm])
        student[0].bias.copy_(t[0].bias[perm])
        student[2].weight.copy_(t[2].weight[:, perm])
    assert experiments.pattern_f1(student, teacher)["f1"] == pytest.approx(1.0)
    # One kept weight removed: recall drops by exactly one over the number kept.
    kept = sum(int((m.weight != 0).sum()) for m in t if isinstance(m, nn.Linear))
    with torch.no_grad():
        row, col = (student[2].weight != 0).nonzero()[0]
        student[2].weight[row, col] = 0.0
    score = experiments.pattern_f1(student, teacher)
    assert score["recall"] == pytest.approx((kept - 1) / kept)
    assert score["precision"] == pytest.approx(1.0)
    # A dense student has every weight: precision is the teacher's density.
    dense = experiments.build_model(teacher, (6,), 0)
    assert experiments.pattern_f1(dense, teacher)["precision"] == pytest.approx(
        teacher.meta["density"]
    )


def test_pattern_f1_refuses_data_without_teacher(digits):
    with pytest.raises(ValueError, match="teacher"):
        experiments.pattern_f1(experiments.build_model(digits, (8,)), digits)


# --------------------------------------------------------------------------- activity


def test_topk_keeps_k_values_per_row():
    x = torch.randn(5, 12)
    y = experiments.TopK(3)(x)
    assert ((y != 0).sum(1) <= 3).all()
    expected = torch.relu(x) * (x >= x.topk(3, dim=1).values[:, -1:])
    torch.testing.assert_close(y, expected)


def test_autoencoder_metrics_against_a_perfect_and_a_random_decoder():
    data = datasets.superposition(n_features=8, d=4, n_train=64, n_test=512, p=0.2)
    model = experiments.Autoencoder(4, 8)
    with torch.no_grad():
        model.decoder.weight.copy_(data.meta["features"] * 2.0)  # scale does not matter for cosines
    m = experiments.autoencoder_metrics(model, data)
    assert m["recovered"] == 1.0 and m["mean_cosine"] == pytest.approx(1.0)
    x = data.X_test
    with torch.no_grad():
        x_hat = model(x)
    assert m["fvu"] == pytest.approx(
        float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()), rel=1e-5
    )
    with torch.no_grad():
        codes = model.encode(x)
    assert m["l0"] == pytest.approx(float((codes != 0).sum(1).float().mean()))
    assert m["dead"] == int(((codes != 0).sum(0) == 0).sum())
    torch.manual_seed(0)
    random = experiments.Autoencoder(4, 8)
    assert experiments.autoencoder_metrics(random, data)["recovered"] < 1.0


def test_weighted_l1_autoencoder_finds_the_features():
    data = datasets.superposition(n_features=16, d=8, n_train=4096, n_test=1024)
    r = experiments.train_autoencoder(data, "l1_weighted", latents=32, lam=0.2, epochs=40)
    assert r.metrics["recovered"] >= 0.85
    assert r.metrics["l0"] < 8  # far sparser than the dense code of 32 latents
    with pytest.raises(ValueError, match="kind"):
        experiments.train_autoencoder(data, "l2")


# --------------------------------------------------------------------------- train command and demo


def test_run_spec_penalty_activity_and_errors(digits):
    r = experiments.run_spec(digits, penalty="l1:1e-2", activity="l1:1e-4", **TINY)
    modes = {row["kind"]: row["mode"] for row in r.explanation.rows}
    assert modes == {"weight": "prox", "activity": "loss"}
    assert r.sparsity > 0 and r.details["sparsity_report"]
    in_loss = experiments.run_spec(digits, penalty="l1:1e-2", apply="loss", **TINY)
    assert in_loss.sparsity == 0.0
    with pytest.raises(ValueError, match="autoencod"):
        experiments.run_spec(digits, model="autoencoder", **TINY)
    with pytest.raises(ValueError, match="prox"):
        experiments.run_spec(digits, penalty="l1:1e-2", apply="loss", target=0.5, **TINY)
    with pytest.raises(ValueError, match="penalty name"):
        experiments.run_spec(digits, penalty="l3:1", **TINY)


def test_reference_case_numbers():
    ref = experiments.reference_case()
    assert ref["tensor"]["value"] == pytest.approx(4.8)
    kernel_rows = ref["kernel"]["explanation"].rows
    assert len(kernel_rows) == 1 and kernel_rows[0]["kind"] == "weight"
    assert ref["kernel"]["value"] == pytest.approx(kernel_rows[0]["value"])
    assert ref["activity"]["explanation"].rows[0]["formula"].endswith("/ 2")
    assert math.isfinite(ref["activity"]["value"]) and ref["activity"]["value"] > 0
