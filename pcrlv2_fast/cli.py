"""Command line: ``pcrlv2-fast <command>`` (also ``python -m pcrlv2_fast <command>``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    from .train.config import CHOICES

    # Defaults are None so that only the options given override the chosen preset.
    p.add_argument("--data", required=True, help="a preprocessing cache, or a folder of scans (NIfTI, NRRD, MetaImage, "
                   "DICOM series) or one scan, preprocessed into OUT/cache first; with --dims 2 a folder of 2D images "
                   "(PNG, JPEG, DICOM) or an NIH ChestX-ray14 Data_Entry CSV")
    p.add_argument("--dims", type=int, choices=(2, 3),
                   help="3 (default): CT/MR volumes and the 3D U-Net; 2: 2D images (chest X-rays) and the 2D network "
                        "(ResNet-18 encoder, 224-pixel global and 96-pixel local views)")
    p.add_argument("--samples-per-image", type=int, help="--dims 2: samples per image per epoch (official: 1)")
    p.add_argument("--encoder-weights", metavar="PATH",
                   help="--dims 2: start from these weights instead of random ones: a torchvision ResNet-18 "
                        "state_dict (e.g. ImageNet; its fc layer is left out), an official 2D checkpoint or a whole "
                        "2D model, loaded strictly")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, pictures")
    p.add_argument("--preset", default="official", help="official (default) | demo | tiny")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int)
    length.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=CHOICES["optimizer"])
    p.add_argument("--precision", choices=CHOICES["precision"],
                   help="fp32 (TF32 off) | tf32 (TF32 matmuls/convolutions on CUDA) | bf16 autocast | fp16 autocast "
                        "with a gradient scaler (overflowing steps are skipped and counted)")
    p.add_argument("--accumulate", type=int, metavar="K",
                   help="gradient accumulation: each process runs its share of --batch-size as K micro-batches")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-norm statistics over the batch of all processes (default: on with several processes)")
    p.add_argument("--optim-impl", choices=CHOICES["optim_impl"],
                   help="optimizer update kernels; auto (default): fused on CUDA, foreach on the CPU")
    p.add_argument("--channels-last", action="store_const", const=True,
                   help="channels_last_3d memory format (channels_last with --dims 2)")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--cuda-graphs", action="store_const", const=True,
                   help="not supported (the per-step random scale choice and the non-finite skip change every step); "
                        "the error says why")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="checkpoint to continue from, or 'auto' for the newest readable checkpoint in OUT "
                   "(unreadable ones are skipped with a warning; none: a fresh start)")
    p.add_argument("--overwrite", action="store_const", const=True, help="start afresh in a folder holding a run")
    p.add_argument("--trust-checkpoint", action="store_const", const=True,
                   help="let --resume load a checkpoint that needs types outside the allow-list (full unpickling: "
                        "code in the file runs); only for files from a source you trust")
    p.add_argument("--width", type=int, help="base channel count (32 = official)")
    p.add_argument("--norm", choices=CHOICES["norm"])
    p.add_argument("--act", choices=CHOICES["act"])
    p.add_argument("--all-scales", action="store_const", const=True, help="use all decoder scales every step")
    p.add_argument("--pairs-per-volume", type=int, help="samples per scan per epoch (official: 16)")
    p.add_argument("--crop-scale", type=float, metavar="S",
                   help="every crop and view size times S in (0, 1], for volumes smaller than the official crops "
                        "(e.g. 0.4 for ~35 x 50 x 36 voxel MR crops); default 1, the official geometry")
    p.add_argument("--workers", type=int, help="data loader worker processes")
    p.add_argument("--loader", choices=CHOICES["loader"],
                   help="how batches are built (same samples): per-sample DataLoader (dataset, uses --workers) or "
                        "whole batches at once (torch: batched ops on --device; native: C++ kernels on the CPU; dali: "
                        "NVIDIA DALI pipelines, pip install nvidia-dali-cuda120); auto (default): native when built, "
                        "else torch")
    p.add_argument("--prefetch", type=int, metavar="N",
                   help="batches built ahead by a background thread while the step runs (default 2 on CUDA, 0 on the "
                        "CPU, where the producer competes with the step for the cores; 0: serially)")
    p.add_argument("--loader-threads", type=int, metavar="T",
                   help="OpenMP threads of the native loader (default: torch's thread count), so that the producer "
                        "and the step do not fight over the cores")
    p.add_argument("--gpu-cache-gb", type=float, metavar="G",
                   help="GPU memory --loader torch may fill with the volumes (default: a quarter of the free memory); "
                        "above it the native loader feeds the GPU from the CPU")
    p.add_argument("--kernels", choices=CHOICES["kernels"],
                   help="plain PyTorch ops (default) or the fused Triton kernels for the conv blocks and the loss")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--modality", choices=CHOICES["modality"])
    p.add_argument("--spacing", type=float, help="isotropic resampling spacing in mm (official: 1)")
    p.add_argument("--save-every", type=int, help="also checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, metavar="K",
                   help="keep the last K checkpoints as OUT/checkpoint-<step>.pt beside checkpoint.pt (default 2)")
    p.add_argument("--max-nonfinite", type=int, metavar="N",
                   help="stop (after saving) when N steps in a row have a non-finite loss or gradient (default 5; "
                        "0: never)")
    p.add_argument("--log-every", type=int, metavar="N",
                   help="write metrics (and read the loss back from the device) every N steps (default 1 on the CPU, "
                        "10 on CUDA)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False,
                   help="no TensorBoard event files (written when the tensorboard package is installed)")
    p.add_argument("--pictures", dest="pictures", action="store_const", const=True,
                   help="restoration and loss pictures (on by default except in the tiny preset)")
    p.add_argument("--no-pictures", dest="pictures", action="store_const", const=False)
    p.add_argument("--probe", metavar="DATA",
                   help="labelled volumes (any finetune --data layout) for a frozen-encoder probe: a per-voxel linear "
                        "classifier on the encoder's features, fit on half the cases and scored by Dice on the "
                        "others, logged to metrics.jsonl, TensorBoard and the loss plot")
    p.add_argument("--probe-every", type=int, metavar="N", help="probe every N steps (default: every epoch)")
    p.add_argument("--probe-cases", type=int, metavar="K", help="cases of --probe used (default 8, sorted by id)")
    p.add_argument("--profile-steps", metavar="A:B",
                   help="write a torch.profiler trace of steps A..B (1-based) to OUT/trace.pt.trace.json (for "
                        "Perfetto, or TensorBoard's profiler plugin: tensorboard --logdir OUT)")


def _pretrain_config(args: argparse.Namespace):
    from .train import PretrainConfig
    from .train.step import CUDA_GRAPHS_UNSUPPORTED

    if args.cuda_graphs:
        raise ValueError(CUDA_GRAPHS_UNSUPPORTED)

    fields = set(PretrainConfig.__dataclass_fields__)
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return PretrainConfig.from_name(args.preset, **overrides)


def _print_summary(summary: dict) -> None:
    if summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return
    print("\nresults:")
    for name, path in summary["files"].items():
        print(f"  {name:<12} {path}")
    sps = summary["samples_per_s"]
    print(f"throughput: {sps:.2f} samples/s ({summary['precision']}, {summary['device']})" if sps else "")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train import pretrain

    _print_summary(pretrain(_pretrain_config(args)))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .data import CropConfig, preprocess

    s = args.spacing
    report = preprocess(args.sources, args.out, spacing=(s, s, s), hu_window=tuple(args.hu_window),
                        modality=args.modality, workers=args.workers,
                        min_shape=CropConfig().scaled(args.crop_scale).min_volume)
    print(report.table())
    if not report.names:
        print(f"error: no scan could be preprocessed into {report.cache}", file=sys.stderr)
        return 2
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from .samples import describe_samples, fetch_samples

    folder = fetch_samples(cache_dir=args.cache, sdist=args.from_sdist, progress=not args.print_dir)
    if args.print_dir:
        print(folder)
    else:
        print(describe_samples(folder))
        print(f"\nsample scans in {folder}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .samples import fetch_samples
    from .train import PretrainConfig, pretrain

    folder = fetch_samples(cache_dir=args.cache)
    overrides = {"steps": args.steps} if args.steps else {}
    cfg = PretrainConfig.from_name("demo", data=str(folder / "ct"), out=args.out, **overrides)
    print(f"demo: pretraining a width-{cfg.width} PCRLv2 network on the sample CTs in {folder / 'ct'} "
          f"for {cfg.steps} steps ({cfg.precision}, batch {cfg.batch_size})")
    summary = pretrain(cfg)
    _print_summary(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .data.io import MODALITIES

    parser = argparse.ArgumentParser(prog="pcrlv2-fast", description="Fast PCRLv2 3D self-supervised pretraining")
    parser.add_argument("--version", action="version", version=f"pcrlv2_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain PCRLv2 on a folder of scans")
    _add_pretrain_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("preprocess", help="resample scans once into a memory-mapped cache for pretrain --data")
    p.add_argument("sources", nargs="+", metavar="SRC", help="scan files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="cache folder (created; re-running it skips unchanged scans)")
    p.add_argument("--spacing", type=float, default=1.0, help="isotropic resampling spacing in mm (official: 1)")
    p.add_argument("--hu-window", type=float, nargs=2, default=(-1000.0, 1000.0), metavar=("LOW", "HIGH"),
                   help="CT values mapped to 0 and 1 (official: -1000 1000)")
    p.add_argument("--modality", choices=MODALITIES, default="auto")
    p.add_argument("--workers", type=int, default=1, help="scans processed in parallel (processes)")
    p.add_argument("--crop-scale", type=float, default=1.0, metavar="S",
                   help="keep scans as small as the crops of pretrain --crop-scale S (default 1: the official "
                        "crops, at least 64 x 64 x 32 voxels)")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("samples", help="download and verify the real sample CT/MR scans")
    p.add_argument("--cache", type=Path, help="cache root (default $PCRLV2_CACHE or ~/.cache/pcrlv2_fast)")
    p.add_argument("--from-sdist", type=Path, help="extract from a local pyradiomics-3.0.1.tar.gz instead")
    p.add_argument("--print-dir", action="store_true", help="only print the samples folder")
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("demo", help="fetch the samples and pretrain a small model for a few minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int)
    p.add_argument("--cache", type=Path)
    p.set_defaults(func=cmd_demo)

    from .finetune.cli import add_finetune_parsers
    from .profiler.cli import add_profile_parser
    from .selftest import add_selftest_parser
    from .transfer.cli import add_transfer_parser

    add_selftest_parser(sub)
    add_finetune_parsers(sub)
    add_profile_parser(sub)
    add_transfer_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import ScanError
    from .samples import SampleDownloadError, SampleIntegrityError
    from .utils.io import WriteError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ScanError, CheckpointError, SampleDownloadError, SampleIntegrityError, WriteError, ValueError) as exc:
        if os.environ.get("PCRLV2_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
