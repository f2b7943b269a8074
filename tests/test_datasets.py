from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from sparsecraft.datasets import Split, digits, load, mlp, superposition, teacher_student


@pytest.fixture(scope="module")
def digit_split() -> Split:
    return digits()


@pytest.fixture(scope="module")
def teacher() -> Split:
    return teacher_student()


# --------------------------------------------------------------------------- mlp


def test_mlp_structure_and_names():
    model = mlp(64, (256, 256), 10)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")}
    assert shapes == {"0.weight": (256, 64), "2.weight": (256, 256), "4.weight": (10, 256)}
    assert [type(m) for m in mlp(3, 5, 2)] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [type(m) for m in mlp(3, (), 2)] == [nn.Linear]
    for bad in [dict(n_in=0), dict(hidden=(4, -1)), dict(n_out=2.0), dict(hidden=(True,))]:
        kw = {"n_in": 3, "hidden": (4,), "n_out": 2, **bad}
        with pytest.raises(ValueError, match="Expected .* positive int"):
            mlp(**kw)
    with pytest.raises(TypeError, match="Received: hidden='8'"):
        mlp(3, "8", 2)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_standardisation(digit_split):
    s = digit_split
    assert (s.name, s.n_features, s.n_classes, s.task) == ("digits", 64, 10, "classification")
    assert s.X_train.shape == (1347, 64) and s.X_test.shape == (450, 64)
    assert s.X_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert torch.isfinite(s.X_train).all() and torch.isfinite(s.X_test).all()
    assert s.X_train.mean(0).abs().max() < 1e-5
    std = s.X_train.std(0, unbiased=False)
    constant = s.meta["std"] == 1.0
    assert constant.sum() >= 1  # some border pixels are always 0 in the training set
    assert torch.allclose(std[~constant], torch.ones(int((~constant).sum())), atol=1e-5)
    assert (s.X_train[:, constant] == 0).all()


def test_digits_matches_sklearn_split_and_uses_train_statistics(digit_split):
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    mean, std = digit_split.meta["mean"].double(), digit_split.meta["std"].double()
    assert np.allclose(mean.numpy(), X_tr.mean(0)) and torch.equal(
        digit_split.y_test, torch.as_tensor(y_te)
    )
    raw_test = digit_split.X_test.double() * std + mean  # undo with the TRAIN statistics
    assert np.allclose(raw_test.numpy(), X_te, atol=1e-4)
    assert np.array_equal(digit_split.y_train.numpy(), y_tr)


def test_digits_split_is_stratified_and_deterministic(digit_split):
    _, y = load_digits(return_X_y=True)
    full = np.bincount(y, minlength=10)
    test = np.bincount(digit_split.y_test.numpy(), minlength=10)
    assert np.all(np.abs(test - full * 0.25) <= 1)  # each class keeps its share
    again = digits(seed=0)
    other = digits(seed=1, test_fraction=0.5)
    assert torch.equal(again.X_train, digit_split.X_train)
    assert torch.equal(again.y_test, digit_split.y_test)
    assert other.X_test.shape == (899, 64)
    assert not torch.equal(digits(seed=1).y_train, digit_split.y_train)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan"), "0.2"])
def test_digits_bad_fraction_raises(bad):
    with pytest.raises(ValueError, match=r"Expected test_fraction in \(0, 1\)"):
        digits(test_fraction=bad)


# --------------------------------------------------------------------------- teacher-student


def test_teacher_shapes_dtypes_and_labels(teacher):
    s = teacher
    assert s.X_train.shape == (8192, 64) and s.X_test.shape == (2048, 64)
    assert s.X_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert (s.n_features, s.n_classes) == (64, 10)
    with torch.no_grad():
        assert torch.equal(s.meta["teacher"](s.X_train).argmax(1), s.y_train)
        assert torch.equal(s.meta["teacher"](s.X_test).argmax(1), s.y_test)
    assert not any(p.requires_grad for p in s.meta["teacher"].parameters())


def test_teacher_masks_match_weights_and_student_names(teacher):
    masks = teacher.meta["masks"]
    student = dict(mlp(64, (128,), 10).named_parameters())
    assert list(masks) == ["0.weight", "2.weight"]
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == student[name].shape
        weight = dict(teacher.meta["teacher"].named_parameters())[name]
        assert torch.equal(weight != 0, mask)
        assert mask.any(1).all()  # every unit has inputs
    assert masks["2.weight"].any(0).all()  # every hidden unit is used by an output
    assert torch.equal(teacher.meta["relevant_inputs"], masks["0.weight"].any(0))


@pytest.mark.parametrize(
    ("kw", "tol"),
    [({}, 0.005), ({"hidden": (64, 32), "n_out": 5, "density": 0.3, "n_train": 512}, 0.005)],
)
def test_teacher_density_is_requested_density(kw, tol):
    s = teacher_student(n_test=64, **{"n_train": 1024, **kw})
    density = kw.get("density", 0.1)
    for i, mask in enumerate(s.meta["masks"].values()):
        rows, cols = mask.shape
        cover = max(rows, cols) if i > 0 else rows  # the documented floor
        assert int(mask.sum()) == max(round(density * mask.numel()), cover)
        if cover <= density * mask.numel():
            assert abs(mask.float().mean().item() - density) < tol


def test_teacher_classes_balanced_and_hidden_units_alive(teacher):
    share = torch.bincount(teacher.y_train, minlength=10).float() / teacher.n_train * 10
    assert share.min() > 0.9 and share.max() < 1.1
    with torch.no_grad():
        hidden = teacher.meta["teacher"][:2](teacher.X_train)
    active = (hidden > 0).float().mean(0)
    assert active.min() > 0.4 and active.max() < 0.6  # bias = -median pre-activation


