"""Distributed runs (torchrun, gloo backend, 2 CPU processes) end where single-process runs end.

The global batch is the same in both runs (each of the two ranks takes half of
every batch), so the only difference is BatchNorm statistics computed per rank
on half batches: metrics agree within a small tolerance.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "UNBACKDOOR_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"})
    return env


def _run(cmd: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ddp") / "data"
    _run([sys.executable, "-m", "unbackdoor", "poison", "--dataset", "mnist5k", "--attack", "badnets",
          "--rate", "0.1", "--target", "0", "--seed", "0", "--out", str(d)], _env(d.parent))
    return d


def _torchrun(n: int, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return _run([TORCHRUN, "--nproc-per-node", str(n), "--master-port", str(29500 + os.getpid() % 1000),
                 "-m", "unbackdoor", *args], env)


def test_train_two_processes_matches_one(data_dir: Path, tmp_path: Path) -> None:
    env = _env(tmp_path)
    common = ["train", "--data", str(data_dir), "--epochs", "3", "--precision", "fp32", "--no-progress", "--json"]
    single = json.loads(_run([sys.executable, "-m", "unbackdoor", *common, "--out", str(tmp_path / "one")], env).stdout)
    p = _torchrun(2, [*common, "--out", str(tmp_path / "two")], env)
    double = json.loads(p.stdout)  # only rank 0 prints
    assert double["world_size"] == 2 and single["world_size"] == 1
    # Stated tolerance: clean accuracy within 0.03, ASR within 0.12 (3 short epochs; BN on half batches).
    assert abs(double["clean_accuracy"] - single["clean_accuracy"]) <= 0.03
    assert abs(double["attack_success_rate"] - single["attack_success_rate"]) <= 0.12
    assert double["attack_success_rate"] >= 0.8 and single["attack_success_rate"] >= 0.8
    # only rank 0 wrote, and the model it wrote loads
    import unbackdoor

    unbackdoor.load_model(tmp_path / "two")
    assert not list((tmp_path / "two").glob(".*.tmp"))


# ============================================================================ DBD / BCU under torchrun
# In-process checks: two gloo ranks spawned with torch.multiprocessing, tiny tensors.

def _spawn(fn, tmp_path: Path, *args) -> None:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'pg'}"
    mp.spawn(_worker, args=(2, init, fn, *args), nprocs=2, join=True)


def _worker(rank: int, world: int, init: str, fn, *args) -> None:
    # Tear the process group down before exit: a gloo group left alive at interpreter
    # shutdown sometimes aborts the process ("terminate called without an active exception").
    import torch.distributed as dist

    try:
        fn(rank, world, init, *args)
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _join(rank: int, world: int, init: str):
    import torch
    import torch.distributed as dist

    from unbackdoor.training.distributed import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    return DistContext(rank, world, rank)


def _split_worker(rank: int, world: int, init: str) -> None:
    import torch

    from unbackdoor.data.dataset import ImageDataset
    from unbackdoor.defenses.dbd.split import split_by_loss
    from unbackdoor.models.registry import create

    ctx = _join(rank, world, init)
    torch.manual_seed(0)
    model = create("cnn-small", num_classes=3, in_channels=1, image_size=12)
    n = 101  # odd: the two ranks' shares differ in size
    g = torch.Generator().manual_seed(1)
    data = ImageDataset(torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=g),
                        torch.randint(0, 3, (n,), generator=g), ["a", "b", "c"])
    model.train()
    model(data.images[:32].float() / 255)  # BN running statistics that differ from the init
    reference = split_by_loss(model, data, 0.5, batch_size=16)  # one process, rank 0's model
    if rank == 1:  # rank 1's BN statistics drift as after a DDP epoch: rank 0's must be used
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(0.5)
    split = split_by_loss(model, data, 0.5, batch_size=16, dist=ctx)
    torch.testing.assert_close(split.losses, reference.losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(split.kept, reference.kept)
    assert int(split.kept.sum()) == n // 2


def test_dbd_split_gathered_across_ranks_equals_single_process(tmp_path: Path) -> None:
    _spawn(_split_worker, tmp_path)


def _ntxent_worker(rank: int, world: int, init: str) -> None:
    import torch
    from torch import nn

    from unbackdoor.defenses.dbd.losses import NTXentLoss

    ctx = _join(rank, world, init)
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)  # same weights on every rank
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)  # global batch of 8 pairs
    crit = NTXentLoss(0.5)
    # single process: the whole batch
    lin.zero_grad()
    ref_loss = crit(lin(x1), lin(x2))
    ref_loss.backward()
    ref_grad = [p.grad.clone() for p in lin.parameters()]
    # two ranks under DDP (which averages gradients), each with its shard of the pairs
    ddp = nn.parallel.DistributedDataParallel(lin)
    lin.zero_grad()
    idx = torch.arange(rank, 8, world)
    z = ddp(torch.cat([x1[idx], x2[idx]]))
    loss = crit(*z.chunk(2), ctx)
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses, loss.detach())
    torch.testing.assert_close(torch.stack(losses).mean(), ref_loss.detach())  # L = mean of the ranks' losses
    for p, r in zip(lin.parameters(), ref_grad):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


def test_gathered_ntxent_gradient_equals_single_process(tmp_path: Path) -> None:
    _spawn(_ntxent_worker, tmp_path)


TINY_DBD = """\
simclr: {epochs: 1, batch_size: 256}
linear: {epochs: 2, guard: none}
mixmatch: {epochs: 1, iterations: 8, batch_size: 32}
polish: {epochs: 1}
eval_batch_size: 1000
"""


def _outputs(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def test_dbd_and_bcu_two_processes_match_one(data_dir: Path, tmp_path: Path) -> None:
    env = _env(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_DBD)
    common = ["dbd", "--data", str(data_dir), "--config", str(cfg), "--precision", "fp32", "--no-progress", "--json"]
    one = json.loads(_run([sys.executable, "-m", "unbackdoor", *common, "--out", str(tmp_path / "dbd1")], env).stdout)
    two = json.loads(_torchrun(2, [*common, "--out", str(tmp_path / "dbd2")], env).stdout)  # only rank 0 prints
    assert one["world_size"] == 1 and two["world_size"] == 2
    # Stated tolerance (1 SimCLR epoch, 8 MixMatch steps; the ranks draw other augmentations
    # and BN sees half batches): clean accuracy within 0.15, detection F1 within 0.2.
    assert abs(two["clean_accuracy"] - one["clean_accuracy"]) <= 0.15, (one, two)
    assert abs(two["detection"]["f1"] - one["detection"]["f1"]) <= 0.2, (one, two)
    assert _outputs(tmp_path / "dbd2") == _outputs(tmp_path / "dbd1")  # rank 0 wrote everything, nothing else
    assert not list((tmp_path / "dbd2").rglob("*.tmp"))

    # BCU: cleanse the DBD model (any model works) on the data folder's heldout images
    common = ["bcu", "--model", str(tmp_path / "dbd1"), "--unlabeled", str(data_dir), "--data", str(data_dir),
              "--preset", "quick", "--epochs", "2", "--precision", "fp32", "--no-progress", "--json"]
    b1 = json.loads(_run([sys.executable, "-m", "unbackdoor", *common, "--out", str(tmp_path / "bcu1")], env).stdout)
    b2 = json.loads(_torchrun(2, [*common, "--out", str(tmp_path / "bcu2")], env).stdout)
    assert b2["world_size"] == 2 and b2["before"] == b1["before"]
    # Stated tolerance: clean accuracy after cleansing within 0.1 (2 epochs, BN on half batches).
    assert abs(b2["after"]["clean_accuracy"] - b1["after"]["clean_accuracy"]) <= 0.1, (b1, b2)
    assert _outputs(tmp_path / "bcu2") == _outputs(tmp_path / "bcu1")
