"""sparsecraft under torch.distributed: 2 ranks on CPU (gloo), started with torch.multiprocessing.

One spawn runs every multi-process scenario (DDP and FSDP2), each rank writing
its results to a file; the tests compare them with the same training run in
this single process on the global batch. Starting processes dominates the
cost, so all scenarios share it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock  # a dependency of torch
from torch import nn

import sparsecraft as sc
import sparsecraft.distributed as scd
from sparsecraft.metrics import count_zeros
from sparsecraft.metrics import sparsity as local_sparsity
from sparsecraft.optim import ProximalOptimizer

WORLD = 2
STEPS = 6
BATCH = 16
ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the runs


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def split(rank: int, world: int, uneven: bool) -> slice:
    """This rank's rows of the global batch (uneven: 10 and 6 rows for 2 ranks)."""
    if world == 1:
        return slice(0, BATCH)
    if uneven:
        return slice(0, 10) if rank == 0 else slice(10, BATCH)
    n = BATCH // world
    return slice(rank * n, (rank + 1) * n)


# Strengths that zero some groups but not all within STEPS steps (Adam's prox steps,
# lr/sqrt(v), are much larger than SGD's lr).
DDP_STRENGTHS = {"sgd": (0.3, 0.2), "latent": (0.3, 0.2), "adam": (3e-3, 1.5e-3)}
FSDP_STRENGTHS = {"sgd": (0.3, 0.1, 0.3, 0.3), "latent": (0.3, 0.1, 0.3, 0.3),
                  "adam": (4e-3, 4e-3, 5e-3, 2e-3)}


def ddp_regularizer(model: nn.Module, kind: str) -> sc.Regularizer:
    l1, group = DDP_STRENGTHS[kind]
    reg = sc.Regularizer(model)
    reg.add_weight("0.weight", sc.L1(l1))
    reg.add_weight("2.weight", sc.GroupLasso(group, groups="columns"))
    reg.add_weight("4.weight", sc.L2(1e-2))  # stays in the loss
    reg.add_activity("1", sc.L1(1e-2))  # divided by the batch size
    reg.add_activity("3", sc.L2(1e-3), reduction="sum")  # Keras 3.0-3.13: not divided
    return reg


def fsdp_regularizer(model: nn.Module, kind: str) -> sc.Regularizer:
    sgl, bias, index_groups, rows = FSDP_STRENGTHS[kind]
    reg = sc.Regularizer(model)
    # Column groups of a dim-0 sharded weight span both shards; rows are local.
    reg.add_weight("0.weight", sc.SparseGroupLasso(l1=sgl / 20, group=sgl, groups="columns"))
    reg.add_weight("0.bias", sc.L1(bias))
    # Index groups along the sharded dim: rows 0-3 live on rank 0, rows 4-6 on rank 1,
    # so groups 0 (rows 0, 6) and 2 (rows 3-5) span both shards.
    reg.add_weight("2.weight", sc.GroupLasso(index_groups, groups=(0, 1, 1, 2, 2, 2, 0), dim=0))
    reg.add_weight("4.weight", sc.GroupLasso(rows, groups="rows"))  # 3 rows: 2 + 1
    reg.add_weight("2.bias", sc.L2(1e-2))  # separable, in the loss: summed over shards
    reg.add_weight("4.bias", sc.Hoyer(1e-2))  # not separable: computed on the gathered tensor
    reg.add_activity("1", sc.L1(1e-2))
    return reg


def l1_regularizer(model: nn.Module, kind: str = "adam") -> sc.Regularizer:
    """L1 on every weight matrix: under TargetSparsity, Adam shows survivors ranked by |z|·v^¼."""
    reg = sc.Regularizer(model)
    for name in ("0.weight", "2.weight", "4.weight"):
        reg.add_weight(name, sc.L1(1e-2))
    return reg


def make_optimizer(model: nn.Module, reg: sc.Regularizer, kind: str) -> ProximalOptimizer:
    if kind == "sgd":
        return ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), reg,
                                 mode="forward_backward")
    if kind == "adam":
        return ProximalOptimizer(torch.optim.Adam(model.parameters(), lr=2e-2), reg, floor=0.1)
    if kind == "latent":
        return ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg, mode="latent")
    raise ValueError(kind)


