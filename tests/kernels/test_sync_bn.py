"""The fused conv blocks under synchronised batch norm: two gloo processes with kernels="triton" (the Triton
interpreter on CPU) give the outputs, gradients and running statistics of torch's synchronised batch norm (the
gloo CpuSyncBatchNorm) on the same per-process batches, which differ in size (the merge weighs them by count)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from tests import requirements
from tests.helpers import assert_close

requirements.importorskip("triton", "triton")

from pcrlv2_fast.models import LUConv  # noqa: E402
from pcrlv2_fast.nn import FusedConvBlock3d, fuse_model, fused_block_counts  # noqa: E402
from pcrlv2_fast.train.distributed import convert_sync_batchnorm  # noqa: E402

WORLD = 2


def _model(kernels: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(LUConv(2, 5, "relu"), LUConv(5, 3, "elu"), LUConv(3, 1, "sigmoid"))
    model = convert_sync_batchnorm(model, torch.device("cpu"))
    if kernels == "triton":
        fuse_model(model, "triton")
        assert all(isinstance(m, FusedConvBlock3d) for m in model)
    return model.train()


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(2 + rank, 2, 4, 5, 6, generator=g) * 2 + 0.5  # 2 and 3 samples
        upstream = torch.randn(2 + rank, 1, 4, 5, 6, generator=g)
        results = {}
        for kernels in ("torch", "triton"):
            model = _model(kernels)
            xr = x.clone().requires_grad_()
            for _ in range(2):  # two training forwards: running statistics updated twice
                y = model(xr)
            (y * upstream).sum().backward()
            results[kernels] = {"y": y.detach(), "dx": xr.grad,
                                **{f"grad {n}": p.grad for n, p in model.named_parameters()},
                                **{f"buffer {n}": b.clone() for n, b in model.named_buffers()}}
        results["counts"] = fused_block_counts(_model("triton"), "cpu")
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fused_sync_batch_norm_matches_torch_sync_batch_norm(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank, result in enumerate(ranks):
        assert result["counts"] == {"conv": "3/3", "norm_act": "3/3"}
        torch_side, fused = result["torch"], result["triton"]
        assert fused.keys() == torch_side.keys()
        for name, expected in torch_side.items():
            scale = max(1.0, float(expected.float().abs().max()))
            assert_close(fused[name], expected, atol=2e-5 * scale, rtol=1e-5, what=f"rank {rank}: {name}")
    for name, value in ranks[0]["triton"].items():
        if name.startswith("buffer"):  # the merged statistics are the same on every process
            assert_close(ranks[1]["triton"][name], value, atol=1e-6, what=name)


def test_a_single_process_sync_norm_is_plain_batch_norm():
    """Outside a process group (or with one process) a synchronised batch norm is batch norm: fused locally."""
    assert not dist.is_initialized()
    fused, plain = _model("triton"), _model("torch")
    x = torch.randn(2, 2, 4, 5, 6, generator=torch.Generator().manual_seed(3))
    assert_close(fused(x).detach(), plain(x).detach(), atol=2e-5, what="output")
