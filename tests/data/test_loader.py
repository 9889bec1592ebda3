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
from pcrlv2_fast.data.augment import draw_sample_views
from pcrlv2_fast.data.loader import BufferPool
from pcrlv2_fast.train import PretrainConfig, Pretrainer
from tests import requirements

BACKENDS = [
    "torch",
    pytest.param("native", marks=requirements.needs("native", native.available(),
                                                    f"C++ extension not built: {native.load_error()}")),
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


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_draw_sample_params_layout_ranges_and_determinism(kind):
    """One sample's parameters (from a numpy generator, as the dataset draws them, or a torch one): stacked per
    view kind, inside the configured ranges, a pure function of the generator's seed, and the same values the
    per-view dicts of the dataset path see."""

    def make():
        return np.random.default_rng(7) if kind == "numpy" else torch.Generator().manual_seed(7)

    cfg, crop = AugmentConfig(flip_axes=(0, 2)), CropConfig()
    g_params, l_params = draw_sample_params(make(), cfg, crop.global_out, crop.local_out, 6)
    again, _ = draw_sample_params(make(), cfg, crop.global_out, crop.local_out, 6)
    for key in ("flip", "scales", "degrees", "sigmas", "noise_std", "noise_seed", "gamma", "swap"):
        assert torch.equal(g_params[key], again[key]), key
    assert g_params["noise_seed"].shape == (2,) and g_params["noise_seed"].dtype == torch.int64
    assert l_params["noise_seed"].shape == (6,)
    assert len(set(g_params["noise_seed"].tolist() + l_params["noise_seed"].tolist())) == 8
    assert g_params["swap"].shape == (2, cfg.swap_iterations, 2, 3) and "swap" not in l_params
    assert g_params["swap_patch"] == cfg.swap_patch
    assert not g_params["flip"][:, 1].any() and not l_params["flip"][:, 1].any()  # axis 1 not allowed
    for params in (g_params, l_params):
        for key, bounds in (("scales", cfg.scales), ("degrees", cfg.degrees), ("sigmas", cfg.blur_std),
                            ("noise_std", cfg.noise_std)):
            assert (params[key] >= bounds[0]).all() and (params[key] <= bounds[1]).all(), key
        log_gamma = params["gamma"].log()
        assert (log_gamma >= cfg.log_gamma[0] - 1e-12).all() and (log_gamma <= cfg.log_gamma[1] + 1e-12).all()
    starts = g_params["swap"]
    assert (starts >= 0).all() and (starts < torch.tensor(crop.global_out) - torch.tensor(cfg.swap_patch)).all()
    assert not (starts[:, :, 0] == starts[:, :, 1]).all(dim=-1).any()  # the two patches of a pair differ
    globals_, locals_ = draw_sample_views(make(), cfg, crop.global_out, crop.local_out, 6)
    assert globals_[1]["noise_seed"] == int(g_params["noise_seed"][1])
    assert locals_[5]["gamma"] == float(l_params["gamma"][5])
    assert globals_[0]["flip"] == tuple(a for a in range(3) if g_params["flip"][0, a])


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
        resolve_loader("fastest")
    from pcrlv2_fast.data import dali

    monkeypatch.setattr(dali, "dali_load_error", lambda: "--loader dali needs NVIDIA DALI: not here")
    with pytest.raises(ValueError, match="needs NVIDIA DALI"):
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
        assert trainer.loader_name == loader
        runs[loader] = list(trainer.batches(1, 1))
    assert len(runs["dataset"]) == 2
    for loader in loaders[1:]:
        assert_same_batches(runs["dataset"], runs[loader])


@requirements.needs("native", native.available(), f"C++ extension not built: {native.load_error()}")
def test_the_trainer_releases_each_batch_after_its_step(tmp_path, phantom_volumes):
    cfg = PretrainConfig.from_name("tiny", data="unused", out=str(tmp_path / "run"), loader="native", steps=3,
                                   pairs_per_volume=4)
    trainer = Pretrainer(cfg, phantom_volumes)
    trainer.run()
    # Steps 2 and 3 reuse the buffers of the batches before them; the last batch stays leased (its views are
    # in the step's output, drawn in the pictures).
    assert trainer.batch_loader.pool.reused >= 2
    assert len(trainer._leased) == 1


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


@requirements.needs("native", native.available(), f"C++ extension not built: {native.load_error()}")
def test_native_loader_reuses_only_released_output_buffers(phantom_volumes):
    # A batch's memory is written again only after the caller released it (and, with ``after``, once that event
    # has completed); a batch held, or merely dropped, is never reused.
    dataset = PretrainDataset(phantom_volumes, seed=2, pairs_per_volume=8)
    loader = BatchLoader(dataset, "native", num_threads=1)
    first = loader.batch([0, 1])
    saved = {k: first[k].clone() for k in ("x1", "x2", "gt", "locals")}
    pointer = first["x1"].data_ptr()
    second = loader.batch([2, 3])
    assert second["x1"].data_ptr() != pointer
    for key, value in saved.items():
        assert torch.equal(first[key], value), key
    del second  # dropped, not released: its memory goes back to the allocator, not to the pool
    assert loader.pool.reused == 0

    class Event:  # stands for a torch.cuda.Event: the copy that reads the buffers has not completed yet
        done = False

        def query(self):
            return self.done

    event = Event()
    first.release(after=event)
    first.release()  # a second release does nothing
    third = loader.batch([4, 5])
    assert third["x1"].data_ptr() != pointer and loader.pool.reused == 0
    event.done = True
    fourth = loader.batch([6, 7])
    assert fourth["x1"].data_ptr() == pointer and loader.pool.reused > 0
    expected = reference_batches(dataset, [[4, 5], [6, 7]])
    assert_same_batches(expected, [third, fourth])


def test_buffer_pool_keeps_at_most_size_buffers():
    pool = BufferPool(size=2)
    buffers = [pool.take((2, 3)) for _ in range(3)]
    pool.give_back(buffers)
    got = [pool.take((2, 3)) for _ in range(3)]
    assert pool.reused == 2
    assert {t.data_ptr() for t in got[:2]} == {t.data_ptr() for t in buffers[1:]}  # the oldest was dropped
    assert pool.take((4,)).shape == (4,)


@requirements.needs("native", native.available(), f"C++ extension not built: {native.load_error()}")
def test_native_loader_threads_never_share_output_buffers(phantom_volumes):
    import threading

    dataset = PretrainDataset(phantom_volumes, seed=4, pairs_per_volume=8)
    loader = BatchLoader(dataset, "native", num_threads=1)
    requests = [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [10, 11]]]
    results: dict[int, list] = {0: [], 1: []}

    def work(k):
        for indices in requests[k]:
            batch = loader.batch(indices)
            results[k].append(batch)
            del batch  # the earlier batches stay referenced by results

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = results[0] + results[1]
    assert len({b["x1"].data_ptr() for b in got}) == len(got)
    assert_same_batches(reference_batches(dataset, requests[0] + requests[1]), got)


def test_gpu_cache_budget_decides_between_the_torch_and_native_loaders(phantom_volumes):
    from pcrlv2_fast.data import bank_bytes, gpu_cache_choice
    from pcrlv2_fast.data.batched import VolumeBank

    need = bank_bytes(phantom_volumes)
    bank = VolumeBank([v.array for v in phantom_volumes], [tuple(v.window) for v in phantom_volumes])
    assert need == bank.data.numel() * bank.data.element_size()
    loader, message = gpu_cache_choice(need, need, native_ok=False)
    assert loader == "torch" and "on the GPU" in message
    loader, message = gpu_cache_choice(need, need - 1, native_ok=True)
    assert loader == "native" and "--gpu-cache-gb" in message and "pinned" in message
    with pytest.raises(ValueError, match="raise --gpu-cache-gb or build the C\\+\\+ extension"):
        gpu_cache_choice(need, need / 2, native_ok=False)
