"""End to end on the real architectures: regularize → prox training with TargetSparsity →
sparsity → compact → to_sparse → save/load, for a BN-CNN, an LSTM and a tied-embedding transformer.

Each model trains briefly on its embedded task (MNIST-1D or the copy language);
the assertions are what the library promises on any model: the controller
reaches the target in exact zeros, the report counts them, compact keeps the
outputs (within 1e-5) and removes dead structure it can follow, to_sparse
keeps them, and a saved model loads with equal outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft import datasets, experiments


@pytest.fixture(scope="module")
def m1d() -> datasets.Split:
    return datasets.mnist1d()


def _prox_train(net, data, reg, inner, *, target, epochs, batch_size):
    opt = sc.ProximalOptimizer(inner, reg)
    steps = epochs * experiments.steps_per_epoch(data, batch_size)
    ctrl = sc.TargetSparsity(opt, target=target, end_step=max(1, steps * 2 // 3))
    experiments.train(
        net, data, opt, epochs=epochs, batch_size=batch_size, regularizer=reg, controller=ctrl
    )
    ctrl.finalize()
    return ctrl


def _assert_reached(reg, target: float) -> None:
    """finalize() leaves at least round(target·n) zeros (exactly that many in latent mode; in
    forward-backward mode zeros above the target stay), and the controller keeps near it."""
    params = list({id(t.target): t.target for t in reg.terms}.values())
    n = sum(p.numel() for p in params)
    zeros = sum(int((p == 0).sum()) for p in params)
    assert round(target * n) <= zeros <= (target + 0.03) * n


def _export_round_trip(net, x, tmp_path):
    """compact → to_sparse → save/load; returns the compact report."""
    net.eval()
    with torch.no_grad():
        reference = net(x)
    small, report = sc.compact(net, x)
    with torch.no_grad():
        compacted = small(x)
    assert report.max_abs_diff <= 1e-5
    assert (compacted - reference).abs().max() <= 1e-5
    # min_speedup ~0: every layer with >= 50 % zeros goes sparse whatever the timing says,
    # so the sparse layers (not the clock) decide what save/load must handle.
    fast, _ = sc.to_sparse(small, x, repeats=1, warmup=0, min_speedup=1e-9)
    with torch.no_grad():
        sparse_out = fast(x)
    assert (sparse_out - reference).abs().max() <= 1e-5
    sc.save(fast, tmp_path / "model.safetensors")
    loaded = sc.load(tmp_path / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse_out)
    return report


def test_bn_cnn_end_to_end(m1d, tmp_path):
    torch.manual_seed(0)
    net = datasets.cnn1d()
    reg = sc.Regularizer(net)
    reg.add_weight((nn.Conv1d, "weight"), sc.L1(1e-3))
    reg.add_weight((nn.Linear, "weight"), sc.L1(1e-3))
    inner = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    _prox_train(net, m1d, reg, inner, target=0.8, epochs=3, batch_size=100)
    _assert_reached(reg, 0.8)
    assert experiments.evaluate(net, m1d) > 0.25  # chance is 0.1
    x = m1d.X_test[:64]
    report = sc.sparsity(net, example_inputs=x)
    assert report.weight_numel == 12000 and 9600 <= report.weight_zeros <= 9960
    assert report.flops is not None and report.flops_structured <= report.flops
    # A conv channel whose kernel is all zero feeds BatchNorm a constant. Its constant after
    # BN → ReLU is in general not 0, and the next conv pads with zeros: at the borders it would
    # read 0 instead of the constant, so folding it into that conv's bias is not exact
    # (docs/export.md). compact keeps such a channel and says why; outputs stay exact.
    # A channel whose constant after the trained BN → ReLU is positive (it does not depend on
    # the kernel): most are, which one depends on the training.
    ch = next(c for c in range(32) if _bn_relu_constant(net, 3, c) > 0)
    with torch.no_grad():
        net.body[3].weight[ch] = 0.0
    shift = net.body[4].bias[ch].item()
    _, report = sc.compact(net.eval(), x)
    assert "body.3" not in {c.name for c in report.layers}
    assert [n for n, r in report.skipped if "zero-padded" in r] == ["body.6"]
    # When BN's scale is 0 and its shift makes the channel ≤ 0 (ReLU gives exactly 0), as
    # structured pruning of a BN-CNN channel leaves it (Liu et al. 2017, network slimming),
    # the constant is 0, folds exactly into the padded conv, and compact removes the channel:
    # its kernel row and bias in body.3, its BN entries, its input column in body.6.
    with torch.no_grad():
        net.body[4].weight[ch] = 0.0
        net.body[4].bias[ch] = -abs(shift)
    assert _bn_relu_constant(net, 3, ch) == 0.0
    report = _export_round_trip(net, x, tmp_path)
    resized = {c.name for c in report.layers}
    assert "body.3" in resized and "body.6" in resized
    assert report.params_before - report.params_after >= 5 + 1 + 2 + 32 * 5


def _bn_relu_constant(net, conv: int, channel: int) -> float:
    """ReLU(BN(bias)) of a conv channel whose kernel is 0, with BN's running statistics."""
    b, bn = net.body[conv].bias[channel], net.body[conv + 1]
    z = (b - bn.running_mean[channel]) / torch.sqrt(bn.running_var[channel] + bn.eps)
    return torch.relu(z * bn.weight[channel] + bn.bias[channel]).item()


