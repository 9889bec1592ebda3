"""End to end: a tiny fine-tuning run learns the sphere phantom task; evaluate, export and the CLI around it."""

import argparse
import json

import numpy as np
import pytest
import torch

from pcrlv2_fast import CheckpointError, NonSkipUNet3D, save_checkpoint
from pcrlv2_fast.data import ScanError
from pcrlv2_fast.encoders import PCRLv2Encoder3D, UNet3D
from pcrlv2_fast.finetune import FinetuneConfig, evaluate_checkpoint, finetune
from pcrlv2_fast.finetune.cli import add_finetune_parsers
from pcrlv2_fast.finetune.evaluate import predict_segmentation
from tests.finetune.phantoms import sphere_phantom, write_pairs, write_volume

TINY = dict(width=4, patch_size=(24, 24, 16), batch_size=2, progress=False)


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("spheres"), n=6, shape=(40, 40, 24))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining checkpoint of ours (width 4) standing in for a PCRLv2 run."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("pre") / "checkpoint.pt", NonSkipUNet3D(width=4), epoch=1)


@pytest.fixture(scope="module")
def tiny_run(spheres, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = FinetuneConfig(task="seg", data=str(spheres), out=str(out), init="random", epochs=4, iters_per_epoch=10,
                         lr=3e-3, hd95=True, **TINY)
    return out, finetune(cfg)


def _parser():
    parser = argparse.ArgumentParser(prog="pcrlv2-fast")
    add_finetune_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def test_tiny_run_improves_dice_over_its_first_epoch(tiny_run):
    out, summary = tiny_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    first, best = rows[0]["val_dice"], max(r["val_dice"] for r in rows)
    assert best >= first + 0.15, rows
    assert summary["best_metric"] == pytest.approx(best)
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["n_cases"] == 1 and 0.0 <= test["mean_dice"] <= 1.0 and test["mean_hd95"] >= 0
    assert (out / "test_overlays.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    split = json.loads((out / "split.json").read_text())
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (4, 1, 1)
    assert (out / "loss_curve.png").is_file() and (out / "summary.json").is_file()


def test_evaluate_reproduces_the_test_metrics(tiny_run, spheres, tmp_path):
    out, _ = tiny_run
    result = evaluate_checkpoint(out / "best.pt", spheres, tmp_path / "eval", progress=False)
    recorded = json.loads((out / "test_metrics.json").read_text())
    assert result["mean_dice"] == pytest.approx(recorded["mean_dice"], abs=1e-6)
    assert (tmp_path / "eval" / "test_metrics.json").is_file() and (tmp_path / "eval" / "test_overlays.png").is_file()
    every = evaluate_checkpoint(out / "best.pt", spheres, tmp_path / "all", split="all", hd95=False, progress=False)
    assert every["n_cases"] == 6 and "mean_hd95" not in every


def test_cli_evaluate_and_export_encoder(tiny_run, spheres, tmp_path, capsys):
    out, _ = tiny_run
    args = _parser().parse_args(["evaluate", str(out / "best.pt"), "--data", str(spheres), "--out",
                                 str(tmp_path / "e"), "--no-progress"])
    assert args.func(args) == 0
    assert (tmp_path / "e" / "test_metrics.json").is_file()
    args = _parser().parse_args(["export-encoder", str(out / "best.pt"), "--out", str(tmp_path / "enc.pt")])
    assert args.func(args) == 0
    assert "encoder width 4" in capsys.readouterr().out
    encoder = PCRLv2Encoder3D(width=4)
    encoder.load_state_dict(torch.load(tmp_path / "enc.pt", weights_only=True), strict=True)


def test_evaluate_refuses_data_without_the_split_cases(tiny_run, tmp_path):
    out, _ = tiny_run
    other = write_pairs(tmp_path / "other", n=1, shape=(24, 24, 16), seed=50)
    (other / "case000_image.nii.gz").rename(other / "zzz_image.nii.gz")
    (other / "case000_label.nii.gz").rename(other / "zzz_label.nii.gz")
    with pytest.raises(ScanError, match="--split all"):
        evaluate_checkpoint(out / "best.pt", other, tmp_path / "e", progress=False)
    pretraining = save_checkpoint(tmp_path / "pre.pt", NonSkipUNet3D(width=2))
    with pytest.raises(CheckpointError, match="not a fine-tuning checkpoint"):
        evaluate_checkpoint(pretraining, other, tmp_path / "e", progress=False)


@pytest.mark.parametrize("mode", ["full", "frozen", "linear"])
def test_pretrained_init_and_modes(spheres, pretrained, tmp_path, mode):
    cfg = FinetuneConfig(task="seg", data=str(spheres), out=str(tmp_path), init=str(pretrained), mode=mode,
                         epochs=1, iters_per_epoch=2, label_fraction=0.25, **{**TINY, "width": None})
    summary = finetune(cfg)
    assert summary["cases"]["train"] == 1 and summary["cases"]["unlabelled"] == 3
    assert summary["arch"]["model"] == ("linear_seg" if mode == "linear" else "unet")
    tuned = torch.load(tmp_path / "best.pt", weights_only=True)["state_dict"]
    source = torch.load(pretrained, weights_only=True)["state_dict"]
    same = [torch.equal(tuned["encoder." + k], v) for k, v in source.items() if k.startswith("down_tr")]
    # Frozen and linear modes leave every encoder tensor (BatchNorm statistics included) as pretrained.
    assert all(same) if mode != "full" else not all(same)


def test_classification_task(tmp_path):
    for cls, n_spheres in (("absent", 0), ("present", 2)):
        for i in range(4):
            image, _ = sphere_phantom((24, 24, 16), seed=10 * i + n_spheres, n_spheres=n_spheres)
            write_volume(image, tmp_path / "data" / cls / f"s{i}.nii.gz")
    cfg = FinetuneConfig(task="cls", data=str(tmp_path / "data"), out=str(tmp_path / "run"), init="random",
                         epochs=1, iters_per_epoch=3, **{**TINY, "patch_size": (16, 16, 16)})
    summary = finetune(cfg)
    assert summary["num_classes"] == 2 and summary["class_names"] == ["absent", "present"]
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert test["n_cases"] == 2 and 0.0 <= test["accuracy"] <= 1.0 and "auc" in test
    assert (tmp_path / "run" / "test_overlays.png").is_file()


def test_init_without_encoder_and_occupied_out(spheres, tiny_run, tmp_path):
    bad = tmp_path / "not_pcrlv2.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, bad)
    cfg = FinetuneConfig(task="seg", data=str(spheres), out=str(tmp_path / "r"), init=str(bad), epochs=1,
                         iters_per_epoch=1, **{**TINY, "width": None})
    with pytest.raises(CheckpointError, match="no PCRLv2 encoder") as err:
        finetune(cfg)
    assert str(bad) in str(err.value) and not (tmp_path / "r").exists()  # a refused run leaves no files
    out, _ = tiny_run
    with pytest.raises(ValueError, match="--overwrite"):
        finetune(FinetuneConfig(task="seg", data=str(spheres), out=str(out), epochs=1, iters_per_epoch=1, **TINY))


def test_cli_arguments_map_to_the_config(tmp_path):
    from pcrlv2_fast.finetune.cli import _finetune_config

    args = _parser().parse_args(["finetune", "--task", "seg", "--data", "d", "--init", "random", "--out", "o",
                                 "--label-fraction", "5%", "--spacing", "1.5", "--keep-labels", "5,1",
                                 "--patch-size", "32", "32", "16", "--flip", "--mode", "frozen"])
    cfg = _finetune_config(args)
    assert cfg.label_fraction == pytest.approx(0.05) and cfg.spacing == (1.5, 1.5, 1.5)
    assert cfg.keep_labels == (5, 1) and cfg.patch_size == (32, 32, 16) and cfg.flip is True
    assert cfg.mode == "frozen" and cfg.epochs == FinetuneConfig().epochs
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["finetune", "--task", "seg", "--data", "d", "--init", "random", "--out", "o",
                              "--label-fraction", "150%"])
    assert exit_info.value.code == 2


def test_main_cli_exit_code_and_one_line_error(tmp_path, capsys):
    from pcrlv2_fast import cli

    code = cli.main(["export-encoder", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and str(tmp_path / "missing.pt") in err and "\n" not in err
    code = cli.main(["finetune", "--task", "seg", "--data", str(tmp_path / "nothing"), "--init", "random",
                     "--out", str(tmp_path / "o")])
    assert code == 2 and "no such file or folder" in capsys.readouterr().err


def test_sliding_window_pads_small_volumes_like_training_patches():
    """A volume smaller than the window is padded with its minimum (as PatchSampler does), then cropped back."""
    torch.manual_seed(0)
    model = UNet3D(3, width=2).eval()
    image = np.random.default_rng(0).normal(size=(1, 10, 30, 5)).astype(np.float32)
    pred = predict_segmentation(model, image, (16, 16, 8), torch.device("cpu"), overlap=0.0)
    assert pred.shape == (10, 30, 5)
    padded = np.pad(image, [(0, 0), (0, 6), (0, 0), (0, 3)], constant_values=float(image.min()))
    full = predict_segmentation(model, padded, (16, 16, 8), torch.device("cpu"), overlap=0.0)
    assert np.array_equal(pred, full[:10, :, :5])
