"""Benchmark of export: ``to_sparse`` on a 4 x 2048^2 MLP, ``compact`` on the demo's digits MLP.

For 90 %, 95 % and 99 % random unstructured sparsity and batch sizes 1 and
64, with ``torch.set_num_threads(2)``:

* ``kernels``: one 2048x2048 layer timed with every CSR/COO alternative torch
  offers on CPU (the measurement behind the kernels ``SparseLinear`` ships);
* ``models``: the whole MLP dense vs after ``to_sparse`` (which itself times
  dense vs sparse per layer and keeps the faster), with its per-layer choices.

And ``conv``: one ``Conv1d`` (64->128, k=5, length 40, the MNIST-1D CNN's
shape, widened) and two ``Conv2d`` (64->128, 3x3, 16x16; 256->256, 3x3,
14x14, a ResNet stage-3 shape) at 90/95/99 % random
zeros, batch 1 and 16: dense vs :class:`SparseConv` (CSR weight x unfolded
input) and what ``to_sparse`` chose. ``transformer``: ``compact`` on a causal
2-layer transformer (d_model 128, 4 heads, FFN 512, tied embeddings) whose
layers were given dead structure by hand (half of the FFN neurons and one head
per layer zero; not a trained model): parameters, FLOPs and latency before/after.
``--arch-only`` runs just these two and merges them into the existing JSON.

And ``digits``: the demo's ``target`` run (prox L1 + TargetSparsity on the
64-256-256-10 digits MLP, the same plan and epochs as ``sparsecraft demo``),
trained once; its structured-zero fraction, parameters, FLOPs, file sizes and
latency (batch 1 and the 450 test images, 1 and 2 threads) as trained, after
``to_sparse``, after ``compact`` and after both
(:func:`sparsecraft.experiments.export_summary`).

Writes ``benchmarks/results/export.json`` (not with ``--quick``). Run
``python benchmarks/export.py`` (``--quick`` for fewer repeats, a smaller
digits run and no waiting); ``sparsecraft bench --suite export`` calls
:func:`run`. Timings are medians of interleaved runs; nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsecraft.export import SparseConv, SparseLinear, compact, to_sparse
from sparsecraft.metrics import flops

SIZE = 2048
LAYERS = 4
SPARSITIES = (0.90, 0.95, 0.99)
BATCHES = (1, 64)
THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "export.json"


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3,
               best: dict | None = None) -> dict:
    """Median ms of each function over interleaved runs; fills ``best`` with the minimum."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for key, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    if best is not None:
        best.update({k: round(min(v) * 1e3, 4) for k, v in times.items()})
    return {k: round(statistics.median(v) * 1e3, 4) for k, v in times.items()}


def _others_busy(window_s: float = 0.5) -> float | None:
    """Fraction of all CPUs busy during ``window_s`` while this process sleeps (Linux)."""
    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(window_s)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


def _wait_for_quiet(max_wait_s: float, threshold: float = 0.1) -> float | None:
    """Waits (at most ``max_wait_s``) until other processes leave the CPUs idle.

    The machine is shared: a busy neighbour turns 2-thread timings into
    scheduler stalls. Returns the busy fraction measured last (recorded with
    each result), ``None`` where /proc/stat is unavailable.
    """
    deadline = time.monotonic() + max_wait_s
    busy = _others_busy()
    while busy is not None and busy > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = _others_busy()
    return busy


