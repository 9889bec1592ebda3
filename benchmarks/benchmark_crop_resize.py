"""crop_resize on CPU: the native C++/OpenMP kernel vs the plain-PyTorch reference loop, one run.

Boxes of the official PCRLv2 sizes are cut out of a synthetic int16 CT volume (300x300x240 by default,
HU window [-1000, 1000]): global crops (96,96,64), (96,96,96), (112,112,64), (64,64,32) -> 64x64x32 and
local crops (32,32,16), (16,16,16), (32,32,32), (8,8,8) -> 16^3, drawn uniformly inside the volume.
- ``native``: ``pcrlv2_fast.data.native.crop_resize`` (all boxes of a kind in one call, a new output
  tensor per call, as the reference).
- ``native_out``: the same writing into one preallocated batch (``out=``), as a loader reusing its batch
  buffers would; the difference is the page faults of a fresh multi-MB output.
- ``torch``: ``pcrlv2_fast.reference.crop_resize.reference_crop_resize`` (slice, window, F.interpolate
  per box).
Reports crops/s per provider and view kind and the native speed-up, as JSON rows (name "crop_resize").

Usage: python benchmarks/benchmark_crop_resize.py [--boxes 64 --repeats 5 --threads 2 --out rows.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import environment, median, write_rows  # noqa: E402

from pcrlv2_fast.data import native  # noqa: E402
from pcrlv2_fast.reference.crop_resize import reference_crop_resize  # noqa: E402

KINDS = {
    "global": (((96, 96, 64), (96, 96, 96), (112, 112, 64), (64, 64, 32)), (64, 64, 32)),
    "local": (((32, 32, 16), (16, 16, 16), (32, 32, 32), (8, 8, 8)), (16, 16, 16)),
}
WINDOW = (-1000.0, 1000.0)


def draw_boxes(shape, sizes, n: int, rng: np.random.Generator) -> np.ndarray:
    size = np.asarray(sizes, dtype=np.int64)[rng.integers(len(sizes), size=n)]
    start = (rng.random((n, 3)) * (np.asarray(shape) - size + 1)).astype(np.int64)
    return np.concatenate([start, size], axis=1)


def make_providers(volume: np.ndarray, boxes: np.ndarray, out_size, out_dtype: torch.dtype, threads: int) -> dict:
    buffer = torch.empty((len(boxes), 1, *out_size), dtype=out_dtype)
    return {
        "torch": lambda: reference_crop_resize(volume, boxes, out_size, WINDOW, out_dtype),
        "native": lambda: native.crop_resize(volume, boxes, out_size, WINDOW, out_dtype, num_threads=threads),
        "native_out": lambda: native.crop_resize(volume, boxes, out_size, WINDOW, out=buffer, num_threads=threads),
    }


def bench(fn, repeats: int) -> float:
    fn()  # warm-up (page cache, allocator, OpenMP pool)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 300, 240))
    parser.add_argument("--boxes", type=int, default=64, help="boxes per call and view kind")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if not native.available():
        sys.exit(native.load_error())
    torch.set_num_threads(args.threads)
    out_dtype = getattr(torch, args.out_dtype)

    rng = np.random.default_rng(0)
    volume = rng.normal(-300.0, 400.0, size=tuple(args.shape)).clip(-1024, 3000).astype(np.int16)
    device = torch.device("cpu")
    env = environment(device)
    rows = []
    for kind, (sizes, out_size) in KINDS.items():
        boxes = draw_boxes(volume.shape, sizes, args.boxes, rng)
        providers = make_providers(volume, boxes, out_size, out_dtype, args.threads)
        seconds = {name: bench(fn, args.repeats) for name, fn in providers.items()}
        for name, s in seconds.items():
            rows.append({"name": "crop_resize", "provider": name, "view": kind, "out_size": list(out_size),
                         "boxes": args.boxes, "volume_shape": list(args.shape), "out_dtype": args.out_dtype,
                         "threads": args.threads, "s_per_call": s, "crops_per_s": args.boxes / s,
                         "speedup_vs_torch": seconds["torch"] / s, **env})
            print(f"{kind:6s} {name:10s} {args.boxes / s:10.1f} crops/s  speed-up {seconds['torch'] / s:6.2f}x")
    path = write_rows(rows, "crop_resize", device, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
