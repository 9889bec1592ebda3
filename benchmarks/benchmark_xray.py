"""Does 2D PCRLv2 pretraining help chest X-ray classification? Pneumonia vs no finding on the 1,000 NIH ChestX-ray14
images of ../shared/data/nih-chestxray-1000 (682 patients), on one patient-level split.

1. Split by ``Patient ID`` (seed 0: 60% training, 20% validation, 20% test patients), the split every fine-tuning
   run below uses.
2. PCRLv2 2D pretraining (``pretrain --dims 2``: official views, SGD lr 1e-2, bf16, channels-last) on the training
   patients' images only, no labels; the test and validation images are never seen.
3. Fine-tuning (``finetune --task cls --dims 2 --findings Pneumonia``) from random and from the PCRLv2 encoder, with
   10% and 100% of the training patients' labels, seeds 0-2; the same number of steps in every run; and the linear
   probe (``--mode linear``: the encoder frozen, the head alone trained) with 100% of the labels. Test ROC AUC of
   the epoch with the best validation AUC.

Resumable: a finished stage (the pretraining checkpoint at its last step, a fine-tuning run's summary.json) is reused.

Usage: python benchmarks/benchmark_xray.py [--data ../shared/data/nih-chestxray-1000] [--out runs/xray]
       [--pretrain-steps 400] [--epochs 8] [--iters-per-epoch 25] [--seeds 0,1,2] [--fractions 0.1,1] [--quick]
       [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import ROOT, environment, write_rows  # noqa: E402

from pcrlv2_fast.data.views2d import ViewConfig2D  # noqa: E402
from pcrlv2_fast.finetune.cls2d import Cls2DConfig, finetune_cls2d, load_table_images, read_label_table  # noqa: E402
from pcrlv2_fast.finetune.split import make_split  # noqa: E402
from pcrlv2_fast.train import PretrainConfig  # noqa: E402
from pcrlv2_fast.train.loop2d import Pretrainer2D  # noqa: E402
from pcrlv2_fast.utils.device import resolve_device  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "nih-chestxray-1000"
FINDINGS = ("Pneumonia",)


def _csv(data: Path) -> Path:
    return data if data.is_file() else data / "labels.csv"


def pretrain_stage(args, table, split, out: Path, views: ViewConfig2D) -> dict:
    """PCRLv2 on the training patients' images; reused when its checkpoint reached the last step."""
    folder = out / "pretrain"
    row = {n: i for i, n in enumerate(table.names)}
    pool = [row[n] for n in (*split.train, *split.unlabelled)]
    cfg = PretrainConfig(data=str(_csv(args.data)), out=str(folder), dims=2, steps=args.pretrain_steps,
                         batch_size=args.pretrain_batch, lr=args.pretrain_lr, precision="bf16", channels_last=True,
                         seed=0, resume="auto", device=args.device)
    started = time.perf_counter()
    finished = folder / "summary.json"
    done = finished.exists() and json.loads(finished.read_text())["steps"] >= cfg.steps
    if not done:
        trainer = type("Trainer", (Pretrainer2D,), {"views": views})(cfg, load_table_images(table, pool, False))
        try:
            trainer.run()
        finally:
            trainer.close()
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"images": len(pool), "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:])),
            "samples_per_s": summary.get("samples_per_s"), "wall_s_this_launch": round(time.perf_counter() - started),
            "global_size": views.global_size, "local_size": views.local_size,
            "checkpoint": str(folder / "checkpoint.pt")}


def finetune_stage(args, init: str, init_name: str, fraction: float, seed: int, out: Path, mode: str = "full") -> dict:
    folder = out / (f"ft-{init_name}-{fraction:g}-{seed}" if mode == "full" else f"ft-{mode}-{init_name}-{fraction:g}-"
                    f"{seed}")
    if not (folder / "summary.json").exists():
        finetune_cls2d(Cls2DConfig(data=str(_csv(args.data)), out=str(folder), init=init, findings=FINDINGS,
                                   mode=mode, lr=args.lr if mode == "full" else args.linear_lr,
                                   label_fraction=fraction, seed=seed, split_seed=0, epochs=args.epochs,
                                   iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size,
                                   image_size=args.image_size, precision="bf16", device=args.device,
                                   progress=not args.no_progress, overwrite=True))
    s = json.loads((folder / "summary.json").read_text())
    return {"init": init_name, "mode": mode, "lr": s["config"]["lr"], "label_fraction": fraction, "seed": seed,
            "test_auc": s["test"]["mean_auc"],
            "val_auc": s["best_metric"], "best_epoch": s["best_epoch"], "labelled_images": s["images"]["train"],
            "test_images": s["images"]["test"], "wall_s": s["wall_time_s"], "epochs": args.epochs,
            "iters_per_epoch": args.iters_per_epoch, "batch_size": args.batch_size, "image_size": args.image_size}


