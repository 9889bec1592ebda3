"""Options of training at scale: precision flags, optimizer kernels, batch splitting checks, CUDA graphs refusal,
and their command-line spelling."""

import pytest
import torch

from pcrlv2_fast.cli import _pretrain_config, build_parser
from pcrlv2_fast.cli import main as cli_main
from pcrlv2_fast.models import NonSkipUNet3D
from pcrlv2_fast.train import PretrainConfig, Pretrainer
from pcrlv2_fast.train.optim import build_optimizer
from pcrlv2_fast.train.step import set_float32_precision


def parse(*args):
    return _pretrain_config(build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", *args]))


def test_cli_flags_reach_the_config():
    cfg = parse("--preset", "tiny", "--precision", "tf32", "--accumulate", "2", "--no-sync-bn", "--optim-impl", "loop",
                "--max-nonfinite", "3", "--keep-checkpoints", "0", "--log-every", "5", "--no-tensorboard")
    assert (cfg.precision, cfg.accumulate, cfg.sync_bn, cfg.optim_impl) == ("tf32", 2, False, "loop")
    assert (cfg.max_nonfinite, cfg.keep_checkpoints, cfg.log_every, cfg.tensorboard) == (3, 0, 5, False)
    assert parse("--sync-bn").sync_bn is True and parse().sync_bn is None
    cfg = parse("--prefetch", "0", "--loader-threads", "1", "--gpu-cache-gb", "12.5")
    assert (cfg.prefetch, cfg.loader_threads, cfg.gpu_cache_gb) == (0, 1, 12.5)
    assert (parse().prefetch, parse().loader_threads, parse().gpu_cache_gb, parse().log_every) == (None,) * 4
    with pytest.raises(ValueError, match="gpu_cache_gb"):
        parse("--gpu-cache-gb", "-1").validate()


def test_cuda_graphs_flag_explains_why_not(tmp_path, capsys):
    assert cli_main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--cuda-graphs"]) == 2
    err = capsys.readouterr().err
    assert "CUDA graph" in err and "random decoder scales" in err and "non-finite" in err


def test_tf32_switches():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_float32_precision("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_float32_precision("fp32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_kernels(optimizer):
    model = NonSkipUNet3D(width=1)
    expect = {"auto": (False, True), "foreach": (False, True), "loop": (False, False), "fused": (True, False)}
    for impl, (fused, foreach) in expect.items():
        opt = build_optimizer(PretrainConfig(optimizer=optimizer, optim_impl=impl), model)
        assert (bool(opt.defaults["fused"]), bool(opt.defaults["foreach"])) == (fused, foreach), impl
    # The CPU fused and foreach kernels take the same steps as the loop.
    steps = {}
    for impl in ("loop", "fused", "foreach"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 5)
        opt = build_optimizer(PretrainConfig(optimizer=optimizer, optim_impl=impl, lr=0.1), layer)
        for _ in range(2):
            for p in layer.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        steps[impl] = layer.weight.detach().clone()
    torch.testing.assert_close(steps["fused"], steps["loop"])
    torch.testing.assert_close(steps["foreach"], steps["loop"])


def test_batch_split_checks(tmp_path, cache_volumes):
    with pytest.raises(ValueError, match="multiple of accumulate"):
        PretrainConfig(batch_size=6, accumulate=4).validate()
    with pytest.raises(ValueError, match="accumulate must be >= 1"):
        PretrainConfig(accumulate=0).validate()
    with pytest.raises(ValueError, match="projection BatchNorm1d"):
        Pretrainer(PretrainConfig.from_name("tiny", data="u", out=str(tmp_path), batch_size=2, accumulate=2),
                   cache_volumes)
    with pytest.raises(ValueError, match="max_nonfinite"):
        PretrainConfig(max_nonfinite=-1).validate()


def test_kernels_option_builds_the_fused_model_and_loss(phantom_volumes):
    """--kernels triton gives the fused conv blocks (official state_dict names) and the fused loss, with the model
    returning low-resolution masks for it; the default stays the plain PyTorch path."""
    from pcrlv2_fast.nn import FusedConvBlock3d

    assert parse("--kernels", "triton").kernels == "triton" and parse().kernels == "torch"
    with pytest.raises(ValueError, match="kernels"):
        PretrainConfig(kernels="cuda").validate()
    plain = Pretrainer(PretrainConfig.from_name("tiny", data="unused", out="unused"), phantom_volumes)
    fused = Pretrainer(PretrainConfig.from_name("tiny", data="unused", out="unused", kernels="triton"), phantom_volumes)
    assert plain.loss_fn.kernels == "torch" and fused.loss_fn.kernels == "triton"
    assert not any(isinstance(m, FusedConvBlock3d) for m in plain.model.modules())
    assert sum(isinstance(m, FusedConvBlock3d) for m in fused.model.modules()) == 17
    assert list(fused.model.state_dict()) == list(plain.model.state_dict())
    assert plain.model.upsample_masks and not fused.model.upsample_masks
