"""2D data path throughput (chest X-rays): one sample = two augmented 224-pixel global views, their target and six
augmented 96-pixel local views, as a 2D pretraining step consumes per batch element.

Providers, all on the same real NIH ChestX-ray14 images, one core each (torch.set_num_threads(1)), timed
round-robin (a batch's worth of samples per provider per round), so the ratios come from the same moments:
- ``official_file``: the official per-sample chain (``official_2d.py``: the PNG opened and converted to RGB, then
  torchvision's PIL transforms) as the official ``ChestDataset`` runs it per item;
- ``official_memory``: the same chain on images already decoded (the transforms alone);
- ``dataset``: this engine's per-sample ``PretrainDataset2D`` item (op-by-op reference, one grey channel);
- ``torch``: ``BatchLoader2D``, whole batches (``--batch``, default 32) at once; seconds per sample are the
  batch's seconds over its size;
- ``dali``: ``DaliLoader2D``, the same batches decoded, cut and resized by a DALI pipeline (one thread) from the
  files (skipped without NVIDIA DALI).
With ``--device cuda`` the ``torch`` and ``dali`` loaders run on the GPU (samples/s of the device, each batch
synchronised) beside the CPU providers.

Usage: python benchmarks/benchmark_data_2d.py [--data ../shared/data/nih-chestxray-1000] [--samples 64]
       [--batch 32] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_2d import official_item  # noqa: E402
from utils import ROOT, environment, sync, write_rows  # noqa: E402

from pcrlv2_fast.data.dali import dali_available  # noqa: E402
from pcrlv2_fast.data.dataset2d import BatchLoader2D, PretrainDataset2D  # noqa: E402
from pcrlv2_fast.data.images2d import ImageBank, find_images, read_image  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "nih-chestxray-1000"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--images", type=int, default=64, help="images used (the first N files)")
    p.add_argument("--samples", type=int, default=64, help="timed samples per provider")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    env = environment(device)
    files = find_images(args.data)[:args.images]
    bank = ImageBank.from_arrays([read_image(f) for f in files], [f.name for f in files])
    decoded = [Image.open(f).convert("RGB") for f in files]
    dataset = PretrainDataset2D(bank, seed=0)
    loader = BatchLoader2D(dataset, device)
    n = len(files)
    rngs = np.random.default_rng(0)

    def batched(which, r: int) -> None:
        which.batch([(r * args.batch + k) % len(dataset) for k in range(args.batch)])
        sync(device)

    loaders = {"torch": loader}
    if dali_available():
        from pcrlv2_fast.data.dali2d import DaliLoader2D

        loaders["dali"] = DaliLoader2D(dataset, files, device, num_threads=1, batch_size=args.batch)

    per_sample = {
        "official_file": lambda i: official_item(files[i % n], rngs),
        "official_memory": lambda i: official_item(decoded[i % n], rngs),
        "dataset": lambda i: dataset[i % len(dataset)],
    }
    for fn in per_sample.values():
        fn(0)
    for which in loaders.values():
        batched(which, 0)
    rounds = max(1, -(-args.samples // args.batch))
    spent = dict.fromkeys([*per_sample, *loaders], 0.0)
    for r in range(1, rounds + 1):
        for name, fn in per_sample.items():
            t0 = time.perf_counter()
            for k in range(args.batch):
                fn(r * args.batch + k)
            spent[name] += time.perf_counter() - t0
        for name, which in loaders.items():
            t0 = time.perf_counter()
            batched(which, r)
            spent[name] += time.perf_counter() - t0
    samples = rounds * args.batch
    official = spent["official_file"] / samples
    rows = []
    for name, total in spent.items():
        s = total / samples
        rows.append({"provider": name, "where": str(device) if name in loaders else "cpu", "threads": 1,
                     "s_per_sample": s, "samples_per_s": 1 / s, "speedup_vs_official": official / s,
                     "samples": samples, "batch": args.batch, "images": n,
                     "command": "python benchmarks/benchmark_data_2d.py", **env})
        print(f"{name:<16} {s * 1e3:8.2f} ms/sample  {1 / s:8.1f} samples/s  {official / s:6.2f}x vs official_file")
    print(f"wrote {write_rows(rows, 'data2d', device, out=args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
