"""Regularizer on real architectures: tuple outputs, tied weights, selectors, compile, Keras layers.

Expected values are torch expressions of the documented formulas on the
outputs the module returned, or Keras's own ``layer.losses`` (Keras 3 on the
torch backend, imported inside the tests that need it).
"""

from __future__ import annotations

import ast
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft import select
from sparsecraft.regularizer import Regularizer

N, T, F, H = 3, 5, 4, 6


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- tuple outputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_penalises_its_output_divided_by_the_batch(batch_first: bool) -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(F, H, num_layers=2, batch_first=batch_first)
    reg = Regularizer(lstm)
    default = reg.add_activity(lstm, sc.L1(0.1))
    h_n = reg.add_activity(lstm, sc.L1(0.1), output="h_n")
    c_n = reg.add_activity(lstm, sc.L2(0.1), output="c_n")
    every = reg.add_activity(lstm, sc.L1(0.1), output="all")
    last = reg.add_activity(lstm, sc.L1(0.1), output=lambda o: o[1][0][-1])  # (N, H): dim 0
    x = _x(N, T, F) if batch_first else _x(T, N, F)
    out, (h, c) = lstm(x)
    torch.testing.assert_close(default.current(), 0.1 * out.abs().sum() / N)
    # h_n and c_n are (num_layers, N, H): divided by N, not by num_layers.
    torch.testing.assert_close(h_n.current(), 0.1 * h.abs().sum() / N)
    torch.testing.assert_close(c_n.current(), 0.1 * c.square().sum() / N)
    torch.testing.assert_close(every.current(), 0.1 * (out.abs().sum() + h.abs().sum() + c.abs().sum()) / N)
    torch.testing.assert_close(last.current(), 0.1 * h[-1].abs().sum() / N)
    formulas = {r["where"]: r["formula"] for r in reg.explain().rows}
    assert formulas["LSTM"] == f"0.1·Σ|out| / {N}"  # one call: no "Σ over 3 calls"
    assert formulas["LSTM[all]"] == f"0.1·Σ|out| / {N}" and "LSTM[h_n]" in formulas


def test_gru_mha_and_transformer_layers_respect_batch_first() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(F, H)  # (T, N, H)
    mha = nn.MultiheadAttention(8, 2)  # (L, N, E), need_weights=True by default
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True), 1,
                                enable_nested_tensor=False)
    model = nn.ModuleDict({"gru": gru, "mha": mha, "layer": layer, "enc": enc})
    reg = Regularizer(model)
    terms = {
        "gru": reg.add_activity("gru", sc.L1(0.1)),
        "mha": reg.add_activity("mha", sc.L2(0.1)),
        "weights": reg.add_activity("mha", sc.L2(0.1), output="attn_output_weights"),
        "layer": reg.add_activity("layer", sc.L1(0.1)),
        "enc": reg.add_activity("enc", sc.L1(0.1)),
    }
    seq = _x(T, N, 8, seed=1)
    out_gru, _ = gru(_x(T, N, F))
    attn, weights = mha(seq, seq, seq)
    out_layer = layer(seq)
    out_enc = enc(seq.transpose(0, 1))
    torch.testing.assert_close(terms["gru"].current(), 0.1 * out_gru.abs().sum() / N)
    # The attention weights are not added to the output's term (L2 3.21 vs 2.12 in issue 11).
    torch.testing.assert_close(terms["mha"].current(), 0.1 * attn.square().sum() / N)
    torch.testing.assert_close(terms["weights"].current(), 0.1 * weights.square().sum() / N)
    torch.testing.assert_close(terms["layer"].current(), 0.1 * out_layer.abs().sum() / N)
    torch.testing.assert_close(terms["enc"].current(), 0.1 * out_enc.abs().sum() / N)
    assert [t.last_batch for t in terms.values()] == [N] * 5


def test_output_selector_errors_and_batch_dim_override() -> None:
    lstm = nn.LSTM(F, H)
    reg = Regularizer(lstm)
    with pytest.raises(ValueError, match=r"Expected output= to name a part .*'c_n'.*Received: output='cell'"):
        reg.add_activity(lstm, sc.L1(0.1), output="cell")
    with pytest.raises(TypeError, match=r"Received: output=1.5"):
        reg.add_activity(lstm, sc.L1(0.1), output=1.5)
    with pytest.raises(TypeError, match=r"Received: batch_dim='1'"):
        reg.add_activity(lstm, sc.L1(0.1), batch_dim="1")
    assert reg.terms == ()
    lin = nn.Linear(F, H)
    term = Regularizer(lin).add_activity(lin, sc.L1(0.1), batch_dim=1)  # (T, N, F) data
    out = lin(_x(T, N, F))
    torch.testing.assert_close(term.current(), 0.1 * out.abs().sum() / N)
    bad = Regularizer(lin).add_activity(lin, sc.L1(0.1), output=2)
    with pytest.raises(ValueError, match=r"output=2 to select a part of the output of Linear"):
        lin(_x(2, F))
    del bad


