"""The real-architecture tasks: MNIST-1D, the copy language, and their models."""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import pytest
import torch
from torch import nn

from sparsecraft import datasets
from sparsecraft.datasets import (
    IGNORE,
    CausalTransformer,
    RecurrentClassifier,
    cnn1d,
    copy_task,
    default_model,
    make_model,
    mnist1d,
)


@pytest.fixture(scope="module")
def m1d() -> datasets.Split:
    return mnist1d()


# --------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_is_the_package_data_set(m1d):
    from mnist1d.data import get_dataset_args, make_dataset

    assert (m1d.n_train, m1d.n_test, m1d.n_features, m1d.n_classes) == (4000, 1000, 40, 10)
    assert m1d.X_train.dtype == torch.float32 and m1d.y_train.dtype == torch.int64
    ref = make_dataset(get_dataset_args())  # the package, called directly with its defaults
    assert torch.equal(m1d.X_train, torch.as_tensor(ref["x"], dtype=torch.float32))
    assert torch.equal(m1d.y_test, torch.as_tensor(ref["y_test"]))
    assert sorted(set(m1d.y_train.tolist())) == list(range(10))
    assert m1d.meta["templates"].shape == (10, 12)


def test_mnist1d_offline_no_files_rng_restored(m1d, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d() opened a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    a = mnist1d(seed=7)
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert os.listdir(tmp_path) == []
    assert a.meta["seed"] == 7 and not torch.equal(a.X_train, m1d.X_train)  # the seed is used
    with pytest.raises(TypeError, match="Received: seed='1'"):
        mnist1d(seed="1")


def test_load_and_default_models(m1d):
    assert datasets.load("copy", length=3, n_train=4, n_test=2).name == "copy"
    assert default_model(m1d) == "cnn" and default_model("copy") == "transformer"
    assert default_model("digits") == "mlp"
    with pytest.raises(ValueError, match="Received: data='teacher'; its model is 'mlp'"):
        make_model("cnn", datasets.teacher_student(n_train=8, n_test=8))
    with pytest.raises(ValueError, match="Expected a model name"):
        make_model("resnet", m1d)
    with pytest.raises(ValueError, match="at most 1 width"):
        make_model("lstm", m1d, (8, 8))


# --------------------------------------------------------------------------- copy task


def test_copy_task_structure():
    data = copy_task(length=5, vocab=7, n_train=64, n_test=16, seed=3)
    x, y = data.X_train, data.y_train
    assert x.shape == y.shape == (64, 10) and data.n_classes == 8 and data.n_features == 10
    assert bool((x[:, 5] == 7).all())  # <sep>
    assert bool((y[:, :5] == IGNORE).all())
    assert torch.equal(y[:, 5:], x[:, :5])  # the second half copies the first
    assert torch.equal(x[:, 6:], x[:, :4])
    assert int(x[:, :5].max()) < 7 and int(x.min()) >= 0
    again = copy_task(length=5, vocab=7, n_train=64, n_test=16, seed=3)
    assert torch.equal(again.X_test, data.X_test)
    assert not torch.equal(copy_task(length=5, vocab=7, n_train=64, seed=4).X_train, x)
    with pytest.raises(ValueError, match="Received: vocab=1"):
        copy_task(vocab=1)
    with pytest.raises(ValueError, match="Received: length=0"):
        copy_task(length=0)


# --------------------------------------------------------------------------- models


def test_cnn1d_layout(m1d):
    torch.manual_seed(0)
    net = cnn1d()
    assert [type(m) for m in net.body[:3]] == [nn.Conv1d, nn.BatchNorm1d, nn.ReLU]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in net.modules()) == 3
    weights = sum(p.numel() for p in net.parameters() if p.ndim >= 2)
    assert weights == 5 * 32 + 2 * 5 * 32 * 32 + 32 * 5 * 10 == 12000
    assert net(m1d.X_test[:7]).shape == (7, 10)
    assert torch.equal(net(m1d.X_test[:7]), net.body(m1d.X_test[:7, None, :]))
    assert make_model("cnn", m1d, (8,)).body[0].out_channels == 8


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_classifier(m1d, kind):
    net = make_model(kind, m1d)
    assert isinstance(net, RecurrentClassifier) and net.rnn.batch_first
    assert isinstance(net.rnn, nn.LSTM if kind == "lstm" else nn.GRU)
    x = m1d.X_test[:3]
    out, _ = net.rnn(x.reshape(3, 10, 4))  # 10 steps of 4 values
    assert torch.allclose(net(x), net.head(out[:, -1]))
    with pytest.raises(ValueError, match="Received: kind='rnn'"):
        RecurrentClassifier(kind="rnn")


def test_transformer_tied_and_causal():
    data = copy_task(length=4, vocab=6, n_train=8, n_test=4)
    torch.manual_seed(0)
    net = make_model("transformer", data).eval()
    assert isinstance(net, CausalTransformer)
    assert net.head.weight is net.embed.weight
    names = [n for n, _ in net.named_parameters()]
    assert "embed.weight" in names and "head.weight" not in names
    x = data.X_test.clone()
    logits = net(x)
    assert logits.shape == (4, 8, 7)
    x[:, 5] = (x[:, 5] + 1) % 6  # a later token changes nothing before it
    changed = net(x)
    assert torch.allclose(changed[:, :5], logits[:, :5], atol=1e-6)
    assert not torch.allclose(changed[:, 5:], logits[:, 5:])
    with pytest.raises(ValueError, match="multiple of n_heads"):
        CausalTransformer(10, 8, d_model=30, n_heads=4)


def test_weight_sparsity_counts_a_tied_matrix_once():
    from sparsecraft.experiments import weight_names, weight_sparsity

    data = copy_task(length=3, vocab=5, n_train=4, n_test=2)
    net = make_model("transformer", data)
    with torch.no_grad():
        net.embed.weight.zero_()  # also the head's weight
    matrices = [p for p in net.parameters() if p.ndim >= 2]
    expected = net.embed.weight.numel() / sum(p.numel() for p in matrices)
    assert weight_sparsity(net)[0] == pytest.approx(expected)
    assert weight_names(net).count("embed.weight") == 1 and "head.weight" not in weight_names(net)
