"""Data pipeline throughput: fresh sub-crops + augmentation per sample, side by side with the official cost.

A sample is what one training step consumes per batch element: two augmented 64x64x32 global views, their
target, and six augmented 16^3 local views. Providers (all on the same real CT volumes, one run):
- ``official_augment``: the official online cost alone: torchio's transform chains of the official
  ``pcrlv2_luna_pretask`` (RandomFlip + RandomAffine on each crop, then Blur, Noise, Gamma, Swap(8,4,4),
  ZNormalization on the globals and the same minus Swap on the locals) applied to pre-cut crops;
- ``official_crop_augment``: the same plus cutting the crops and resizing them with skimage (as the
  official offline generator did, without its per-voxel depth loop);
- ``dataset``: this engine's per-sample ``PretrainDataset`` item (fresh crops, torch ops, one core);
- ``torch`` / ``native``: the same samples built a whole batch (``--batch``, default 32 as in pretraining) at a
  time by ``BatchLoader`` (all crops of the batch in one call, batched augmentation ops); seconds per sample
  are the batch's seconds divided by its size. ``native`` needs the C++ extension (skipped without it);
- ``dali``: the same batches from ``DaliLoader``'s NVIDIA DALI pipelines (CPU pipelines, one thread; skipped
  without DALI).
Seconds per sample are per core: every provider runs single-threaded (torch.set_num_threads(1)). Providers
are timed round-robin (a batch's worth of samples each per round), so the ratios come from the same moments.
This engine's providers read the scans as ``pretrain`` does: preprocessed once into a cache (int16 HU,
memory-mapped; ``--cache DIR`` keeps it between runs, default a temporary folder); the official providers
cut their crops from the same scans loaded into memory as [0, 1] float32 arrays (the official pipeline's
own input), with the same spacing and window.

With ``--device cuda`` the GPU backends are timed instead, in samples/s of the whole device: ``torch``
(``BatchLoader`` with its volume bank on the GPU) and ``dali`` (``DaliLoader(device="cuda")``), each call
synchronised, against ``native`` on all CPU threads for reference.

Usage: python benchmarks/benchmark_data.py [--data DIR_OF_CT_SCANS] [--samples 64] [--batch 32] [--device cuda]
                                          [--cache DIR]
Needs torchio and scikit-image for the official providers (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import environment, write_rows  # noqa: E402

from pcrlv2_fast.data import (  # noqa: E402
    BatchLoader,
    CropConfig,
    DaliLoader,
    PretrainDataset,
    cached_volumes,
    dali_available,
    dali_load_error,
    draw_sample_boxes,
    load_volumes,
    native,
)


def official_transforms():
    """The official torchio chains (data.py, pcrlv2_luna_pretask). SimpleITK, which resamples torchio's affine,
    is limited to one thread like every other provider (its default is one per core)."""
    import SimpleITK as sitk
    import torchio.transforms as tt

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)

    spatial = tt.Compose([tt.RandomFlip(), tt.RandomAffine()])
    local = tt.Compose([tt.RandomBlur(), tt.RandomNoise(), tt.RandomGamma(), tt.ZNormalization()])
    glob = tt.Compose([tt.RandomBlur(), tt.RandomNoise(), tt.RandomGamma(), tt.RandomSwap(patch_size=(8, 4, 4)),
                       tt.ZNormalization()])
    return spatial, glob, local


def official_crops(volume: np.ndarray, rng: np.random.Generator, cfg: CropConfig):
    from skimage.transform import resize

    boxes = draw_sample_boxes(volume.shape, rng, cfg)

    def cut(box, out):
        x0, y0, z0, sx, sy, sz = box
        return resize(volume[x0:x0 + sx, y0:y0 + sy, z0:z0 + sz], out, preserve_range=True)

    globals_ = [cut(b, cfg.global_out) for b in boxes.global_boxes]
    locals_ = [cut(b, cfg.local_out) for b in boxes.local_boxes]
    return globals_, locals_


def official_augment(globals_, locals_, transforms):
    spatial, glob, local = transforms
    views = [spatial(g[None]) for g in globals_]
    gt = views[0].copy()
    x1, x2 = (glob(v) for v in views)
    loc = [local(spatial(v[None])) for v in locals_]
    return x1, x2, gt, loc


def time_interleaved(providers: dict, batched: set, n: int, batch: int) -> dict[str, float]:
    """Seconds per sample of every provider, timed round-robin so load changes on the machine hit all of them
    alike: each round gives every provider ``batch`` samples (one ``fn(i)`` call of a batched provider, which
    builds batch i, or ``batch`` calls of a per-sample one); ceil(n / batch) rounds after one warm-up call."""
    for fn in providers.values():
        fn(0)  # warm-up
    rounds = max(1, -(-n // batch))
    spent = dict.fromkeys(providers, 0.0)
    for r in range(1, rounds + 1):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            if name in batched:
                fn(r)
            else:
                for i in range(batch):
                    fn(r * batch + i)
            spent[name] += time.perf_counter() - t0
    return {name: total / (rounds * batch) for name, total in spent.items()}


def gpu_main(args, volumes, cfg) -> None:
    """GPU backends, whole-device throughput (see the module docstring)."""
    from utils import sync  # noqa: E402

    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    n_items = (-(-args.samples // args.batch) + 1) * args.batch
    dataset = PretrainDataset(volumes, cfg, seed=0, pairs_per_volume=n_items // len(volumes) + 1)
    providers = {"torch": BatchLoader(dataset, "torch", device=device)}
    if native.available():
        providers["native"] = BatchLoader(dataset, "native")
    if dali_available():
        providers["dali"] = DaliLoader(dataset, device=device, batch_size=args.batch)
    else:
        print(f"dali provider skipped: {dali_load_error()}")
    rounds = max(1, -(-args.samples // args.batch))
    spent = dict.fromkeys(providers, 0.0)
    for loader in providers.values():
        loader.batch(range(args.batch))  # warm-up
    for r in range(1, rounds + 1):
        for name, loader in providers.items():
            sync(device)
            t0 = time.perf_counter()
            loader.batch(range(r * args.batch, (r + 1) * args.batch))
            sync(device)
            spent[name] += time.perf_counter() - t0
    env = environment(device)
    if native.available():
        env["native_avx512"] = native.has_wide_simd()
    rows = []
    for name, total in spent.items():
        per_sample = total / (rounds * args.batch)
        rows.append({"benchmark": "data", "provider": name, **env, "backend_device": "cpu" if name == "native"
                     else str(device), "threads": torch.get_num_threads(), "samples": rounds * args.batch,
                     "batch": args.batch, "s_per_sample": per_sample, "samples_per_s": 1.0 / per_sample,
                     "volumes": [v.name for v in volumes]})
        print(f"{name:<10} {1.0 / per_sample:10.1f} samples/s")
    print(f"rows written to {write_rows(rows, 'data', device, args.out)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of CT scans (default: the pyradiomics sample CTs, downloaded once)")
    p.add_argument("--samples", type=int, default=64, help="timed samples per provider")
    p.add_argument("--batch", type=int, default=32,
                   help="batch size of the batch loaders (default: 32, the official and pretrain batch)")
    p.add_argument("--device", default="cpu", help="cpu (per-core comparison with the official cost) or cuda")
    p.add_argument("--out", help="result JSON path (default benchmarks/results/data-<cpu|cuda>-<date>.json)")
    p.add_argument("--cache", help="preprocessing cache of --data for this engine's providers (default: a temporary "
                   "folder, removed afterwards)")
    args = p.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")

    if args.data is None:
        from pcrlv2_fast.samples import fetch_samples

        args.data = str(fetch_samples() / "ct")
    with tempfile.TemporaryDirectory(prefix="pcrlv2-bench-cache-") as temporary:
        volumes = cached_volumes(args.data, args.cache or temporary)
        if args.device != "cpu":
            gpu_main(args, volumes, CropConfig())
        else:
            cpu_main(args, volumes, CropConfig())


def cpu_main(args, volumes, cfg) -> None:
    """Every provider on one core, round-robin (see the module docstring)."""
    torch.set_num_threads(1)
    providers = {}
    n_items = (-(-args.samples // args.batch) + 1) * args.batch  # sample indices used (warm-up round included)

    try:
        transforms = official_transforms()
        import skimage  # noqa: F401
    except ImportError as exc:
        print(f"official providers skipped: {exc} (pip install torchio scikit-image)")
    else:
        # The official input: each scan in memory as a [0, 1] float32 array (same spacing and window).
        in_memory = {v.name: v for v in load_volumes(args.data, progress=False)}
        arrays = [in_memory[v.name].array for v in volumes] if set(in_memory) >= {v.name for v in volumes} \
            else [v.array for v in in_memory.values()]
        rng = np.random.default_rng(0)
        cut = [official_crops(arrays[i % len(arrays)], rng, cfg) for i in range(n_items)]
        providers["official_augment"] = lambda i: official_augment(*cut[i], transforms)

        def crop_and_augment(i):
            vol = arrays[i % len(arrays)]
            return official_augment(*official_crops(vol, np.random.default_rng(i), cfg), transforms)

        providers["official_crop_augment"] = crop_and_augment

    per_volume = n_items // len(volumes) + 1
    dataset = PretrainDataset(volumes, cfg, seed=0, pairs_per_volume=per_volume)
    providers["dataset"] = lambda i: dataset[i]
    batched = {"torch"} | ({"native"} if native.available() else set())
    if not native.available():
        print(f"native provider skipped: {native.load_error()}")
    for backend in sorted(batched, reverse=True):
        loader = BatchLoader(dataset, backend, num_threads=1)
        providers[backend] = lambda i, loader=loader: loader.batch(range(i * args.batch, (i + 1) * args.batch))
    if dali_available():
        dali_loader = DaliLoader(dataset, num_threads=1, batch_size=args.batch)
        providers["dali"] = lambda i: dali_loader.batch(range(i * args.batch, (i + 1) * args.batch))
        batched.add("dali")
    else:
        print(f"dali provider skipped: {dali_load_error()}")

    times = time_interleaved(providers, batched, args.samples, args.batch)
    for name, seconds in times.items():
        print(f"{name:<22} {seconds * 1e3:9.2f} ms/sample/core", flush=True)

    base_name = "official_augment" if "official_augment" in times else None
    env = environment(torch.device("cpu"))
    if native.available():
        env["native_avx512"] = native.has_wide_simd()  # which code path the C++ kernels ran
    rows = []
    for name, s in times.items():
        row = {"benchmark": "data", "provider": name, **env, "threads": 1, "samples": args.samples,
               "batch": args.batch if name in batched else 1,
               "s_per_sample": s, "samples_per_s": 1.0 / s, "volumes": [v.name for v in volumes]}
        if base_name:
            row["speedup_vs_official_augment"] = times[base_name] / s
        rows.append(row)
    path = write_rows(rows, "data", torch.device("cpu"), args.out)
    if base_name:
        for r in rows:
            print(f"{r['provider']:<22} {r['speedup_vs_official_augment']:6.2f}x vs official augmentation alone")
    print(f"rows written to {path}")


if __name__ == "__main__":
    main()