# --- tied weights -----------------------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.emb(tokens)))


def test_tied_weight_has_one_term_under_both_names() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    reg = Regularizer(model)
    (term,) = reg.add_weight((nn.Linear, "weight"), sc.L1(0.1))
    assert term.where == "out.weight" and term.target is model.emb.weight
    with pytest.warns(UserWarning, match=r"emb\.weight is the tensor of weight:out\.weight.*skipped"):
        assert reg.add_weight((nn.Embedding, "weight"), sc.L1(0.1)) == []
    torch.testing.assert_close(reg.loss(), 0.1 * model.emb.weight.abs().sum())  # once, not twice
    (row,) = reg.explain().rows
    assert row["where"] == "out.weight = emb.weight"
    # A different penalty on the same tensor is refused, naming both terms, and adds nothing.
    with pytest.raises(ValueError, match=r"emb\.weight already has weight:out\.weight = L1\(l1=0\.1\)"):
        reg.add_weight("emb.weight", sc.L2(0.1))
    assert len(reg.terms) == 1
    # The prox optimizer binds the single term (no "combine them" error).
    opt = sc.ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), reg)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert term.prox and int((model.emb.weight == 0).sum()) > 0


def test_module_name_selector_finds_a_tied_weight() -> None:
    model = TiedLM()
    (by_name,) = Regularizer(model).add_weight("out", sc.L1(0.1))
    (by_module,) = Regularizer(model).add_weight(model.out, sc.L1(0.1))
    (by_param,) = Regularizer(model).add_weight("out.weight", sc.L1(0.1))
    assert {by_name.where, by_module.where, by_param.where} == {"out.weight"}
    assert by_name.target is model.emb.weight and by_name.aliases == ("emb.weight",)
    both = Regularizer(model).add_weight(select.matrices(), sc.L1(0.1))
    assert [t.where_text for t in both] == ["emb.weight = out.weight"]


# --- selectors --------------------------------------------------------------------------------
class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)


ZOO_MATRICES = [
    "emb.weight", "conv.weight", "attn.in_proj_weight", "attn.out_proj.weight",
    "rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight",
]


def _where(terms) -> list[str]:
    return [t.where for t in terms]


def test_select_matrices_and_norms() -> None:
    model = Zoo()
    assert _where(Regularizer(model).add_weight(select.matrices(), sc.L1(0.1))) == ZOO_MATRICES
    assert _where(Regularizer(model).add_weight(select.matrices(embeddings=False), "l1")) == ZOO_MATRICES[1:]
    assert _where(Regularizer(model).add_weight(select.norms(), "l1")) == [
        "bn.weight", "bn.bias", "ln.weight", "ln.bias"]
    # "*.weight" includes norm scales and embeddings; exclude= takes them out.
    every = _where(Regularizer(model).add_weight("*.weight", "l1"))
    assert "bn.weight" in every and "ln.weight" in every
    for exclude in [(nn.LayerNorm, nn.BatchNorm1d), select.norms(), ["bn", "ln"]]:
        kept = _where(Regularizer(model).add_weight("*.weight", "l1", exclude=exclude))
        assert kept == ["emb.weight", "conv.weight", "attn.out_proj.weight", "head.weight"], exclude
    with pytest.raises(TypeError, match="embeddings"):
        select.matrices(embeddings="no")


