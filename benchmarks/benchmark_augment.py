"""Sub-crop extraction and augmentation: per-view ops (augment.py, dataset.py) vs the batched ops of the torch loader.

A batch of B samples has 2 global views (64x64x32, with patch swap) and 6 local views (16^3) each. Stages,
each timed for both providers on the same inputs and parameters:
- ``crop``: cut + trilinear resize of every view's box from two CT-sized volumes (``cut_and_resize`` per box
  vs one ``VolumeBank.crop_resize`` call per view kind);
- ``spatial`` (flip + affine), ``blur``, ``noise``, ``gamma``, ``swap`` (global views only), ``z_normalize``:
  one op over all views of the batch, the per-view op in a loop vs the batched op;
- ``augment``: the whole augmentation of a batch as the dataset does it, parameter sampling included
  (``spatial_augment`` + ``intensity_augment`` per view vs ``stack_view_params`` + ``augment_batch``).

The per-view provider always runs on the CPU (augment.py draws its noise on the CPU: it is the DataLoader
worker path); the batched provider runs on ``--device``.

Usage: python benchmarks/benchmark_augment.py --device cpu [--batch-size 8 --steps 5 --warmup 1 --threads 1
                                                   --out rows.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import environment, median, time_call, write_rows  # noqa: E402

from pcrlv2_fast.data.augment import (  # noqa: E402
    AugmentConfig,
    affine,
    blur,
    flip,
    gamma,
    intensity_augment,
    noise,
    spatial_augment,
    swap,
    z_normalize,
)
from pcrlv2_fast.data.batched import (  # noqa: E402
    VolumeBank,
    augment_batch,
    blur_batch,
    gamma_batch,
    noise_batch,
    spatial_batch,
    stack_view_params,
    swap_batch,
    z_normalize_batch,
)
from pcrlv2_fast.data.dataset import cut_and_resize  # noqa: E402
from pcrlv2_fast.data.geometry import CropConfig, draw_sample_boxes  # noqa: E402

GLOBAL, LOCAL = (64, 64, 32), (16, 16, 16)
N_GLOBAL, N_LOCAL = 2, 6


def make_stages(b: int, device: torch.device, seed: int) -> dict:
    """{stage: {provider: callable}} over the same inputs and parameters."""
    cfg = AugmentConfig()
    crop = CropConfig()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    # Two volumes in [0, 1] of about LUNA16 size at 1 mm (the official margins need >= 253 x 253 x 131); boxes
    # drawn by the official geometry.
    volumes = [rng.random(shape, dtype=np.float32) for shape in ((270, 256, 150), (256, 280, 140))]
    boxes = [draw_sample_boxes(volumes[i % 2].shape, rng, crop) for i in range(b)]
    which = np.arange(b) % 2
    global_boxes = np.concatenate([s.global_boxes for s in boxes])
    local_boxes = np.concatenate([s.local_boxes for s in boxes])
    global_index, local_index = np.repeat(which, N_GLOBAL), np.repeat(which, N_LOCAL)
    bank = VolumeBank(volumes, device=device)
    host = [torch.from_numpy(v) for v in volumes]

    def crop_per_view():
        g = [cut_and_resize(host[v], box, GLOBAL) for v, box in zip(global_index, global_boxes, strict=True)]
        loc = [cut_and_resize(host[v], box, LOCAL) for v, box in zip(local_index, local_boxes, strict=True)]
        return torch.stack(g), torch.stack(loc)

    def crop_batched():
        return bank.crop_resize(global_index, global_boxes, GLOBAL), bank.crop_resize(local_index, local_boxes, LOCAL)

    xg, xl = crop_per_view()  # (2B, 1, 64, 64, 32), (6B, 1, 16, 16, 16)
    pg = stack_view_params(gen, len(xg), cfg, GLOBAL, with_swap=True)
    pl = stack_view_params(gen, len(xl), cfg, LOCAL, with_swap=False)
    dg, dl = xg.to(device), xl.to(device)

    def to_device(params: dict) -> dict:
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in params.items()}

    dpg, dpl = to_device(pg), to_device(pl)
    device_gen = torch.Generator(device=device).manual_seed(seed)

    def per_view(op):
        return lambda: [op(x[i], p, i) for x, p in ((xg, pg), (xl, pl)) for i in range(len(x))]

    def batched(op):
        return lambda: [op(dg, dpg), op(dl, dpl)]

    def axes(p, i):
        return [a for a in range(3) if bool(p["flip"][i, a])]

    def augment_per_view():
        # PretrainDataset.__getitem__'s order: spatial for both globals, intensity for both, then each local.
        for s in range(b):
            spatial = [spatial_augment(v, gen, cfg) for v in xg[N_GLOBAL * s : N_GLOBAL * (s + 1)]]
            [intensity_augment(v, gen, cfg, with_swap=True) for v in spatial]
            for v in xl[N_LOCAL * s : N_LOCAL * (s + 1)]:
                intensity_augment(spatial_augment(v, gen, cfg), gen, cfg, with_swap=False)

    def augment_batched():
        params_g = to_device(stack_view_params(gen, len(dg), cfg, GLOBAL, with_swap=True))
        params_l = to_device(stack_view_params(gen, len(dl), cfg, LOCAL, with_swap=False))
        return augment_batch(dg, params_g, device_gen), augment_batch(dl, params_l, device_gen)

    return {
        "crop": {"per_view": crop_per_view, "batched": crop_batched},
        "spatial": {
            "per_view": per_view(lambda x, p, i: affine(flip(x, axes(p, i)), p["scales"][i], p["degrees"][i])),
            "batched": batched(spatial_batch),
        },
        "blur": {"per_view": per_view(lambda x, p, i: blur(x, p["sigmas"][i])),
                 "batched": batched(lambda x, p: blur_batch(x, p["sigmas"]))},
        "noise": {"per_view": per_view(lambda x, p, i: noise(x, float(p["noise_std"][i]), gen)),
                  "batched": batched(lambda x, p: noise_batch(x, p["noise_std"], device_gen))},
        "gamma": {"per_view": per_view(lambda x, p, i: gamma(x, float(p["gamma"][i]))),
                  "batched": batched(lambda x, p: gamma_batch(x, p["gamma"]))},
        "swap": {"per_view": lambda: [swap(xg[i], pg["swap"][i], cfg.swap_patch) for i in range(len(xg))],
                 "batched": lambda: swap_batch(dg, dpg["swap"], cfg.swap_patch)},
        "z_normalize": {"per_view": per_view(lambda x, p, i: z_normalize(x)),
                        "batched": batched(lambda x, p: z_normalize_batch(x))},
        "augment": {"per_view": augment_per_view, "batched": augment_batched},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch (2 global + 6 local views each)")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions per provider (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 gives per-core figures")
    p.add_argument("--out", help="result JSON path (default benchmarks/results/augment-<device>-<date>.json)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stages = make_stages(args.batch_size, device, args.seed)
    devices = {"per_view": torch.device("cpu"), "batched": device}
    times = {(stage, name): [] for stage, providers in stages.items() for name in providers}
    for providers in stages.values():
        for name, fn in providers.items():
            for _ in range(args.warmup):
                time_call(fn, devices[name])
    for _ in range(args.steps):  # interleaved so that drift in machine load hits every provider alike
        for stage, providers in stages.items():
            for name, fn in providers.items():
                times[stage, name].append(time_call(fn, devices[name]))

    env = environment(device)
    rows = []
    for (stage, name), ts in times.items():
        s = median(ts)
        base = median(times[stage, "per_view"])
        rows.append({"benchmark": "augment", "stage": stage, "provider": name, **env,
                     "provider_device": str(devices[name]), "threads": torch.get_num_threads(),
                     "batch_size": args.batch_size, "steps": args.steps, "s_per_batch": s,
                     "samples_per_s": args.batch_size / s, "ms_per_sample": 1e3 * s / args.batch_size,
                     "speedup_vs_per_view": base / s})
    path = write_rows(rows, "augment", device, args.out)
    print(f"\n{'stage':<12} {'provider':<9} {'ms/sample':>10} {'samples/s':>10} {'speed-up':>9}")
    for r in rows:
        print(f"{r['stage']:<12} {r['provider']:<9} {r['ms_per_sample']:>10.3f} {r['samples_per_s']:>10.1f} "
              f"{r['speedup_vs_per_view']:>8.2f}x")
    print(f"device: {env['device']}, torch {env['torch']}; batch of {args.batch_size} samples "
          f"({N_GLOBAL} x {GLOBAL} + {N_LOCAL} x {LOCAL} views); rows written to {path}")


if __name__ == "__main__":
    main()