def make_controller(opt: ProximalOptimizer, measure: str):
    """TargetSparsity on every zero-making prox term, or on the group terms counting groups."""
    from sparsecraft.control import TargetSparsity

    if measure == "groups":  # FSDP: groups split over shards
        groups = [t for t in opt.regularizer.terms if t.where in ("0.weight", "2.weight", "4.weight")]
        return TargetSparsity(opt, target=0.5, end_step=STEPS, every=1, terms=groups, measure="groups",
                              hold="track")
    # hold="track": finalize() afterwards is what these tests compare (latent: both ways)
    return TargetSparsity(opt, target=0.7, end_step=STEPS, every=1, hold="track")


def train(model: nn.Module, reg: sc.Regularizer, opt: ProximalOptimizer, *, rank: int, world: int,
          uneven: bool = False, ctrl=None) -> list[float]:
    """STEPS steps on this rank's part of each global batch; returns the global loss per step."""
    losses = []
    rows = split(rank, world, uneven)
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rows], y[rows]
        opt.zero_grad()
        out = model(x)
        scd.sync_activity(reg)
        # world × this rank's share of the global mean: DDP/FSDP average the gradients.
        data = nn.functional.cross_entropy(out, y, reduction="sum") * world / BATCH
        loss = data + reg.loss()
        loss.backward()
        opt.step()
        if ctrl is not None:
            ctrl.step()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


# finalize() scenarios: (name, optimizer kind, measure, target given to finalize()). Latent
# mode solves for the multiplier (here reviving zeros); forward-backward ranks the smallest
# magnitudes (elements) or group norms (groups) over the shards.
FINAL = [("fsdp_final_latent", "latent", "elements", 0.6), ("fsdp_final_fb", "sgd", "elements", 0.95),
         ("fsdp_final_groups", "sgd", "groups", 0.8)]


def finalize_run(model: nn.Module, kind: str, measure: str, target: float, rank: int, world: int):
    reg = fsdp_regularizer(model, kind)
    opt = make_optimizer(model, reg, kind)
    ctrl = make_controller(opt, measure)
    train(model, reg, opt, rank=rank, world=world, ctrl=ctrl)
    ctrl.target = target
    fin = ctrl.finalize()
    return {"state": full_state(model), "fin": fin, "scales": [t.scale for t in reg.terms]}


def control_checks(rank: int, mesh) -> dict[str, object]:
    """TargetSparsity's rank safety: logging on one rank, differing settings, ranks out of step."""
    from sparsecraft.control import TargetSparsity

    out: dict[str, object] = {}
    # measured() and record() on rank 0 only: no collective, so the next one still pairs up.
    model = shard(make_model(), mesh)
    reg = fsdp_regularizer(model, "sgd")
    opt = make_optimizer(model, reg, "sgd")
    ctrl = make_controller(opt, "elements")
    train(model, reg, opt, rank=rank, world=WORLD, ctrl=ctrl)
    out["logged"] = [ctrl.measured(), ctrl.record()["measured"]] if rank == 0 else []
    out["now"] = ctrl.measure_now()
    # Another every and another strength on rank 1: refused on both ranks at construction.
    model = make_model()
    reg = sc.Regularizer(model)
    reg.add_weight("0.weight", sc.L1(0.1 * (1 + rank)))
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)
    try:
        TargetSparsity(opt, target=0.5, end_step=10, every=1 + rank)
        out["mismatch"] = None
    except ValueError as err:
        out["mismatch"] = str(err)
    # Rank 1 resumes from another step: the next update raises on both ranks.
    reg = sc.Regularizer(model)
    reg.add_weight("0.weight", sc.L1(0.1))
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)
    ctrl = TargetSparsity(opt, target=0.5, end_step=10, every=1)
    state = ctrl.state_dict()
    state["step"] += 3 * rank
    ctrl.load_state_dict(state)
    try:
        ctrl.step()
        out["out_of_step"] = None
    except RuntimeError as err:
        out["out_of_step"] = str(err)
    return out


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if scd._is_dtensor(p) else p).detach().clone()
            for n, p in model.named_parameters()}