def test_lstm_end_to_end(m1d, tmp_path):
    torch.manual_seed(0)
    net = datasets.make_model("lstm", m1d, (32,))
    reg = sc.Regularizer(net)
    for name, _ in experiments.matrices(net):
        reg.add_weight(name, sc.L1(1e-3))
    assert {t.name.split(":")[-1] for t in reg.terms} >= {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}
    inner = torch.optim.AdamW(net.parameters(), lr=3e-3)
    _prox_train(net, m1d, reg, inner, target=0.5, epochs=3, batch_size=100)
    _assert_reached(reg, 0.5)
    assert experiments.evaluate(net, m1d) > 0.2  # chance is 0.1
    x = m1d.X_test[:32]
    counted = {r.name: r for r in sc.sparsity(net, example_inputs=x).rows}
    assert counted["rnn.weight_hh_l0"].zeros == int((net.rnn.weight_hh_l0 == 0).sum()) > 0
    _export_round_trip(net, x, tmp_path)


def test_tied_transformer_end_to_end(tmp_path):
    data = datasets.copy_task(n_train=1024, n_test=128)
    torch.manual_seed(0)
    net = datasets.make_model("transformer", data)
    reg = sc.Regularizer(net)
    # The head is tied to the embedding: both selectors reach one tensor, which gets one term.
    reg.add_weight((nn.Embedding, "weight"), sc.L1(1e-3))
    reg.add_weight((nn.Linear, "weight"), sc.L1(1e-3))
    reg.add_weight("*.in_proj_weight", sc.L1(1e-3))
    targets = [id(t.target) for t in reg.terms]
    assert len(targets) == len(set(targets))
    assert id(net.embed.weight) in targets
    inner = torch.optim.AdamW(net.parameters(), lr=3e-3)
    _prox_train(net, data, reg, inner, target=0.5, epochs=3, batch_size=64)
    assert net.head.weight is net.embed.weight
    _assert_reached(reg, 0.5)
    assert experiments.evaluate(net, data) > 0.5  # chance is 1/16
    x = data.X_test[:16]
    names = [r.name for r in sc.sparsity(net, example_inputs=x).rows]
    assert "embed.weight" in names and "head.weight" not in names  # the tied matrix counts once
    # A feed-forward neuron with zero input weights and bias is dead: compact must remove it.
    with torch.no_grad():
        net.layers[0].linear1.weight[7] = 0.0
        net.layers[0].linear1.bias[7] = 0.0
    report = _export_round_trip(net, x, tmp_path)
    # at least that neuron: its linear1 row and bias and its linear2 column
    assert any(c.name.startswith("layers.0") for c in report.layers)
    assert report.params_after <= report.params_before - (64 + 1 + 64)


@pytest.mark.parametrize(
    "argv",
    [
        ["--data", "mnist1d", "--model", "cnn", "--target", "0.5"],
        ["--data", "copy", "--target", "0.5", "--optimizer", "adamw", "--lr", "3e-3"],
    ],
    ids=["mnist1d-cnn", "copy-transformer"],
)
def test_cli_train_on_the_real_tasks(tmp_path, capsys, argv):
    import json

    from sparsecraft import cli

    out = tmp_path / "run"
    assert cli.main(["train", *argv, "--epochs", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == argv[1]
    assert metrics["model"] == ("cnn" if argv[1] == "mnist1d" else "transformer")
    assert 0.5 <= metrics["sparsity"] <= 0.53
    assert (out / "model.pt").is_file() and (out / "report.md").is_file()
    printed = capsys.readouterr().out
    assert ("test perplexity" in printed) == (argv[1] == "copy")
