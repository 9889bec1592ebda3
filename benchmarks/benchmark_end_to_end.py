"""The whole pretraining pipeline, scans to optimizer step, in samples/s: this engine against the official
pipeline reproduced faithfully, alternating step by step in one run, on the real sample CTs.

- ``official``: the official data path and step. A ``torch.utils.data.DataLoader`` with ``--workers`` processes over
  a per-sample dataset that cuts each sample's 2 global and 6 local crops from the scans in memory, resizes them
  with skimage (as the official offline generator did, without its per-voxel loop) and applies the official
  torchio chains (``benchmark_data.official_augment``); then the official network (``ReferencePCRLv23d``) and
  step (``reference_step_loss``, SGD lr 1e-3, momentum 0.9, weight decay 1e-4) in eager fp32.
- ``engine``: what ``pcrlv2-fast pretrain`` runs: the preprocessing cache, the default loader, the step function
  (``pretrain_step``) in bf16 autocast with channels-last, timed by the profiler's runner (data included).
Both at the same width and global batch. A step of each alternates with a step of the other, so load changes on
the machine hit both; samples/s = batch / mean seconds per step (data wait included). The official workers keep
refilling their queue while the engine steps, as they overlap the official step in its own runs: that costs the
engine some of its cores here, so the ratio errs against the engine.

Usage: python benchmarks/benchmark_end_to_end.py [--data DIR_OF_CT_SCANS] [--width 32 --batch-size 2 --steps 3]
Needs torchio and scikit-image for the official pipeline (``make bench-data`` installs them).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_data import official_augment, official_crops, official_transforms  # noqa: E402
from utils import environment, write_rows  # noqa: E402

from pcrlv2_fast.data import CropConfig, load_volumes  # noqa: E402
from pcrlv2_fast.profiler.run import TimedRun  # noqa: E402
from pcrlv2_fast.reference import ReferencePCRLv23d, reference_step_loss  # noqa: E402
from pcrlv2_fast.train import PretrainConfig  # noqa: E402


class OfficialSamples(torch.utils.data.Dataset):
    """The official per-sample path: crops cut and resized from a scan in memory, then the torchio chains."""

    def __init__(self, arrays: list[np.ndarray], n: int):
        self.arrays, self.n, self.cfg = arrays, n, CropConfig()
        self.transforms = None  # made in each worker (torchio transforms are built per process)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.transforms is None:
            self.transforms = official_transforms()
        crops = official_crops(self.arrays[i % len(self.arrays)], np.random.default_rng(i), self.cfg)
        x1, x2, gt, loc = official_augment(*crops, self.transforms)
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        return as_tensor(x1), as_tensor(x2), as_tensor(gt), [as_tensor(v) for v in loc]


def official_runner(arrays, width: int, batch: int, workers: int, steps: int):
    loader = torch.utils.data.DataLoader(OfficialSamples(arrays, batch * steps), batch_size=batch,
                                         num_workers=workers, persistent_workers=workers > 0)
    batches = iter(loader)
    model = ReferencePCRLv23d(base=width)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step(k: int) -> float:
        start = time.perf_counter()
        x1, x2, gt, loc = next(batches)
        loss = reference_step_loss(model, x1, x2, gt, loc, 0, 240, random.Random(k))[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of CT scans (default: the pyradiomics sample CTs, downloaded once)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per pipeline (after one warm-up step each)")
    p.add_argument("--workers", type=int, default=2, help="the official DataLoader's worker processes")
    p.add_argument("--out", help="result JSON path (default benchmarks/results/end_to_end-cpu-<date>.json)")
    args = p.parse_args()
    if args.data is None:
        from pcrlv2_fast.samples import fetch_samples

        args.data = str(fetch_samples() / "ct")
    arrays = [v.array for v in load_volumes(args.data, progress=False)]
    official = official_runner(arrays, args.width, args.batch_size, args.workers, args.steps + 1)
    with tempfile.TemporaryDirectory(prefix="pcrlv2-e2e-") as tmp:
        cfg = PretrainConfig(data=args.data, out=tmp, width=args.width, batch_size=args.batch_size, precision="bf16",
                             channels_last=True, device="cpu", tensorboard=False, pictures=False)
        engine = TimedRun(cfg, None)
        times = {"official": [], "engine": []}
        try:
            for k in range(args.steps + 1):  # step 0 warms both up
                for name, seconds in (("official", official(k)), ("engine", engine.iterate()[0])):
                    if k > 0:
                        times[name].append(seconds)
                    print(f"step {k} {name}: {seconds:.2f} s", flush=True)
        finally:
            engine.close()
    env = environment(torch.device("cpu"))
    rate = {name: args.batch_size / float(np.mean(t)) for name, t in times.items()}
    command = (f"python benchmarks/benchmark_end_to_end.py --width {args.width} --batch-size {args.batch_size} "
               f"--steps {args.steps} --workers {args.workers}")
    rows = [{"benchmark": "end_to_end", "provider": name, **env, "command": command, "width": args.width,
             "batch": args.batch_size, "steps": args.steps, "workers": args.workers, "threads": torch.get_num_threads(),
             "s_per_step": float(np.mean(t)), "samples_per_s": rate[name],
             "speedup_vs_official": rate[name] / rate["official"]} for name, t in times.items()]
    print(f"engine / official: {rate['engine'] / rate['official']:.2f}x "
          f"({rate['engine']:.3f} vs {rate['official']:.3f} samples/s)")
    print(f"wrote {write_rows(rows, 'end_to_end', torch.device('cpu'), args.out)}")


if __name__ == "__main__":
    main()
