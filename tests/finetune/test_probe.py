"""The frozen-encoder probe (finetune/probe.py) and ``pretrain --probe``: deterministic, able to fail, logged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pcrlv2_fast.cli import main as cli_main
from pcrlv2_fast.encoders import PCRLv2Encoder3D
from pcrlv2_fast.finetune.probe import VoxelProbe, load_probe_set
from pcrlv2_fast.models import NonSkipUNet3D
from tests.finetune.phantoms import write_pairs


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("probe_spheres"), n=4, shape=(32, 32, 16))


def _state(seed: int, width: int = 16) -> dict:
    torch.manual_seed(seed)
    return NonSkipUNet3D(width=width).state_dict()


def test_probe_is_deterministic_and_separates_bright_spheres(spheres):
    probe_set = load_probe_set(spheres, max_cases=4)
    assert (len(probe_set.fit), len(probe_set.score), probe_set.num_classes) == (2, 2, 2)
    state = _state(0)
    first = VoxelProbe(probe_set, seed=0)(state)
    assert first == VoxelProbe(probe_set, seed=0)(state) == VoxelProbe(probe_set, seed=0)(state)
    # Even a random encoder passes intensity through: the bright spheres are found by a linear read-out.
    assert 0.5 < first["probe_dice"] <= 1 and len(first["probe_dice_per_class"]) == 1
    # Other voxels to fit on: another (still deterministic) score.
    assert VoxelProbe(probe_set, seed=1, voxels_per_class=50)(state) != first


def test_probe_fails_on_features_that_carry_nothing(spheres):
    probe_set = load_probe_set(spheres, max_cases=4)
    dead = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in _state(0).items()}
    # Constant features: the read-out can only predict the commonest class, background; the sphere Dice is 0.
    assert VoxelProbe(probe_set)(dead)["probe_dice"] == 0.0


def test_probe_reads_the_encoder_of_any_state_dict(spheres):
    probe_set = load_probe_set(spheres, max_cases=2)
    state = _state(3)
    encoder_only = PCRLv2Encoder3D.from_state_dict(state).state_dict()
    prefixed = {f"model.{k}": v for k, v in state.items()}
    scores = {json.dumps(VoxelProbe(probe_set)(s)) for s in (state, encoder_only, prefixed)}
    assert len(scores) == 1


def test_probe_needs_two_cases(spheres, tmp_path):
    one = write_pairs(tmp_path / "one", n=1, shape=(24, 24, 16))
    with pytest.raises(ValueError, match="at least 2 labelled cases"):
        load_probe_set(one)
    with pytest.raises(ValueError, match="at least 2 labelled cases"):
        load_probe_set(spheres, max_cases=1)


def test_probe_crops_large_cases_around_their_foreground(spheres):
    probe_set = load_probe_set(spheres, max_cases=2, max_shape=(16, 16, 8))
    for case in probe_set.fit + probe_set.score:
        assert case.image.shape == (1, 16, 16, 8) and case.label.shape == (16, 16, 8) and np.any(case.label)


def _probe_rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "probe_dice" in r]


def test_pretrain_probe_logs_rows_summary_and_plot(tmp_path, phantom_cache, spheres):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli_main(["pretrain", "--data", str(phantom_cache), "--out", str(out), "--preset", "tiny", "--steps",
                         "3", "--probe", str(spheres), "--probe-every", "2", "--probe-cases", "4", "--pictures",
                         "--no-tensorboard"]) == 0
        runs.append(out)
    rows = _probe_rows(runs[0])
    # Before the first step, every 2 steps, and at the end.
    assert [r["step"] for r in rows] == [0, 2, 3]
    assert all(0 <= r["probe_dice"] <= 1 and "probe_dice_1" in r for r in rows)
    assert rows == _probe_rows(runs[1])  # deterministic for a seed
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert [p["step"] for p in summary["probe_dice"]] == [0, 2, 3]
    assert (runs[0] / "loss_curve.png").stat().st_size > 10_000
    assert cli_main(["pretrain", "--data", str(phantom_cache), "--out", str(tmp_path / "c"), "--preset", "tiny",
                     "--probe", str(spheres), "--probe-every", "0"]) == 2
