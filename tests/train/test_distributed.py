"""Several processes: a 2-process gloo run computes what one process computes on the same global batch, every
rank ends with the same parameters, and only rank 0 writes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcrlv2_fast.train import PretrainConfig, Pretrainer
from pcrlv2_fast.train.distributed import CpuSyncBatchNorm, rank_micro_batches
from tests.helpers import assert_close

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
# Two optimizer steps of the tiny network on a global batch of 4 (one epoch each: lr 0.01, then 0.005).
COMMON = dict(batch_size=4, steps=2, lr=0.01, tensorboard=False)
RUNS = {
    # Synchronised batch norm: the same statistics as one process on all 4 samples.
    "sync": dict(sync_bn=True),
    # Per-rank batch norm over 2 samples: one process with 2 micro-batches of 2 computes the same gradients.
    "local_bn": dict(sync_bn=False),
}
SINGLE = {"sync": dict(), "local_bn": dict(accumulate=2)}
# The tiny network amplifies rounding: summing batch-norm statistics and gradients over two ranks instead of one
# batch moves its fp32 parameters by up to ~5e-4 after two steps (the same comparison in float64 agrees to 1e-12),
# while unsynchronised batch norm, another sample split or summed instead of averaged gradients move them by ~1.
# With local batch norm both sides add the same numbers in the same order.
ATOL = {"sync": 5e-3, "local_bn": 1e-6}


def params(model, with_buffers=True):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if with_buffers or not k.endswith(RUNNING_STATS)}


def _worker(rank: int, world: int, init_file: str, cache: str, out_root: str) -> None:
    """One rank: joins the gloo group, runs every configuration of RUNS and saves its final state_dict."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from pcrlv2_fast.data import open_cache
    from pcrlv2_fast.train import run_folder

    write = run_folder.save_rotating_checkpoint

    def recording_write(folder, *args, **kwargs):
        (Path(folder) / f"written-by-rank{rank}").touch()
        return write(folder, *args, **kwargs)

    run_folder.save_rotating_checkpoint = recording_write
    try:
        volumes = open_cache(cache)
        for name, kwargs in RUNS.items():
            cfg = PretrainConfig.from_name("tiny", data=cache, out=f"{out_root}/{name}", **COMMON, **kwargs)
            trainer = Pretrainer(cfg, volumes)
            try:
                trainer.run()
                torch.save(params(trainer.model), f"{out_root}/{name}-rank{rank}.pt")
            finally:
                trainer.close()
    finally:
        dist.destroy_process_group()


def spawn(world: int, *args, timeout: float = 240.0) -> None:
    context = mp.start_processes(_worker, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world}-process run did not finish in {timeout} s")


def test_rank_micro_batches_partition_the_global_batch():
    batch = list(range(100, 112))
    for world, accumulate in ((1, 1), (2, 1), (2, 3), (3, 2), (4, 1), (1, 4)):
        parts = [rank_micro_batches(batch, r, world, accumulate) for r in range(world)]
        assert all(len(p) == accumulate and len({len(m) for m in p}) == 1 for p in parts)
        assert [i for p in parts for m in p for i in m] == batch
    assert rank_micro_batches(batch, 1, 2, 2) == [[106, 107, 108], [109, 110, 111]]
    with pytest.raises(ValueError, match="cannot be split"):
        rank_micro_batches(batch, 0, 5, 1)


def test_two_gloo_processes_match_one_process(tmp_path, phantom_cache, cache_volumes, one_thread):
    spawn(2, str(tmp_path / "pg_init"), str(phantom_cache), str(tmp_path))
    for name in RUNS:
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(2)]
        # DDP gives every rank the same gradients; batch norm running statistics agree when it is synchronised.
        for k, v in ranks[0].items():
            if name == "sync" or not k.endswith(RUNNING_STATS):
                assert torch.equal(v, ranks[1][k]), f"{name}: ranks differ in {k}"
        out = tmp_path / name
        assert sorted(p.name for p in out.glob("written-by-rank*")) == ["written-by-rank0"]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and not any(r["skipped"] for r in rows)
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["step"] == 2 and ckpt["resolved"]["world_size"] == 2 and ckpt["resolved"]["micro_batch"] == 2
        assert ckpt["resolved"]["sync_bn"] == (name == "sync")

        single = Pretrainer(PretrainConfig.from_name("tiny", data="unused", out=str(tmp_path / f"single-{name}"),
                                                     **COMMON, **SINGLE[name]), cache_volumes)
        before = params(single.model, with_buffers=False)
        single.run()
        expected = params(single.model, with_buffers=name == "sync")
        moved = max((expected[k] - before[k]).abs().max().item() for k in before)
        assert moved > 2e-2  # the steps themselves are far larger than the tolerance
        for k, v in expected.items():
            assert_close(ranks[0][k], v, atol=ATOL[name], what=f"{name}: {k}")


def test_cpu_sync_batchnorm_is_batchnorm_for_one_process():
    torch.manual_seed(0)
    bn, sync = torch.nn.BatchNorm3d(3, momentum=None), CpuSyncBatchNorm(3, momentum=None)
    sync.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, 5, 4, 3).contiguous(memory_format=torch.channels_last_3d)
    for _ in range(2):
        torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.state_dict(), bn.state_dict())


def test_cpu_sync_batchnorm_rests_on_torchs_batchnorm_base():
    # What CpuSyncBatchNorm takes from the private _BatchNorm: the recognised type, BatchNorm's state_dict (loads
    # a BatchNorm1d/3d checkpoint strictly), and BatchNorm's forward for 2D and 5D inputs in train and eval.
    from torch.nn.modules.batchnorm import _BatchNorm

    torch.manual_seed(1)
    for plain, shape in ((torch.nn.BatchNorm1d(3), (6, 3)), (torch.nn.BatchNorm3d(3), (4, 3, 3, 2, 2))):
        plain.weight.data.uniform_(0.5, 1.5)
        plain.running_mean.fill_(0.3)
        plain.num_batches_tracked.fill_(7)
        sync = CpuSyncBatchNorm(3)
        assert isinstance(sync, _BatchNorm)
        sync.load_state_dict(plain.state_dict(), strict=True)
        assert list(sync.state_dict()) == list(plain.state_dict())
        x = torch.randn(shape)
        for training in (True, False):
            plain.train(training)
            sync.train(training)
            torch.testing.assert_close(sync(x), plain(x))
        torch.testing.assert_close(sync.state_dict(), plain.state_dict())
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        CpuSyncBatchNorm(3)(torch.randn(3))


def test_torchrun_cli_two_processes(tmp_path, phantom_cache):
    """The command users run: torchrun starts two CPU processes; rank 0 alone logs and checkpoints."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pcrlv2_fast",
         "pretrain", "--data", str(phantom_cache), "--out", str(out), "--preset", "tiny", "--batch-size", "4",
         "--steps", "1", "--device", "cpu", "--no-tensorboard"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["resolved"]["world_size"] == 2 and ckpt["resolved"]["sync_bn"] and ckpt["config"]["batch_size"] == 4
    assert json.loads((out / "config.json").read_text())["resolved"]["world_size"] == 2