def test_predicates_lists_pairs_and_frozen_parameters() -> None:
    model = Zoo()
    reg = Regularizer(model)
    assert _where(reg.add_weight(lambda name, p: p.ndim == 3, "l1")) == ["conv.weight"]
    assert _where(reg.add_weight([nn.Linear, "emb"], "l2")) == [
        "attn.out_proj.weight", "head.weight", "emb.weight"]
    assert _where(Regularizer(model).add_weight((nn.Linear, nn.Conv1d), "l2", exclude="attn")) == [
        "head.weight", "conv.weight"]
    assert _where(reg.add_weight((nn.Linear, "bias"), "l2")) == ["attn.out_proj.bias", "head.bias"]
    assert _where(reg.add_weight(("rnn.bias_ih_l0", "rnn.bias_hh_l0"), "l1")) == [
        "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
    model.conv.requires_grad_(False)
    frozen = Regularizer(model)
    assert _where(frozen.add_weight(["conv", "head"], "l1", trainable_only=True)) == ["head.weight"]
    with pytest.raises(ValueError, match=r"none left after .*trainable_only=True \(frozen: \['conv.weight'\]\)"):
        frozen.add_weight("conv", "l2", trainable_only=True)
    with pytest.raises(ValueError, match="Close parameter names"):
        frozen.add_weight("head", "l1", exclude="haed")  # a typo in exclude= is not ignored
    # Without the flag a frozen parameter gets a term, and the prox refuses it with the advice.
    frozen.add_weight("conv", "l2")
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"conv\.weight \(frozen\).*trainable_only=True"):
        sc.ProximalOptimizer(torch.optim.SGD(trainable, lr=0.1), frozen)


def test_empty_exclusion_result_and_bad_types() -> None:
    model = Zoo()
    reg = Regularizer(model)
    with pytest.raises(ValueError, match=r"none left after exclude="):
        reg.add_weight(nn.Linear, "l1", exclude=nn.Module)  # every module: nothing left
    with pytest.raises(ValueError, match=r"which matches no parameter of the model"):
        reg.add_weight(lambda name, p: p.ndim > 4, "l1")
    with pytest.raises(TypeError, match="trainable_only"):
        reg.add_weight(nn.Linear, "l1", trainable_only="yes")
    with pytest.raises(TypeError, match="predicate"):
        reg.add_weight(3.0, "l1")
    assert reg.terms == ()


# --- torch.compile ----------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(torch.tanh(self.fc(x)))))  # fc called twice


def test_compiled_model_with_weight_and_activity_terms_compiles_once() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model, eager = Block(), Block()
        eager.load_state_dict(model.state_dict())
        regs = []
        for m in (model, eager):
            r = Regularizer(m)
            r.add_weight(select.matrices(), sc.L1(0.01))
            r.add_activity("fc", sc.L1(0.1))
            r.add_activity("out", sc.L2(0.1))
            regs.append(r)
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter)
        for step in range(10):
            x = _x(5, 6, seed=step)
            got = compiled(x).square().mean() + regs[0].loss()
            want = eager(x).square().mean() + regs[1].loss()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
            # Cleared at each outermost forward; fc, called twice, contributes twice.
            assert [len(t.captured) for t in regs[0].terms if t.kind == "activity"] == [2, 1]
        assert counter.frame_count == 1  # before the fix: 8 recompiles in 12 steps, then eager
    finally:
        torch._dynamo.reset()


# --- sparsity(model, example_inputs) ----------------------------------------------------------
def test_sparsity_takes_example_inputs_second_and_tol_by_keyword() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:3] = 0.0
    x = _x(2, 4)
    report = sc.sparsity(model, x)
    _, compacted = sc.compact(model, x)
    assert report.flops == compacted.flops_before == 2 * 2 * (4 * 8 + 8 * 3)
    assert report.flops_structured < report.flops
    with pytest.raises(TypeError, match="positional"):
        sc.sparsity(model, x, 0.1)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"Received: a Tensor of shape \(2, 4\)$"):
        sc.sparsity(model, tol=x)  # type: ignore[arg-type]


# --- Keras 3 layers and variables (torch backend) ---------------------------------------------
@pytest.fixture
def keras():
    if os.environ.get("KERAS_BACKEND", "torch") != "torch":
        pytest.skip("these tests need Keras on the torch backend")
    os.environ["KERAS_BACKEND"] = "torch"
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported with another backend")
    return keras


def _keras_losses(layer) -> float:
    assert layer.losses, "the Keras layer recorded no loss: the case tests nothing"
    return float(sum(float(v.detach()) for v in layer.losses))