def report_rows(report) -> dict[str, tuple]:
    return {r.name: (r.shape, r.numel, r.zeros, r.near_zeros, r.zero_rows, r.zero_cols)
            for r in report.rows}


# ----------------------------------------------------------------------------- the worker


def worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results: dict[str, object] = {}
    try:
        for name, kind, uneven in [("ddp_sgd", "sgd", False), ("ddp_adam_uneven", "adam", True),
                                   ("ddp_latent", "latent", False), ("ddp_target", "sgd", False)]:
            model = make_model()
            reg = ddp_regularizer(model, kind)  # on the plain module: names without "module."
            ddp = DDP(model)
            opt = make_optimizer(model, reg, kind)
            ctrl = make_controller(opt, "elements") if name.endswith("target") else None
            losses = train(ddp, reg, opt, rank=rank, world=world, uneven=uneven, ctrl=ctrl)
            results[name] = {"state": full_state(model), "losses": losses,
                             "scales": [t.scale for t in reg.terms]}

        mesh = init_device_mesh("cpu", (world,))
        for name, kind in [("fsdp_sgd", "sgd"), ("fsdp_adam", "adam"), ("fsdp_latent", "latent"),
                           ("fsdp_target_elements", "sgd"), ("fsdp_target_groups", "sgd")]:
            model = make_model()
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            reg = fsdp_regularizer(model, kind)  # after sharding: it must see the DTensor parameters
            opt = make_optimizer(model, reg, kind)
            ctrl = make_controller(opt, name.split("_")[-1]) if "target" in name else None
            losses = train(model, reg, opt, rank=rank, world=world, ctrl=ctrl)
            params = [p for p in model.parameters()]
            local = count_zeros(params, as_tensor=True)
            summed = scd.all_reduce_counts(local[0], local[1])
            results[name] = {
                "state": full_state(model),
                "losses": losses,
                "report": report_rows(scd.sparsity(model, tol=1e-3)),
                "all_reduce_counts": [int(summed[0]), int(summed[1])],
                "count_zeros": scd.count_zeros(params).tolist(),
                "reg_value": float(reg.value()),
                "scales": [t.scale for t in reg.terms],
            }
        model = shard(make_model(), mesh)
        reg = l1_regularizer(model)
        opt = make_optimizer(model, reg, "adam")
        losses = train(model, reg, opt, rank=rank, world=world, ctrl=make_controller(opt, "elements"))
        results["fsdp_target_adam"] = {"state": full_state(model), "losses": losses}
        results["fsdp_average"] = average_run(shard(make_model(), mesh), rank, world)
        results["fsdp_average_adam"] = average_run(shard(make_model(), mesh), rank, world, adam=True)
        for name, kind, measure, target in FINAL:
            model = shard(make_model(), mesh)
            results[name] = finalize_run(model, kind, measure, target, rank, world)
        results["control"] = control_checks(rank, mesh)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, out: str, timeout: float = 170.0) -> None:
    """Start WORLD ranks of ``fn``; fail (never hang) when one raises or time runs out."""
    ctx = mp.start_processes(fn, args=(WORLD, free_port(), out), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException when a rank fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout} s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:  # one pytest process
        out = tmp_path_factory.mktemp("dist")
        spawn(worker, str(out))
    else:
        # pytest-xdist: the first worker to get here starts the ranks, the others wait
        # for its files (starting 2 more processes per worker would double the cost).
        out = tmp_path_factory.getbasetemp().parent / f"sparsecraft-dist-{run_id}"
        out.mkdir(exist_ok=True)
        with FileLock(str(out / "lock")):
            if not (out / "done").exists():
                spawn(worker, str(out))
                (out / "done").touch()
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def average_run(model: nn.Module, rank: int, world: int, adam: bool = False) -> dict:
    """SGD (or Adam, with its fine-tuning lr × 1/sqrt(0.3)) under TargetSparsity, frozen at step 3:
    finalize() writes the average of steps 3-6."""
    from sparsecraft.control import TargetSparsity

    reg = l1_regularizer(model)
    opt = ProximalOptimizer(torch.optim.Adam(model.parameters(), lr=2e-2), reg, mode="latent") if adam \
        else make_optimizer(model, reg, "latent")
    ctrl = TargetSparsity(opt, target=0.7, end_step=2, freeze_step=3, every=1)
    losses = train(model, reg, opt, rank=rank, world=world, ctrl=ctrl)
    fin = ctrl.finalize()
    return {"state": full_state(model), "losses": losses, "averaged": fin["averaged"], "after": fin["after"],
            "scale": ctrl.fine_tune_scale}


