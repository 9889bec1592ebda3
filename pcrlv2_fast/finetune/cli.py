"""Subcommands ``finetune``, ``evaluate`` and ``export-encoder`` for ``pcrlv2-fast``.

:func:`add_finetune_parsers` registers them on the main parser's subparsers. Handlers follow the main CLI's
conventions: they return an exit code, and user errors raise ScanError, CheckpointError or ValueError, which
``pcrlv2_fast.cli.main`` prints as one ``error: ...`` line with exit code 2. Heavy modules load only when a
command runs.
"""

from __future__ import annotations

import argparse
import json
import math


def _fraction(text: str) -> float:
    from .split import parse_fraction

    try:
        return parse_fraction(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,5, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one label value")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    from ..data.io import MODALITIES
    from ..encoders import Classifier3D
    from ..nn.blocks import NETWORK_ACTS, NORMS
    from .model import MODES
    from .options import PRECISIONS, TASKS

    # Defaults are None so that only the options given override the chosen preset.
    p.add_argument("--task", required=True, choices=TASKS, help="segmentation or classification")
    p.add_argument("--dims", type=int, choices=(2, 3), default=3,
                   help="3 (default): CT/MR volumes; 2: chest X-rays (--task cls: multi-label findings from an NIH "
                        "ChestX-ray14 Data_Entry CSV, per-finding ROC AUC, split by Patient ID)")
    p.add_argument("--findings", type=_name_list, metavar="A,B,...",
                   help="--dims 2: the findings to classify, as spelled in 'Finding Labels' (default: the 14 NIH "
                        "ChestX-ray14 findings), e.g. Pneumonia")
    p.add_argument("--image-size", type=int, help="--dims 2: network input size in pixels (default 224)")
    p.add_argument("--data", required=True,
                   help="a folder (imagesTr/ + labelsTr/, <case>_image/<case>_label files, or class folders for cls) "
                        "or a .csv/.json list of image/label pairs (NIfTI, NRRD, MetaImage)")
    p.add_argument("--init", required=True, metavar="CKPT|random",
                   help="PCRLv2 checkpoint (ours, official, fine-tuned or exported encoder; .pt or .safetensors) "
                        "or 'random'")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="let --init load a checkpoint that needs types outside the allow-list (full unpickling: code "
                        "in the file runs); only for files from a source you trust")
    p.add_argument("--out", required=True, help="run folder: best.pt, metrics.jsonl, split.json, test metrics")
    p.add_argument("--label-fraction", type=_fraction, help="share of the training patients with labels: 0.05 or "
                   "5%% (paper: 5%%, 10%%, 20%%, 100%%; at least one patient; default 1)")
    p.add_argument("--mode", choices=MODES,
                   help="full: train everything (default); frozen: encoder frozen, decoder/head trained; linear: "
                        "linear probe on the frozen encoder")
    p.add_argument("--preset", default="cpu", choices=("cpu", "gpu"),
                   help="cpu (default: minutes on a CPU) or gpu (longer, larger patches, bf16)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iters-per-epoch", type=int, help="optimizer steps per epoch")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="training patch and sliding window (seg) or input size (cls); default 64 64 32")
    p.add_argument("--lr", type=float, help="base learning rate (AdamW, cosine; default 1e-3)")
    p.add_argument("--layer-decay", type=float, help="lr factor per encoder stage going down (default 1: none)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--freeze-stages", type=int, choices=range(5), metavar="0..4",
                   help="freeze the first N encoder stages in full mode")
    p.add_argument("--width", type=int, help="encoder width for --init random (default 32 = official); taken "
                   "from the checkpoint otherwise")
    p.add_argument("--norm", choices=NORMS, help="normalisation for fine-tuning (default: the "
                   "checkpoint's; affine weights carry over)")
    p.add_argument("--act", choices=NETWORK_ACTS)
    p.add_argument("--pool", choices=Classifier3D.POOLS, help="classifier pooling")
    p.add_argument("--dropout", type=float, help="classifier dropout")
    p.add_argument("--seed", type=int, help="seeds the split, the label subset, sampling and initialisation")
    p.add_argument("--split-seed", type=int, help="seed of the train/validation/test split only (default: --seed); "
                   "fix it to compare seeds on one test set")
    p.add_argument("--val-fraction", type=float, help="share of patients for validation (default 0.2)")
    p.add_argument("--test-fraction", type=float, help="share of patients for testing (default 0.2)")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                   help="resample to this spacing (one value: isotropic, or three); default: each scan's own")
    p.add_argument("--modality", choices=MODALITIES)
    p.add_argument("--hu-window", type=float, nargs=2, metavar=("LOW", "HIGH"), help="CT window mapped to 0..1")
    p.add_argument("--keep-labels", type=_int_list, metavar="V1,V2,...",
                   help="label values to segment (classes 1..K in this order); every other value is background")
    p.add_argument("--num-classes", type=int, help="classes including background (default: max label + 1)")
    p.add_argument("--class-names", type=_name_list, metavar="A,B,...",
                   help="names of the foreground classes (seg) or of all classes (cls) in reports")
    p.add_argument("--allow-empty-labels", action="store_const", const=True,
                   dest="allow_empty_labels", help="accept label maps without foreground")
    p.add_argument("--fg-prob", type=float, help="share of patches centred on foreground (default 0.67)")
    p.add_argument("--flip", action="store_const", const=True,
                   help="random mirroring of every axis (off by default: it mixes up left/right organs)")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--sw-overlap", type=float, help="sliding-window overlap (default 0.25)")
    p.add_argument("--hd95", action="store_const", const=True, help="also report HD95 (mm) on the test split")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--overwrite", action="store_const", const=True, help="replace a run in --out")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")