def test_keras_layers_and_variables_give_keras_losses(keras) -> None:
    regs = keras.regularizers  # (keras.utils.set_random_seed would import TensorFlow: seconds)
    init = keras.initializers
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, name="d1", kernel_initializer=init.GlorotUniform(seed=1),
                           kernel_regularizer=regs.L1(0.1),
                           bias_initializer="ones", bias_regularizer=regs.L2(0.2),
                           activity_regularizer=regs.L1(0.3)),
        keras.layers.Dense(3, name="d2", kernel_initializer=init.GlorotUniform(seed=2),
                           kernel_regularizer=regs.L1L2(0.01, 0.02)),
    ], name="sequential")  # named: Keras numbers unnamed models per process (sequential_2, ...)
    d1, d2 = model.layers
    reg = Regularizer(model)
    (k1,) = reg.add_weight(d1, sc.L1(0.1))
    (b1,) = reg.add_weight((d1, "bias"), sc.L2(0.2))
    act = reg.add_activity(d1, sc.L1(0.3))
    (k2,) = reg.add_weight(d2.kernel, sc.L1L2(0.01, 0.02))
    assert [k1.where, b1.where, act.where, k2.where] == [
        "sequential/d1/kernel", "sequential/d1/bias", "sequential/d1", "sequential/d2/kernel"]
    assert k1.target is d1.kernel.value
    x = keras.ops.convert_to_tensor(_x(7, 4).numpy())
    model(x)
    for layer, terms in [(d1, [k1, b1, act]), (d2, [k2])]:
        got = float(sum(t.current() for t in terms).detach())
        assert got == pytest.approx(_keras_losses(layer), rel=1e-6)
    assert float(reg.loss().detach()) == pytest.approx(_keras_losses(model), rel=1e-6)
    # Names and module types resolve in Keras's own namespace.
    names = Regularizer(model)
    assert _where(names.add_weight("d2", "l1")) == ["sequential/d2/kernel"]
    assert _where(names.add_weight(keras.layers.Dense, "l1", exclude="d2")) == ["sequential/d1/kernel"]
    assert _where(names.add_weight("*/bias", "l2")) == ["sequential/d1/bias", "sequential/d2/bias"]
    assert _where(Regularizer(model).add_weight(select.matrices(), "l1")) == [
        "sequential/d1/kernel", "sequential/d2/kernel"]
    assert names.add_activity("d2", "l1").where == "sequential/d2"  # by name, shown by path
    with pytest.raises(TypeError, match="a Keras model"):
        sc.ActivationMonitor(model)
    # The Keras-style shortcut on a lone Keras layer: kernel, bias and activity regularizers.
    dense = keras.layers.Dense(3, kernel_regularizer=regs.L1(0.1), bias_initializer="ones",
                               bias_regularizer=regs.L2(0.2), activity_regularizer=regs.L2(0.3))
    dense.build((None, 4))
    shortcut = sc.regularize(dense, weight=sc.L1(0.1), bias=sc.L2(0.2), activity=sc.L2(0.3))
    dense(x)
    assert float(shortcut.loss().detach()) == pytest.approx(_keras_losses(dense), rel=1e-6)


def test_keras_lstm_activity_equals_the_torch_lstm_term(keras) -> None:
    """Keras penalises the tensor an LSTM returns: the sequence, or the last state."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((N, T, F)).astype("float32")
    for return_sequences in (True, False):
        layer = keras.layers.LSTM(H, return_sequences=return_sequences,
                                  kernel_initializer=keras.initializers.GlorotUniform(seed=3),
                                  recurrent_initializer=keras.initializers.Orthogonal(seed=4),
                                  activity_regularizer=keras.regularizers.L1(0.1))
        layer.build((N, T, F))
        kernel, recurrent, bias = layer.get_weights()
        lstm = nn.LSTM(F, H, batch_first=True)  # same gate order (i, f, g, o)
        with torch.no_grad():
            lstm.weight_ih_l0.copy_(torch.from_numpy(kernel.T))
            lstm.weight_hh_l0.copy_(torch.from_numpy(recurrent.T))
            lstm.bias_ih_l0.copy_(torch.from_numpy(bias))
            lstm.bias_hh_l0.zero_()
        layer(x)
        reg = Regularizer(lstm)
        reg.add_activity(lstm, sc.L1(0.1), output=None if return_sequences else "h_n")
        lstm(torch.from_numpy(x))
        assert float(reg.loss().detach()) == pytest.approx(_keras_losses(layer), rel=1e-5)


def test_the_library_does_not_import_keras() -> None:
    """Keras objects are recognised through sys.modules only (a subprocess would cost seconds)."""
    src = Path(sc.__file__).parent
    for path in [src / "_space.py", src / "select.py", src / "regularizer.py", src / "_outputs.py",
                 *sorted((src / "metrics").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] == "keras"], path


def test_warning_free_default_path() -> None:
    model = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Regularizer(model).add_weight(select.matrices(), sc.L1(0.1))
