"""The DALI backend of 2D pretraining: the batches of the torch loader, from the files, element-wise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests import requirements

requirements.importorskip("nvidia.dali", "dali")

from pcrlv2_fast.data.dali2d import DaliLoader2D  # noqa: E402
from pcrlv2_fast.data.dataset2d import BatchLoader2D, PretrainDataset2D  # noqa: E402
from pcrlv2_fast.data.images2d import ImageBank, load_images  # noqa: E402
from pcrlv2_fast.data.views2d import ViewConfig2D  # noqa: E402
from pcrlv2_fast.train import PretrainConfig  # noqa: E402
from pcrlv2_fast.train.loop2d import Pretrainer2D  # noqa: E402

SMALL = ViewConfig2D(global_size=64, local_size=32)


@pytest.mark.parametrize("views", [SMALL, ViewConfig2D()])
def test_dali_batches_equal_the_torch_loader(xray_dir, views):
    ds = PretrainDataset2D(load_images(xray_dir, progress=False), views, seed=4, samples_per_image=2)
    ds.set_epoch(3)
    indices = [5, 0, 9, 2]
    ref, got = BatchLoader2D(ds).batch(indices), DaliLoader2D(ds, num_threads=1, batch_size=2).batch(indices)
    for key in ("x1", "x2", "gt", "locals"):
        assert got[key].shape == ref[key].shape
        torch.testing.assert_close(got[key], ref[key], atol=3e-4, rtol=0, msg=key)
    for key in ("global_boxes", "local_boxes", "volume_index"):
        assert torch.equal(got[key], ref[key]), key


def test_dali_refuses_what_it_cannot_decode(tmp_path, xray_dir):
    values = (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    sixteen = load_images(tmp_path, progress=False)
    with pytest.raises(ValueError, match="16-bit or DICOM"):
        DaliLoader2D(PretrainDataset2D(sixteen))
    in_memory = ImageBank.from_arrays([np.zeros((64, 64), np.uint8)], ["a"])
    with pytest.raises(ValueError, match="not read from files"):
        DaliLoader2D(PretrainDataset2D(in_memory))


def test_pretraining_with_the_dali_loader(tmp_path, xray_dir):
    bank = load_images(xray_dir, progress=False)
    losses = {}
    for loader in ("torch", "dali"):
        cfg = PretrainConfig(out=str(tmp_path / loader), dims=2, batch_size=2, steps=1, lr=1e-2, pictures=False,
                             tensorboard=False, loader=loader)
        trainer = type("Small", (Pretrainer2D,), {"views": SMALL})(cfg, bank)
        trainer.run()
        trainer.close()
        losses[loader] = json.loads((tmp_path / loader / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(losses["dali"] - losses["torch"]) < 1e-4