def single(kind: str, regularizer, uneven: bool = False, target: str | None = None):
    model = make_model()
    reg = regularizer(model, kind)
    opt = make_optimizer(model, reg, kind)
    ctrl = make_controller(opt, target) if target else None
    losses = train(model, reg, opt, rank=0, world=1, uneven=uneven, ctrl=ctrl)
    return model, reg, losses


def assert_close_states(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for n in want:
        diff = (got[n] - want[n]).abs().max().item()
        assert diff <= atol, f"{n}: max |diff| {diff:.3g}"


# ----------------------------------------------------------------------------- DDP


@pytest.mark.parametrize("name", ["ddp_sgd", "ddp_adam_uneven", "ddp_latent"])
def test_ddp_replicas_are_bit_identical(ranks, name):
    a, b = ranks[0][name]["state"], ranks[1][name]["state"]
    for n in a:
        assert torch.equal(a[n], b[n]), f"{name}: {n} differs between ranks"


@pytest.mark.parametrize("name,kind,uneven", [("ddp_sgd", "sgd", False),
                                              ("ddp_adam_uneven", "adam", True),
                                              ("ddp_latent", "latent", False)])
def test_ddp_matches_one_process_on_the_global_batch(ranks, name, kind, uneven):
    model, _, losses = single(kind, ddp_regularizer, uneven)
    want = {n: p.detach() for n, p in model.named_parameters()}
    assert_close_states(ranks[0][name]["state"], want)
    assert ranks[0][name]["losses"] == pytest.approx(losses, abs=1e-5)
    # The prox made exact zeros, the same ones.
    zeros = want["0.weight"] == 0
    assert zeros.any()
    assert torch.equal(ranks[0][name]["state"]["0.weight"] == 0, zeros)


@pytest.mark.parametrize("name,regularizer,measure", [
    ("ddp_target", ddp_regularizer, "elements"),
    ("fsdp_target_elements", fsdp_regularizer, "elements"),  # each rank counts its own shards
    ("fsdp_target_groups", fsdp_regularizer, "groups"),  # groups span the shards
])
def test_target_sparsity_sets_the_same_strength_on_every_rank(ranks, name, regularizer, measure):
    """The controller's counts are all-reduced: every rank, and one process, choose one λ."""
    model, reg, losses = single("sgd", regularizer, target=measure)
    scales = [t.scale for t in reg.terms]
    assert ranks[0][name]["scales"] == ranks[1][name]["scales"]
    assert ranks[0][name]["scales"] == pytest.approx(scales, rel=1e-5)
    assert any(s != 1.0 for s in scales)  # the controller did move the strengths
    want = {n: p.detach() for n, p in model.named_parameters()}
    assert_close_states(ranks[0][name]["state"], want)


def test_sync_activity_is_needed_for_sum_reduction_and_uneven_batches():
    """Without the sync, DDP's average of per-rank activity gradients is not the global one."""
    model = make_model()
    reg = sc.Regularizer(model)
    term_sum = reg.add_activity("3", sc.L2(1.0), reduction="sum")
    term_batch = reg.add_activity("1", sc.L1(1.0))
    x, _ = batch(0)
    model(x)
    global_sum, global_batch = term_sum.current().item(), term_batch.current().item()
    # Per-rank values on an uneven split, as DDP would average them (no sync: one process).
    per_rank = []
    for r in range(WORLD):
        model(x[split(r, WORLD, uneven=True)])
        per_rank.append((term_sum.current().item(), term_batch.current().item()))
    avg_sum = sum(v[0] for v in per_rank) / WORLD
    avg_batch = sum(v[1] for v in per_rank) / WORLD
    assert avg_sum == pytest.approx(global_sum / WORLD, rel=1e-5)  # off by the world size
    assert abs(avg_batch - global_batch) > 1e-3 * global_batch  # uneven: off
    # The factors sync_activity applies (world·B_r/ΣB; world for "sum") fix both.
    fixed_sum = sum(WORLD * v[0] for v in per_rank) / WORLD
    sizes = [10, 6]
    fixed_batch = sum(WORLD * b / BATCH * v[1] for b, v in zip(sizes, per_rank, strict=True)) / WORLD
    assert fixed_sum == pytest.approx(global_sum, rel=1e-5)
    assert fixed_batch == pytest.approx(global_batch, rel=1e-5)


def test_helpers_are_no_ops_without_a_process_group():
    assert not dist.is_initialized()
    z, n = scd.all_reduce_counts(torch.tensor(3), torch.tensor(10))
    assert (int(z), int(n)) == (3, 10)
    model = make_model()
    reg = sc.Regularizer(model)
    term = reg.add_activity("1", sc.L1(0.1), reduction="sum")
    model(batch(0)[0])
    before = term.current().item()
    scd.sync_activity(reg)
    assert term.current().item() == before
    with torch.no_grad():
        model[0].weight[:3] = 0
    assert scd.count_zeros(list(model.parameters())).tolist() == list(count_zeros(list(model.parameters())))
    assert report_rows(scd.sparsity(model)) == report_rows(local_sparsity(model))
    assert scd.gather_rows(torch.tensor([3, 4])).tolist() == [[3, 4]]
    scd.check_same({"every": 1}, "settings")  # nothing to compare with


def test_helpers_reject_wrong_inputs():
    with pytest.raises(TypeError, match="one-element tensor"):
        scd.all_reduce_counts(3, torch.tensor(1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Regularizer"):
        scd.sync_activity(object())
    with pytest.raises(TypeError, match="Expected tensors"):
        scd.count_zeros([torch.zeros(2), "x"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="tol"):
        scd.count_zeros(torch.zeros(2), tol=-1.0)
    with pytest.raises(TypeError, match="1-D tensor"):
        scd.gather_rows(torch.zeros(2, 2))


# ----------------------------------------------------------------------------- FSDP2


@pytest.mark.parametrize("name,kind", [("fsdp_sgd", "sgd"), ("fsdp_adam", "adam"),
                                       ("fsdp_latent", "latent")])
def test_fsdp_matches_one_process(ranks, name, kind):
    model, reg, losses = single(kind, fsdp_regularizer)
    want = {n: p.detach() for n, p in model.named_parameters()}
    got = ranks[0][name]
    assert_close_states(got["state"], want)
    assert_close_states(ranks[1][name]["state"], want)
    assert got["losses"] == pytest.approx(losses, abs=1e-5)
    # Weight terms are global on every rank; activity terms are each rank's share (×W).
    mean_value = sum(ranks[r][name]["reg_value"] for r in range(WORLD)) / WORLD
    assert mean_value == pytest.approx(float(reg.value()), abs=1e-5)
    # Whole groups went to zero, not all of them, among them groups that span both shards.
    for n in ("0.weight", "2.weight", "4.weight"):
        assert torch.equal(got["state"][n] == 0, want[n] == 0), n
    zero_cols = (want["0.weight"] == 0).all(0)
    assert zero_cols.any() and not zero_cols.all()
    rows2 = (want["2.weight"] == 0).all(1)
    assert rows2.any() and not rows2.all()
    assert rows2[3] or rows2[0]  # a group with rows on both ranks is zero


@pytest.mark.parametrize("name,kind", [("fsdp_sgd", "sgd"), ("fsdp_adam", "adam")])
def test_fsdp_counts_and_report_are_global(ranks, name, kind):
    model, _, _ = single(kind, fsdp_regularizer)
    params = list(model.parameters())
    zeros, numel = count_zeros(params)
    for r in range(WORLD):
        got = ranks[r][name]
        assert got["count_zeros"] == [zeros, numel]
        assert got["all_reduce_counts"] == [zeros, numel]
        assert got["report"] == report_rows(local_sparsity(model, tol=1e-3))
    assert zeros > 0


def test_fsdp_adam_under_the_controller_ranks_survivors_like_one_process(ranks):
    """The relaxed display of Adam ranks |z|·v^¼ over both shards, not within each."""
    model, _, losses = single("adam", l1_regularizer, target="elements")
    want = full_state(model)
    for r in range(WORLD):
        got = ranks[r]["fsdp_target_adam"]
        assert_close_states(got["state"], want)
        assert got["losses"] == pytest.approx(losses, abs=1e-5)
        for n, w in want.items():
            assert torch.equal(got["state"][n] == 0, w == 0), n
    zeros = sum(int((want[n] == 0).sum()) for n in ("0.weight", "2.weight", "4.weight"))
    assert zeros > 0


@pytest.mark.parametrize("name", ["fsdp_average", "fsdp_average_adam"])
def test_fsdp_average_of_the_fine_tuning_matches_one_process(ranks, name):
    """TargetSparsity(average=...) averages each rank's shards: the weights one process averages
    (with Adam, fine-tuned at the scaled lr)."""
    want = average_run(make_model(), rank=0, world=1, adam=name.endswith("adam"))
    assert want["averaged"] == STEPS - 3 + 1 and want["after"] == pytest.approx(0.7, abs=0.01)
    assert want["scale"] == (pytest.approx(0.3 ** -0.5) if name.endswith("adam") else 1.0)
    for r in range(WORLD):
        got = ranks[r][name]
        assert got["averaged"] == want["averaged"] and got["after"] == want["after"]
        assert got["losses"] == pytest.approx(want["losses"], abs=1e-5)
        assert_close_states(got["state"], want["state"])
        for n, w in want["state"].items():
            assert torch.equal(got["state"][n] == 0, w == 0), n


@pytest.mark.parametrize("name,kind,measure,target", FINAL)
def test_finalize_under_fsdp_matches_one_process(ranks, name, kind, measure, target):
    """finalize() counts and ranks over all shards: the zeros and the multiplier of one process."""
    want = finalize_run(make_model(), kind, measure, target, rank=0, world=1)
    for r in range(WORLD):
        got = ranks[r][name]
        assert got["fin"]["after"] == want["fin"]["after"] == pytest.approx(target, abs=0.02)
        assert got["fin"]["scale_after"] == pytest.approx(want["fin"]["scale_after"], rel=1e-6)
        assert got["fin"]["zeroed"] == want["fin"]["zeroed"]
        assert got["fin"]["revived"] == want["fin"]["revived"]
        assert got["fin"]["latent"] == want["fin"]["latent"] == float(kind == "latent")
        assert got["scales"] == pytest.approx(want["scales"], rel=1e-6)
        assert_close_states(got["state"], want["state"])
        for n, w in want["state"].items():
            assert torch.equal(got["state"][n] == 0, w == 0), n
    moved = want["fin"]["revived"] if kind == "latent" else want["fin"]["zeroed"]
    assert moved > 0  # finalize had work to do


def test_controller_logging_never_communicates(ranks):
    # rank 0 called measured() and record() alone; measure_now() on both still paired up
    logged, now = ranks[0]["control"]["logged"], ranks[0]["control"]["now"]
    assert ranks[1]["control"]["now"] == now
    model, reg, _ = single("sgd", fsdp_regularizer, target="elements")
    params = [t.target for t in reg.terms if t.where in ("0.weight", "0.bias", "2.weight", "4.weight")]
    zeros, numel = count_zeros(params)
    assert logged == [pytest.approx(zeros / numel)] * 2 and now == pytest.approx(zeros / numel)


def test_controller_settings_that_differ_between_ranks_raise_on_every_rank(ranks):
    for r in range(WORLD):
        msg = ranks[r]["control"]["mismatch"]
        assert msg is not None and "rank 1 differs from rank 0" in msg
        assert "'every'" in msg and "'strengths'" in msg and "'target'" not in msg


def test_controller_ranks_out_of_step_raise_on_every_rank(ranks):
    for r in range(WORLD):
        msg = ranks[r]["control"]["out_of_step"]
        assert msg is not None and "rank 1 at step 4, rank 0 at step 1" in msg


# ----------------------------------------------------------------------------- the example


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_example_runs_with_torchrun(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "ddp_train.py"), "--epochs", "2", "--out", str(tmp_path / "model.pt"),
           "--timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "sparsity" in res.stdout
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any((t == 0).any() for t in state.values())
