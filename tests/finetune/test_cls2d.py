"""2D classification fine-tuning: NIH labels, patient-level splits, per-finding AUROC, runs and evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pcrlv2_fast.checkpoint import CheckpointError
from pcrlv2_fast.cli import main
from pcrlv2_fast.data.images2d import ImageError
from pcrlv2_fast.finetune.cls2d import Cls2DConfig, evaluate_cls2d, finetune_cls2d, read_label_table
from pcrlv2_fast.finetune.metrics import classification_metrics, multilabel_auc, roc_auc
from pcrlv2_fast.models import Classifier2D, NonSkipUNet2D
from tests.data2d.conftest import xray_like


def test_roc_auc_by_hand_and_against_monai():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5  # ties count half
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(roc_auc([0.2, 0.3], [1, 1]))
    rng = np.random.default_rng(0)
    scores, labels = rng.random(300).round(2), rng.integers(0, 2, 300)  # rounding makes ties
    probs = np.stack([1 - scores, scores], axis=1)
    assert abs(roc_auc(scores, labels) - classification_metrics(probs, labels)["auc"]) < 1e-9
    result = multilabel_auc(np.stack([scores, 1 - scores], 1), np.stack([labels, labels], 1), ["a", "b"])
    assert abs(result["auc_per_class"]["a"] + result["auc_per_class"]["b"] - 1) < 1e-9
    assert result["mean_auc"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def nih_folder(tmp_path_factory):
    """40 images of 20 patients: "Pneumonia" images carry a bright square (a signal a few steps can learn)."""
    folder = tmp_path_factory.mktemp("nih")
    (folder / "images_001" / "images").mkdir(parents=True)
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    for k in range(40):
        image = xray_like(64, 64, k)
        finding = "Pneumonia|Effusion" if k % 2 else "No Finding"
        if k % 2:
            image[20:44, 20:44] = 255
        Image.fromarray(image).save(folder / "images_001" / "images" / f"{k:08d}_000.png")
        rows.append(f"{k:08d}_000.png,{finding},0,{k // 2}")
    (folder / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_label_table(nih_folder, tmp_path):
    table = read_label_table(nih_folder, ["Pneumonia", "Effusion"])  # the folder's one NIH CSV
    assert table.labels.shape == (40, 2) and table.labels[1].tolist() == [1, 1] and table.labels[0].tolist() == [0, 0]
    assert table.patients[:4] == ["0", "0", "1", "1"]
    with pytest.raises(ImageError, match="no image has the finding"):
        read_label_table(nih_folder / "Data_Entry_2017.csv", ["Pneumonia", "Hernia"])
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Finding Labels\na.png,No Finding\n")
    with pytest.raises(ImageError, match="no column 'Patient ID'"):
        read_label_table(bad)


def cfg(tmp_path, nih_folder, name, **kw) -> Cls2DConfig:
    base = dict(data=str(nih_folder), out=str(tmp_path / name), findings=("Pneumonia",), image_size=32, epochs=3,
                batch_size=8, iters_per_epoch=4, lr=3e-3, progress=False)
    return Cls2DConfig(**{**base, **kw})


def test_run_learns_scores_and_evaluates_alike(tmp_path, nih_folder):
    summary = finetune_cls2d(cfg(tmp_path, nih_folder, "run"))
    out = tmp_path / "run"
    split = json.loads((out / "split.json").read_text())
    patient = {f"{k:08d}_000.png": k // 2 for k in range(40)}
    parts = [{patient[n] for n in split[p]} for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # split by patient
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all("val_auc_Pneumonia" in r for r in rows)
    assert summary["test"]["mean_auc"] > 0.8  # the square is easy to see
    assert (out / "test_roc.png").stat().st_size > 1000
    result = evaluate_cls2d(out / "best.pt", nih_folder, tmp_path / "eval", progress=False)
    assert result["mean_auc"] == pytest.approx(summary["test"]["mean_auc"], abs=1e-6)
    assert result["n_images"] == len(split["test"])


def test_label_fraction_keeps_the_test_patients(tmp_path, nih_folder):
    few = finetune_cls2d(cfg(tmp_path, nih_folder, "few", label_fraction=0.25, epochs=1, iters_per_epoch=1))
    ref = finetune_cls2d(cfg(tmp_path, nih_folder, "ref", epochs=1, iters_per_epoch=1))
    few_split, ref_split = (json.loads((tmp_path / n / "split.json").read_text()) for n in ("few", "ref"))
    assert few_split["test"] == ref_split["test"] and few_split["val"] == ref_split["val"]
    assert set(few_split["train"]) < set(ref_split["train"])  # a quarter of the training patients keep labels
    assert few["images"]["train"] == len(few_split["train"]) == 2 * 3  # 12 training patients x 0.25, 2 images each
    assert ref["images"]["train"] == few["images"]["train"] + few["images"]["unlabelled"]


def test_init_from_pretraining_and_clear_errors(tmp_path, nih_folder, capsys):
    pretrained = NonSkipUNet2D()
    torch.nn.init.constant_(pretrained.encoder.conv1.weight, 0.01)
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "pre.pt")
    from pcrlv2_fast.finetune.cls2d import build_classifier

    model = build_classifier(1, str(tmp_path / "pre.pt"), 0.2, "linear")
    assert torch.equal(model.encoder.conv1.weight, pretrained.encoder.conv1.weight)
    assert not any(p.requires_grad for p in model.encoder.parameters()) and model.head[1].weight.requires_grad
    model.train()
    assert not model.encoder.training  # frozen BatchNorm statistics
    torch.save({"state_dict": Classifier2D(3).state_dict()}, tmp_path / "cls.pt")
    assert isinstance(build_classifier(1, str(tmp_path / "cls.pt"), 0.2, "full"), Classifier2D)  # head left out
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="wrong.pt"):
        build_classifier(1, str(tmp_path / "wrong.pt"), 0.2, "full")
    base = ["finetune", "--task", "cls", "--dims", "2", "--data", str(nih_folder), "--init", "random", "--out",
            str(tmp_path / "e")]
    for extra, words in [(["--patch-size", "8", "8", "8"], "--patch-size: not used with --dims 2"),
                         (["--mode", "frozen"], "--mode frozen is not available with --dims 2"),
                         (["--findings", "Nothing"], "no image has the finding")]:
        assert main(base + extra) == 2
        assert words in capsys.readouterr().err
    assert main([*base[:2], "seg", *base[3:]]) == 2
    assert "classification only" in capsys.readouterr().err


def test_cli_runs_and_evaluates(tmp_path, nih_folder, capsys):
    args = ["finetune", "--task", "cls", "--dims", "2", "--data", str(nih_folder / "Data_Entry_2017.csv"), "--init",
            "random", "--out", str(tmp_path / "cli"), "--findings", "Pneumonia,Effusion", "--image-size", "32",
            "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    assert "AUC per finding: Pneumonia" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "cli" / "best.pt"), "--data", str(nih_folder), "--out",
                 str(tmp_path / "ev"), "--split", "all", "--no-progress"]) == 0
    shown = json.loads(capsys.readouterr().out.splitlines()[0])
    assert shown["n_images"] == 40 and set(shown["auc_per_class"]) == {"Pneumonia", "Effusion"}