def summarize(rows: list[dict]) -> dict:
    """{"<mode> <fraction>": random and PCRLv2 mean/std over seeds, and their paired difference}."""
    out = {}
    for mode, fraction in sorted({(r.get("mode", "full"), r["label_fraction"]) for r in rows}):
        same = [r for r in rows if r.get("mode", "full") == mode and r["label_fraction"] == fraction]
        by = {init: {r["seed"]: r["test_auc"] for r in same if r["init"] == init} for init in ("random", "pcrlv2")}
        seeds = sorted(set(by["random"]) & set(by["pcrlv2"]))
        diff = np.array([by["pcrlv2"][s] - by["random"][s] for s in seeds])
        out[f"{mode} {fraction:g}"] = {"mode": mode, "label_fraction": fraction,
            **{init: {"mean": float(np.mean(list(v.values()))), "std": float(np.std(list(v.values())))}
               for init, v in by.items()},
            "paired": {"mean": float(diff.mean()), "std": float(diff.std()), "wins": int((diff > 0).sum()),
                       "n": len(seeds)}}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/xray"))
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=1e-2)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--iters-per-epoch", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fractions", default="0.1,1")
    p.add_argument("--linear-fractions", default="1", help="label fractions of the linear-probe runs (frozen encoder, "
                   "the head alone trained); empty: none")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning lr (Adam; official 1e-4)")
    p.add_argument("--linear-lr", type=float, default=1e-3, help="linear-probe lr (Adam)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a minute-long check: 64-pixel views, a few steps, 1 seed")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--results", help="result rows (default benchmarks/results/xray-<device>-<date>.json; with "
                   "--quick only when given)")
    args = p.parse_args(argv)
    views = ViewConfig2D()
    if args.quick:
        args.pretrain_steps, args.pretrain_batch, args.epochs, args.iters_per_epoch = 3, 4, 1, 2
        args.batch_size, args.image_size, args.seeds, args.fractions = 4, 64, "0", "1"
        args.linear_fractions = "1"
        views = ViewConfig2D(global_size=64, local_size=32)
    device = torch.device(resolve_device(args.device))
    env = environment(device)  # the commit that runs, before any later change to the tree
    table = read_label_table(_csv(args.data), FINDINGS)
    split = make_split(dict(zip(table.names, table.patients, strict=True)), seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    pre = pretrain_stage(args, table, split, args.out, views)
    print(f"pretraining: {pre['steps']} steps on {pre['images']} images, loss {pre['first_loss']:.3f} -> "
          f"{pre['last_loss']:.3f}")
    rows = []
    plan = [("full", float(f)) for f in args.fractions.split(",") if f] + [
        ("linear", float(f)) for f in args.linear_fractions.split(",") if f]
    for mode, fraction in plan:
        for seed in (int(s) for s in args.seeds.split(",")):
            for init, name in (("random", "random"), (pre["checkpoint"], "pcrlv2")):
                rows.append(finetune_stage(args, init, name, fraction, seed, args.out, mode))
                print(f"{mode:<6} {name:<7} {fraction:>4g} seed {seed}: test AUC {rows[-1]['test_auc']:.3f}",
                      flush=True)
    summary = summarize(rows)
    for key, s in summary.items():
        print(f"{key}: random {s['random']['mean']:.3f} ± {s['random']['std']:.3f}, PCRLv2 "
              f"{s['pcrlv2']['mean']:.3f} ± {s['pcrlv2']['std']:.3f}, paired {s['paired']['mean']:+.3f} "
              f"({s['paired']['wins']}/{s['paired']['n']} seeds better)")
    if args.results or not args.quick:
        split_sizes = {k: len(getattr(split, k)) for k in ("train", "val", "test")}
        out_rows = [{"kind": "pretrain", **pre, "split": split_sizes, **env}]
        out_rows += [{"kind": "finetune", **r, **env} for r in rows]
        out_rows.append({"kind": "summary", "by_fraction": summary, "findings": list(FINDINGS),
                         "command": "python benchmarks/benchmark_xray.py", **env})
        print(f"wrote {write_rows(out_rows, 'xray', device, out=args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