def _finetune_config(args: argparse.Namespace):
    from .train import FinetuneConfig

    overrides = {k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__ and v is not None}
    if "spacing" in overrides:
        s = overrides["spacing"]
        if len(s) not in (1, 3) or min(s) <= 0:
            raise ValueError(f"--spacing takes one or three positive values in mm, got {s}")
        overrides["spacing"] = tuple(s) * 3 if len(s) == 1 else tuple(s)
    for key in ("patch_size", "hu_window"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return FinetuneConfig.from_name(args.preset, **overrides)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _cls2d_config(args: argparse.Namespace):
    """The 2D classification run's configuration; options of the 3D path are refused by name."""
    from .cls2d import Cls2DConfig
    from .train import FinetuneConfig

    if args.task != "cls":
        raise ValueError("--dims 2 fine-tunes classification only (--task cls)")
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    only_3d = sorted(k for k in given if k in FinetuneConfig.__dataclass_fields__
                     and k not in Cls2DConfig.__dataclass_fields__ and k != "task")
    if only_3d:
        flags = ", ".join("--" + k.replace("_", "-") for k in only_3d)
        raise ValueError(f"{flags}: not used with --dims 2 (2D options: --findings, --image-size)")
    fields = Cls2DConfig.__dataclass_fields__
    overrides = {k: v for k, v in given.items() if k in fields}
    if args.preset == "gpu":
        overrides = {"epochs": 20, "batch_size": 64, "precision": "bf16", **overrides}
    return Cls2DConfig(**overrides)


def _print_cls2d(summary: dict) -> None:
    test = summary["test"]
    print(f"\ntest: mean AUC {_fmt(test['mean_auc'])}")
    print("  AUC per finding:", ", ".join(f"{k} {_fmt(v)}" for k, v in test["auc_per_class"].items()))
    print(f"best epoch {summary['best_epoch']} (validation mean AUC {_fmt(summary['best_metric'])}); "
          f"{summary['wall_time_s']:.0f} s")
    for name, path in summary["files"].items():
        print(f"  {name:<18} {path}")


def cmd_finetune(args: argparse.Namespace) -> int:
    from .train import finetune

    if args.dims == 2:
        from .cls2d import finetune_cls2d

        _print_cls2d(finetune_cls2d(_cls2d_config(args)))
        return 0
    if args.findings is not None or args.image_size is not None:
        raise ValueError("--findings and --image-size belong to --dims 2 (chest X-ray classification)")
    summary = finetune(_finetune_config(args))
    test = summary["test"]
    print("\ntest:", ", ".join(f"{k} {_fmt(v)}" for k, v in test.items() if not isinstance(v, dict)))
    if isinstance(test.get("dice_per_class"), dict):
        print("  Dice per class:", ", ".join(f"{k} {_fmt(v)}" for k, v in test["dice_per_class"].items()))
    print(f"best epoch {summary['best_epoch']} ({summary['best_metric_name']} {_fmt(summary['best_metric'])}); "
          f"{summary['wall_time_s']:.0f} s")
    for name, path in summary["files"].items():
        print(f"  {name:<14} {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..checkpoint import read_checkpoint
    from .evaluate import evaluate_checkpoint

    meta = read_checkpoint(args.checkpoint, trusted=args.trust_checkpoint).get("finetune")
    if isinstance(meta, dict) and meta.get("task") == "cls2d":
        from .cls2d import evaluate_cls2d

        result = evaluate_cls2d(args.checkpoint, args.data, args.out, split=args.split, device=args.device,
                                progress=not args.no_progress, trusted=args.trust_checkpoint)
        print(json.dumps({k: result[k] for k in ("mean_auc", "auc_per_class", "n_images")}))
        for name, path in result["files"].items():
            print(f"  {name:<9} {path}")
        return 0
    result = evaluate_checkpoint(args.checkpoint, args.data, args.out, split=args.split, device=args.device,
                                 hd95=args.hd95, progress=not args.no_progress, trusted=args.trust_checkpoint)
    shown = {k: v for k, v in result.items() if k in ("mean_dice", "mean_hd95", "auc", "accuracy", "n_cases")}
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in shown.items()}))
    for name, path in result["files"].items():
        print(f"  {name:<9} {path}")
    return 0