def test_teacher_regression_targets_are_standardised_outputs():
    s = teacher_student(task="regression", n_out=3, n_train=4096, n_test=256)
    assert s.n_classes is None and s.task == "regression"
    assert s.y_train.shape == (4096, 3) and s.y_train.dtype == torch.float32
    assert s.y_train.mean(0).abs().max() < 0.1
    assert ((s.y_train.std(0) - 1).abs() < 0.1).all()
    with torch.no_grad():
        assert torch.allclose(s.meta["teacher"](s.X_test), s.y_test)


def test_teacher_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = teacher_student(n_in=8, hidden=16, n_out=3, n_train=64, n_test=16, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = teacher_student(n_in=8, hidden=16, n_out=3, n_train=64, n_test=16, seed=5)
    c = teacher_student(n_in=8, hidden=16, n_out=3, n_train=64, n_test=16, seed=6)
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_train, b.y_train)
    assert all(torch.equal(a.meta["masks"][k], b.meta["masks"][k]) for k in a.meta["masks"])
    assert not torch.equal(a.X_train, c.X_train)
    assert not torch.equal(a.meta["masks"]["0.weight"], c.meta["masks"]["0.weight"])


@pytest.fixture
def one_thread():
    # Tiny matmuls on a shared 2-core machine: OpenMP threads contend and run 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_teacher_labels_are_learnable(one_thread):
    # A small student beats chance (25 %) by far: the labels are a function, not noise.
    torch.manual_seed(0)
    s = teacher_student(n_in=16, hidden=(32,), n_out=4, n_train=2048, n_test=1024, seed=1)
    student = mlp(16, (32,), 4)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(student(s.X_train), s.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (student(s.X_test).argmax(1) == s.y_test).float().mean().item()
    assert accuracy > 0.7  # measured 0.83-0.84 over three student seeds


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"density": 0.0}, r"density in \(0, 1\]"),
        ({"density": 1.5}, r"density in \(0, 1\]"),
        ({"n_train": 0}, "n_train to be a positive int"),
        ({"n_in": -3}, "n_in to be a positive int"),
        ({"hidden": (8, 0)}, "positive int"),
        ({"task": "ranking"}, "Received: task='ranking'"),
        ({"n_out": 1}, "n_out >= 2 for classification"),
    ],
)
def test_teacher_bad_args_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        teacher_student(**kw)


# --------------------------------------------------------------------------- superposition


def test_superposition_ground_truth():
    s = superposition(n_features=40, d=10, p=0.05, n_train=8000, n_test=2000, seed=3)
    W, f = s.meta["features"], s.meta["f_train"]
    assert W.shape == (10, 40) and s.n_features == 10 and s.n_classes is None
    assert torch.allclose(W.norm(dim=0), torch.ones(40), atol=1e-6)
    assert f.shape == (8000, 40) and s.meta["f_test"].shape == (2000, 40)
    assert (f >= 0).all() and (f < 1).all()
    active = (f > 0).float().mean().item()
    sigma = math.sqrt(0.05 * 0.95 / f.numel())
    assert abs(active - 0.05) < 5 * sigma
    magnitudes = f[f > 0]
    assert abs(magnitudes.mean().item() - 0.5) < 0.02  # Uniform(0, 1)
    assert torch.allclose(s.X_train, f @ W.T, atol=1e-6)
    assert torch.equal(s.y_train, s.X_train) and torch.equal(s.y_test, s.X_test)
    assert s.X_train.dtype == torch.float32 and s.y_test.dtype == torch.float32
    assert torch.equal(s.meta["importance"], torch.ones(40))
    again = superposition(n_features=40, d=10, p=0.05, n_train=8000, n_test=2000, seed=3)
    assert torch.equal(again.X_test, s.X_test)


def test_superposition_importance_options():
    kw = {"n_features": 8, "d": 4, "n_train": 16, "n_test": 8}
    decayed = superposition(importance=0.5, **kw).meta["importance"]
    assert torch.allclose(decayed, 0.5 ** torch.arange(8.0))
    given = superposition(importance=[1, 2, 3, 4, 5, 6, 7, 8], **kw).meta["importance"]
    assert given.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="8 finite values"):
        superposition(importance=[1.0, 2.0], **kw)
    with pytest.raises(ValueError, match="8 finite values"):
        superposition(importance=[-1.0] * 8, **kw)
    with pytest.raises(ValueError, match=r"importance in \(0, 1\]"):
        superposition(importance=2.0, **kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"d": 64}, "Expected d < n_features"),
        ({"d": 0}, "d to be a positive int"),
        ({"p": 0.0}, r"p in \(0, 1\]"),
        ({"p": float("nan")}, r"p in \(0, 1\]"),
        ({"n_test": -1}, "n_test to be a positive int"),
    ],
)
def test_superposition_bad_args_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        superposition(**kw)


# --------------------------------------------------------------------------- load


def test_load_dispatches_and_rejects_unknown_names():
    s = load("superposition", n_features=8, d=4, n_train=16, n_test=8)
    assert s.name == "superposition" and s.n_features == 4
    t = load("teacher", n_in=4, hidden=8, n_out=2, n_train=32, n_test=8)
    assert t.name == "teacher" and t.n_classes == 2
    with pytest.raises(ValueError, match=r"\['copy', 'digits', 'mnist1d', 'superposition', 'teacher'\]"):
        load("mnist")
    assert "n_train=16" in repr(s) and "features" in repr(s)
