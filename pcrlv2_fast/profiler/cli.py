"""The ``profile`` subcommand of ``pcrlv2-fast`` (registered by :func:`add_profile_parser`)."""

from __future__ import annotations

import argparse


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..train.config import CHOICES

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a preprocessing cache, or scans (preprocessed into OUT/cache first)")
    source.add_argument("--synthetic", action="store_true", help="two random CT-sized volumes (--dims 2: sixteen "
                        "512 x 512 images): no files needed")
    p.add_argument("--dims", type=int, choices=(2, 3), help="3 (default) or 2: the chest X-ray network and views")
    p.add_argument("--out", required=True, help="folder for profile.json, profile.png, trace.pt.trace.json "
                   "(compare.png)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--layer-steps", type=int, default=3,
                   help="steps under torch.profiler for the per-layer table and the trace (default 3; 0: none)")
    p.add_argument("--preset", default="official", help="the pretraining preset the options start from")
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--accumulate", type=int)
    p.add_argument("--precision", choices=CHOICES["precision"])
    p.add_argument("--channels-last", action="store_const", const=True)
    p.add_argument("--compile", action="store_const", const=True)
    p.add_argument("--kernels", choices=CHOICES["kernels"])
    p.add_argument("--loader", choices=CHOICES["loader"])
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--prefetch", type=int,
                   help="batches built ahead in a thread (default: 2 on CUDA, 0 on the CPU); above 0, data_wait is "
                        "the wait for the queue and the host-to-device copy happens inside it")
    p.add_argument("--seed", type=int)
    p.add_argument("--compare", nargs="+", metavar="AXIS=V1,V2",
                   help="time every combination (round-robin) against the official-equivalent step (fp32, "
                        "contiguous, eager, torch kernels); axes: precision, channels_last (0/1), compile (0/1), "
                        "kernels, loader, prefetch")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def cmd_profile(args: argparse.Namespace) -> int:
    from ..train import PretrainConfig
    from . import ProfileConfig, parse_compare, profile
    from .report import summary_text

    fields = set(PretrainConfig.__dataclass_fields__) - {"data", "out"}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    train = PretrainConfig.from_name(args.preset, data=args.data or "", out=args.out, overwrite=True,
                                     tensorboard=False, pictures=False, **overrides)
    cfg = ProfileConfig(train, steps=args.steps, warmup=args.warmup, synthetic=args.synthetic,
                        layer_steps=args.layer_steps, compare=parse_compare(args.compare or []), progress=args.progress)
    result = profile(cfg)
    print(summary_text(result))
    for name, path in result["files"].items():
        if path:
            print(f"  {name:<13} {path}")
    return 0


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="where a training step's time goes: phases, FLOP utilisation, layers, "
                              "trace; --compare times settings against each other")
    _add_args(p)
    p.set_defaults(func=cmd_profile)
    return p
