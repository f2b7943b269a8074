"""`import sparsecraft.keras` without torch; the same zeros as the torch library on the torch backend."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops
from keras_problems import BACKEND, dense_model

from sparsecraft.keras import optimizers as O
from sparsecraft.keras import regularizers as R


@pytest.mark.skipif(BACKEND != "jax", reason="one subprocess is enough: checked in the jax run")
def test_import_does_not_import_torch() -> None:
    # Then the torch package's names still load on first access (sparsecraft/__init__ is lazy).
    code = ("import sys, sparsecraft.keras as sk; sk.L1(0.1); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "print(bad); assert not bad; import sparsecraft as sc; "
            "assert [n for n in sc.__all__ if getattr(sc, n) is None] == []; "
            "assert sc.L1(0.1) == sc.penalties.L1(0.1) and 'torch' in sys.modules; "
            "assert set(sc.__all__) <= set(dir(sc))")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(BACKEND != "torch", reason="compares with the torch library")
@pytest.mark.parametrize("mode", ["forward_backward", "latent"])
def test_same_zeros_as_torch_proximal_optimizer(lasso, mode) -> None:
    import torch

    import sparsecraft as sc

    x, y = lasso
    model = dense_model(R.L1(0.2))
    model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.SGD(0.05), mode=mode), loss="mse")
    model.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0)

    with torch.device("cpu"):
        lin = torch.nn.Linear(12, 1, bias=False)
        torch.nn.init.constant_(lin.weight, 0.5)
        reg = sc.regularize(lin, weight=sc.L1(0.2))
        opt = sc.ProximalOptimizer(torch.optim.SGD(lin.parameters(), lr=0.05), reg, mode=mode)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(10):
            for i in range(0, 64, 16):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(lin(xt[i:i + 16]), yt[i:i + 16]) + reg.loss()
                loss.backward()
                opt.step()
    theirs = lin.weight.detach().numpy().T
    ours = ops.convert_to_numpy(model.layers[-1].kernel)
    assert np.sum(theirs == 0) >= 3
    np.testing.assert_array_equal(ours == 0, theirs == 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