def cmd_export_encoder(args: argparse.Namespace) -> int:
    from ..checkpoint import extract_state_dict, read_checkpoint
    from ..encoders import encoder_arch, encoder_state_dict, export_encoder, export_format, is_2d_state

    path = export_encoder(args.checkpoint, args.out, format=args.format, trusted=args.trust_checkpoint)
    if is_2d_state(extract_state_dict(read_checkpoint(path), path)):
        print(f"wrote {path}: the 2D network's ResNet-18 encoder, 120 tensors under torchvision's names; load with "
              "pcrlv2_fast.models.ResNet18Encoder().load_state_dict(state) or torchvision.models.resnet18()"
              ".load_state_dict(state, strict=False)")
        return 0
    state = encoder_state_dict(path)
    arch = encoder_arch(state)
    how = ("safetensors.torch.load_file(path)" if export_format(path, args.format) == "safetensors"
           else "torch.load(path, weights_only=True)")
    print(f"wrote {path}: {len(state)} tensors, encoder width {arch['width']}, {arch['in_channels']} input "
          f"channel(s), norm {arch['norm']}; load with PCRLv2Encoder3D.from_checkpoint(path) or "
          f"PCRLv2Encoder3D(width={arch['width']}).load_state_dict({how})")
    return 0


def add_finetune_parsers(subparsers) -> None:
    """Register ``finetune``, ``evaluate`` and ``export-encoder`` on the main parser's subparsers."""
    from .options import SPLITS

    p = subparsers.add_parser("finetune", help="fine-tune a PCRLv2 encoder (or a random one) for segmentation or "
                              "classification, with a patient-level split and test metrics")
    _add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = subparsers.add_parser("evaluate", help="score a fine-tuned checkpoint: metrics JSON and overlay picture")
    p.add_argument("checkpoint", metavar="CKPT", help="best.pt of a finetune run")
    p.add_argument("--data", required=True, help="the data it was fine-tuned on, or other data with --split all")
    p.add_argument("--out", required=True, help="folder for <split>_metrics.json and <split>_overlays.png")
    p.add_argument("--split", default="test", choices=SPLITS,
                   help="cases of the checkpoint's split to score, or all cases in --data (default test)")
    p.add_argument("--hd95", action=argparse.BooleanOptionalAction, default=None,
                   help="report HD95 (default: as in the finetune run)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs types outside the allow-list (full unpickling: code in the "
                        "file runs); only for files from a source you trust")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("export-encoder", help="write a checkpoint's encoder as a plain state_dict or a "
                              "safetensors file")
    p.add_argument("checkpoint", metavar="CKPT", help="PCRLv2 checkpoint: pretraining (ours or official) or finetune")
    p.add_argument("--out", required=True, help="output file (.pt or .safetensors), written atomically")
    p.add_argument("--format", metavar="pt|safetensors",
                   help="pt (a PyTorch state_dict) or safetensors (cannot carry code: the format for sharing); "
                        "default: from the --out suffix")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs types outside the allow-list (full unpickling: code in the "
                        "file runs); only for files from a source you trust")
    p.set_defaults(func=cmd_export_encoder)
