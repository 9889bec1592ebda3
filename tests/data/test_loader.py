"""Batch loaders (torch, native) against the per-sample dataset path."""

import json

import numpy as np
import pytest
import torch

from pcrlv2_fast.cli import main as cli_main
from pcrlv2_fast.data import (
    AugmentConfig,
    BatchLoader,
    CropConfig,
    PretrainDataset,
    default_loader,
    draw_sample_params,
    native,
    open_cache,
    preprocess,
    resolve_loader,
)
from pcrlv2_fast.data.batched import stack_view_params
from pcrlv2_fast.train import PretrainConfig, Pretrainer

BACKENDS = [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="C++ extension not built")),
]
BATCHES = [[0, 5, 2], [7, 1]]


def reference_batches(dataset, batches):
    return list(torch.utils.data.DataLoader(dataset, batch_sampler=batches))


def assert_same_batches(expected, got, atol=1e-4):
    assert len(expected) == len(got)
    for ref, out in zip(expected, got, strict=True):
        assert set(ref) == set(out)
        for key in ("global_boxes", "local_boxes", "volume_index"):
            assert torch.equal(ref[key], out[key]), key
        for key in ("x1", "x2", "gt", "locals"):
            assert out[key].dtype == torch.float32 and out[key].shape == ref[key].shape, key
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_loader_equals_dataset(phantom_volumes, backend):
    dataset = PretrainDataset(phantom_volumes, seed=3, pairs_per_volume=4)
    dataset.set_epoch(1)
    expected = reference_batches(dataset, BATCHES)
    got = list(BatchLoader(dataset, backend).batches(BATCHES))
    # Noise included: each view's field is drawn from the sample's generator where the dataset draws it.
    assert_same_batches(expected, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_loader_without_augmentation(phantom_volumes, backend):
    dataset = PretrainDataset(phantom_volumes, seed=5, pairs_per_volume=2, augment=False)
    batches = [[0, 3], [1, 2]]
    assert_same_batches(reference_batches(dataset, batches), list(BatchLoader(dataset, backend).batches(batches)))


def test_draw_sample_params_matches_view_samplers():
    """Without the noise fields, the draws are augment.py's samplers view after view (spatial of both globals
    first), so the noise fields sit exactly where augment.noise draws them."""
    cfg, crop = AugmentConfig(), CropConfig()
    g_params, l_params = draw_sample_params(torch.Generator().manual_seed(7), cfg, crop.global_out, crop.local_out, 6)
    assert g_params["noise_field"].shape == (2, 1, *crop.global_out)
    assert l_params["noise_field"].shape == (6, 1, *crop.local_out)
    assert "swap" in g_params and "swap" not in l_params
    # Spatial draws of view 1 come first: the same as stack_view_params' first flip/affine.
    first = stack_view_params(torch.Generator().manual_seed(7), 1, cfg, crop.global_out, with_swap=False)
    assert torch.equal(g_params["flip"][0], first["flip"][0])
    assert torch.equal(g_params["scales"][0], first["scales"][0])
    assert torch.equal(g_params["degrees"][0], first["degrees"][0])


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory, phantom_dir):
    """The phantoms preprocessed into a cache (int16 HU volumes, memory-mapped by open_cache)."""
    cache = tmp_path_factory.mktemp("loader") / "cache"
    preprocess(phantom_dir, cache, progress=False)
    return cache


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_loader_on_memory_mapped_cache(phantom_cache, backend):
    volumes = open_cache(phantom_cache)
    assert all(isinstance(v.array, np.memmap) for v in volumes)
    dataset = PretrainDataset(volumes, seed=1, pairs_per_volume=2)
    batches = [[0, 3], [2, 1]]
    assert_same_batches(reference_batches(dataset, batches), list(BatchLoader(dataset, backend).batches(batches)))


def test_loader_choice_and_errors(phantom_volumes, monkeypatch):
    assert default_loader() == ("native" if native.available() else "torch")
    with pytest.raises(ValueError, match="loader must be one of"):
        resolve_loader("dali")
    with pytest.raises(ValueError, match="loader"):
        PretrainConfig(loader="fast").validate()
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "load_error", lambda: "no compiler here")
    assert default_loader() == "torch"
    with pytest.raises(ValueError, match="no compiler here"):
        Pretrainer(PretrainConfig.from_name("tiny", data="unused", out="unused", loader="native"), phantom_volumes)


def test_pretrainer_batches_are_the_same_with_every_loader(tmp_path, phantom_volumes):
    """Pretrainer.batches gives the same batches (resumed mid-epoch too) whichever loader builds them, so the
    training steps agree as well; a full run is timed only once below (a CPU step costs seconds)."""
    loaders = ["dataset", "torch", *(["native"] if native.available() else [])]
    runs = {}
    for loader in loaders:
        cfg = PretrainConfig.from_name("tiny", data="unused", out=str(tmp_path / loader), loader=loader,
                                       pairs_per_volume=3)
        trainer = Pretrainer(cfg, phantom_volumes)
        assert trainer.loader == loader
        runs[loader] = list(trainer.batches(1, 1))
    assert len(runs["dataset"]) == 2
    for loader in loaders[1:]:
        assert_same_batches(runs["dataset"], runs[loader])


def test_tiny_pretrain_from_cache_with_batch_loader(tmp_path, phantom_cache):
    out = tmp_path / "run"
    assert cli_main(["pretrain", "--data", str(phantom_cache), "--out", str(out), "--preset", "tiny", "--steps", "2",
                     "--no-pictures", "--loader", "torch"]) == 0
    assert json.loads((out / "config.json").read_text())["loader"] == "torch"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_loader_without_local_views(phantom_volumes, backend):
    dataset = PretrainDataset(phantom_volumes, CropConfig(n_local=0), seed=2, pairs_per_volume=2)
    batches = [[3, 0]]
    got = list(BatchLoader(dataset, backend).batches(batches))
    assert got[0]["locals"].shape == (2, 0, 1, 16, 16, 16)
    assert_same_batches(reference_batches(dataset, batches), got)