def _mlp(sparsity: float, seed: int) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(LAYERS):
        lin = nn.Linear(SIZE, SIZE)
        with torch.no_grad():
            w = torch.randn(SIZE, SIZE, generator=gen) / SIZE**0.5
            w[torch.rand(SIZE, SIZE, generator=gen) < sparsity] = 0
            lin.weight.copy_(w)
        layers.append(lin)
        if i < LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _kernels(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, repeats: int) -> dict:
    """Every way torch offers to multiply by a sparse weight on CPU, on one layer."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.to_sparse_csr()
    csr32 = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(),
                                    csr.values(), csr.shape, check_invariants=False)
    coo = weight.to_sparse_coo().coalesce()
    wt_csr = weight.t().contiguous().to_sparse_csr()  # W.T stored as CSR (= W as CSC)
    xt = x.t()
    fns = {
        "dense F.linear": lambda: F.linear(x, weight, bias),
        "csr addmm(b, W, x.T).T": lambda: torch.addmm(bias[:, None], csr, xt).t(),
        "csr int32 addmm(b, W, x.T).T": lambda: torch.addmm(bias[:, None], csr32, xt).t(),
        "csr torch.sparse.mm(W, x.T).T + b": lambda: torch.sparse.mm(csr, xt).t() + bias,
        "csr F.linear(x, W, b)": lambda: F.linear(x, csr, bias),
        "coo torch.sparse.mm(W, x.T).T + b": lambda: torch.sparse.mm(coo, xt).t() + bias,
        "dense x @ csr(W.T) + b": lambda: torch.addmm(bias, x, wt_csr),
    }
    if x.shape[0] == 1:
        fns["csr torch.mv(W, x) + b"] = lambda: torch.mv(csr, x[0]) + bias
        fns["csr int32 torch.mv(W, x) + b"] = lambda: torch.mv(csr32, x[0]) + bias
    for name in [*fns]:
        fn = fns.pop(name)
        try:
            out = fn()
            if not torch.allclose(out.reshape(x.shape[0], -1), F.linear(x, weight, bias),
                                  atol=1e-4):
                raise ValueError("wrong result")
            fns[name] = fn
        except (RuntimeError, ValueError) as err:  # an alternative torch does not provide
            fns[name + " (unavailable)"] = str(err).splitlines()[0][:80]
    # alternatives 10x slower than dense on a first call get 3 repeats: they are
    # not contenders, and their long runs would stretch the benchmark
    slow = {}
    for name, fn in fns.items():
        if callable(fn):
            start = time.perf_counter()
            fn()
            slow[name] = time.perf_counter() - start
    limit = 10 * slow["dense F.linear"] + 1e-3
    timed = _median_ms({k: v for k, v in fns.items() if callable(v) and slow[k] <= limit},
                       repeats)
    timed.update(_median_ms({k: v for k, v in fns.items() if callable(v) and slow[k] > limit},
                            3, warmup=0))
    timed.update({k: v for k, v in fns.items() if not callable(v)})
    return timed


def _conv(quick: bool, max_wait_s: float) -> list[dict]:
    """Dense vs SparseConv on one Conv1d and one Conv2d; what to_sparse chose."""
    rows = []
    shapes = {"Conv1d": (nn.Conv1d(64, 128, 5, padding=2), (64, 40)),
              "Conv2d": (nn.Conv2d(64, 128, 3, padding=1), (64, 16, 16)),
              "Conv2d 256": (nn.Conv2d(256, 256, 3, padding=1), (256, 14, 14))}
    repeats = 5 if quick else 30
    for kind, (conv, shape) in shapes.items():
        for sparsity in SPARSITIES:
            gen = torch.Generator().manual_seed(int(sparsity * 1000))
            layer = nn.Sequential(conv).eval()
            with torch.no_grad():
                w = torch.randn(conv.weight.shape, generator=gen) * 0.05
                w[torch.rand(conv.weight.shape, generator=gen) < sparsity] = 0
                conv.weight.copy_(w)
            for batch in (1, 16):
                busy = _wait_for_quiet(0.0 if quick else max_wait_s)
                x = torch.randn(batch, *shape, generator=gen)
                sparse = SparseConv(conv)
                best: dict = {}
                timed = _median_ms({"dense": lambda m=layer, x=x: m(x),
                                    "csr_unfold": lambda m=sparse, x=x: m(x)}, repeats, best=best)
                chosen, report = to_sparse(layer, x, min_sparsity=0.5, repeats=repeats // 2 + 1)
                with torch.no_grad():
                    diff = float((chosen(x) - layer(x)).abs().max())
                rows.append({
                    "layer": kind.split()[0], "weight": list(conv.weight.shape), "input": [batch, *shape],
                    "sparsity": sparsity, "batch": batch, "others_cpu_busy_before": busy,
                    "dense_ms": round(timed["dense"], 4),
                    "csr_unfold_ms": round(timed["csr_unfold"], 4),
                    "speedup": round(timed["dense"] / timed["csr_unfold"], 3),
                    "dense_min_ms": best["dense"], "csr_unfold_min_ms": best["csr_unfold"],
                    "speedup_of_min": round(best["dense"] / best["csr_unfold"], 3),
                    "to_sparse_chose": report.layers[0].chosen, "max_abs_diff": diff})
    return rows


def _transformer(quick: bool, max_wait_s: float) -> dict:
    """compact on a causal transformer with hand-made dead FFN neurons and heads."""
    vocab, d, heads, ff, seq = 64, 128, 4, 512, 64

    class CausalLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(
                d, heads, ff, dropout=0.0, batch_first=True) for _ in range(2))
            self.norm = nn.LayerNorm(d)
            self.out = nn.Linear(d, vocab, bias=False)
            self.out.weight = self.emb.weight
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.emb(ids) + self.pos
            for layer in self.layers:
                x = layer(x, src_mask=self.mask, is_causal=True)
            return self.out(self.norm(x))

    torch.manual_seed(0)
    model = CausalLM().eval()
    hd = d // heads
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.linear1.weight[: ff // 2] = 0  # half of the FFN neurons dead
            h = i + 1  # one head per layer with zero value weights
            layer.self_attn.in_proj_weight[2 * d + h * hd: 2 * d + (h + 1) * hd] = 0
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1))
    small, report = compact(model, ids)
    out = {"model": "causal LM, 2 x TransformerEncoderLayer(128, 4 heads, FFN 512), tied "
                    "embeddings, seq 64; dead structure set by hand (not trained)",
           "params": [report.params_before, report.params_after],
           "flops": [report.flops_before, report.flops_after],
           "max_abs_diff": report.max_abs_diff,
           "layers": [{"name": c.name, "before": list(c.shape_before),
                       "after": list(c.shape_after), "detail": c.detail} for c in report.layers],
           "ms": {}}
    for batch in (1, 16):
        x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(2))
        busy = _wait_for_quiet(0.0 if quick else max_wait_s)
        best: dict = {}
        timed = _median_ms({"original": lambda x=x: model(x), "compact": lambda x=x: small(x)},
                           5 if quick else 30, best=best)
        out["ms"][f"batch {batch}"] = {**timed, **{f"{k}_min": v for k, v in best.items()},
                                       "others_cpu_busy_before": busy}
    out["flops_check"] = flops(small, ids) == report.flops_after
    with torch.no_grad():  # the scale of the logits, and torch's own fast vs slow path gap
        fast = model(ids)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = model(ids)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    out["max_abs_output"] = float(fast.abs().max())
    out["torch_fast_vs_slow_path_max_abs_diff"] = float((fast - slow).abs().max())
    return out


def run_arch(quick: bool = False, max_wait_s: float = 120.0) -> dict:
    """Runs only ``conv`` and ``transformer`` and merges them into the existing JSON."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        arch = {"conv": _conv(quick, max_wait_s), "transformer": _transformer(quick, max_wait_s)}
    finally:
        torch.set_num_threads(threads)
    if not quick:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results.update(arch)
        results["arch_command"] = "python benchmarks/export.py --arch-only"
        if hasattr(os, "getloadavg"):
            results["arch_load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return arch


def _print_arch(arch: dict) -> None:
    for r in arch["conv"]:
        print(f"{r['layer']} {r['weight']} {r['sparsity']:.2f} batch {r['batch']:>2}: dense "
              f"{r['dense_ms']:.3f} ms (min {r['dense_min_ms']:.3f}), csr x unfold "
              f"{r['csr_unfold_ms']:.3f} ms (min {r['csr_unfold_min_ms']:.3f}), "
              f"to_sparse chose {r['to_sparse_chose']}, busy {r['others_cpu_busy_before']}")
    t = arch["transformer"]
    print(f"transformer compact: params {t['params']}, FLOPs {t['flops']}, ms {t['ms']}")


def _digits(quick: bool, max_wait_s: float, repeats: int) -> dict:
    """The demo's target model, trained once, then compacted, sparsified and timed."""
    from sparsecraft import datasets, experiments

    data = datasets.digits()
    plan = dict(experiments.demo_plan(quick))
    epochs = experiments.DEMO_EPOCHS["quick" if quick else "full"]
    torch.set_num_threads(1)  # as `sparsecraft demo` trains (the CLI's default)
    [trained] = experiments.compare(data, [("target", plan["target"])], seeds=(0,),
                                    epochs=epochs)
    out: dict = {"run": {"method": "target", **plan["target"], "epochs": epochs, "seed": 0,
                         "accuracy": trained.accuracy, "weight_sparsity": trained.sparsity,
                         "nonzero": trained.nonzero},
                 "by_threads": []}
    for threads in (1, THREADS):
        torch.set_num_threads(threads)
        busy = _wait_for_quiet(0.0 if quick else max_wait_s)
        summary = experiments.export_summary(trained.model, data, repeats=repeats)
        out["by_threads"].append({**summary, "others_cpu_busy_before": busy})
    return out


def run(quick: bool = False, max_wait_s: float = 120.0) -> dict:
    """Runs the benchmark, writes ``benchmarks/results/export.json`` and returns the results.

    Args:
        quick: Fewer repeats and no waiting (for a smoke run); the recorded numbers say so.
        max_wait_s: Before each configuration, wait at most this long for other
            processes to leave the CPUs idle (the busy fraction is recorded).

    Returns:
        The results dict (also written as JSON).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    repeats = 5 if quick else 30
    layer_repeats = 5 if quick else 15
    results: dict = {
        "benchmark": "export: dense vs to_sparse (CSR) on a 4 x 2048x2048 Linear MLP",
        "command": "python benchmarks/export.py" + (" --quick" if quick else ""),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": THREADS, "torch": torch.__version__,
                    "mkl": torch.backends.mkl.is_available()},
        "repeats": repeats, "kernels": [], "models": [], "digits": None,
    }
    if hasattr(os, "getloadavg"):  # the machine is shared: record how busy it was
        results["machine"]["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
    try:
        for sparsity in SPARSITIES:
            model = _mlp(sparsity, seed=int(sparsity * 1000))
            for batch in BATCHES:
                busy = _wait_for_quiet(0.0 if quick else max_wait_s)
                x = torch.randn(batch, SIZE, generator=torch.Generator().manual_seed(batch))
                first = model[0]
                results["kernels"].append({
                    "sparsity": sparsity, "batch": batch, "others_cpu_busy_before": busy,
                    "ms": _kernels(first.weight.detach(), first.bias.detach(), x, repeats)})
                sparse, report = to_sparse(model, x, min_sparsity=0.5, repeats=layer_repeats)
                best: dict = {}
                timed = _median_ms({"dense": lambda m=model, x=x: m(x),
                                    "sparse": lambda m=sparse, x=x: m(x)}, repeats, best=best)
                with torch.no_grad():
                    max_diff = float((sparse(x) - model(x)).abs().max())
                chosen = [r for r in report.layers if r.chosen == "sparse"]
                results["models"].append({
                    "sparsity": sparsity, "batch": batch, "others_cpu_busy_before": busy,
                    "dense_ms": timed["dense"], "to_sparse_ms": timed["sparse"],
                    "speedup": round(timed["dense"] / timed["sparse"], 3),
                    "dense_min_ms": best["dense"], "to_sparse_min_ms": best["sparse"],
                    "sparse_layers": len(chosen), "max_abs_diff": max_diff,
                    "sparse_modules": sum(isinstance(m, SparseLinear) for m in sparse.modules()),
                    "layers": report.to_dict()["layers"],
                })
        results["digits"] = _digits(quick, max_wait_s, repeats=20 if quick else 200)
        results["conv"] = _conv(quick, max_wait_s)
        results["transformer"] = _transformer(quick, max_wait_s)
    finally:
        torch.set_num_threads(threads)
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    by = {(r["sparsity"], r["batch"]): r for r in results["models"]}
    results["targets"] = {
        "95% batch 1 speedup >= 1.5": by[(0.95, 1)]["speedup"] >= 1.5,
        "99% batch 1 speedup >= 5": by[(0.99, 1)]["speedup"] >= 5,
        "never slower where sparse was chosen (model level)": all(
            r["speedup"] >= 1.0 for r in results["models"] if r["sparse_layers"]),
        "never slower where sparse was chosen (layer level, to_sparse's own timing)": all(
            layer["sparse_ms"] <= layer["dense_ms"] for r in results["models"]
            for layer in r["layers"] if layer["chosen"] == "sparse"),
    }
    digits = results["digits"]["by_threads"][0]
    zeros, cut = digits["structured"], digits["cut"]
    # FLOPs cut and removable fraction are the same ratio computed two ways: equal at best.
    results["targets"].update({
        "digits: compact cuts parameters >= the removable structured-zero share of parameters":
            cut["params"] >= zeros["removable_param_fraction"],
        "digits: compact cuts FLOPs >= the removable structured-zero fraction":
            cut["flops"] >= zeros["removable_fraction"] - 1e-12,
        "digits: compact outputs within 1e-5 of the original":
            digits["compact"]["max_abs_diff"] <= 1e-5,
    })
    if not quick:  # a smoke run never replaces the results of a real one
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no waiting")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds to wait per configuration for idle CPUs (default 120)")
    parser.add_argument("--arch-only", action="store_true",
                        help="only the conv and transformer parts, merged into the JSON")
    cli = parser.parse_args()
    if cli.arch_only:
        _print_arch(run_arch(quick=cli.quick, max_wait_s=cli.max_wait))
        raise SystemExit(0)
    out = run(quick=cli.quick, max_wait_s=cli.max_wait)
    _print_arch(out)
    for row in out["models"]:
        print(f"sparsity {row['sparsity']:.2f} batch {row['batch']:>2}: dense "
              f"{row['dense_ms']:.3f} ms, to_sparse {row['to_sparse_ms']:.3f} ms "
              f"({row['speedup']:.2f}x, {row['sparse_layers']}/{LAYERS} layers sparse)")
    for summary in out["digits"]["by_threads"]:
        zeros, cut = summary["structured"], summary["cut"]
        print(f"digits, {summary['threads']} thread(s): structured zeros "
              f"{100 * zeros['fraction']:.2f} % ({100 * zeros['removable_fraction']:.2f} % "
              f"removable); compact cuts params {100 * cut['params']:.2f} %, FLOPs "
              f"{100 * cut['flops']:.2f} %")
        for r in summary["rows"]:
            print(f"  {r['model']:<20} params {r['params']:>6,} FLOPs {r['flops']:>7,} "
                  f"file {r['file_bytes']:>7,} B  batch 1 {r['ms_batch1']:.4f} ms  "
                  f"batch {summary['test_batch']} {r['ms_test']:.4f} ms")
    print(json.dumps(out["targets"], indent=2))
