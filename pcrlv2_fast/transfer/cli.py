"""The ``transfer`` subcommand of ``pcrlv2-fast`` (registered by :func:`add_transfer_parser`)."""

from __future__ import annotations

import argparse


def _init_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT, got {text!r}")
    return name, path


def _add_args(p: argparse.ArgumentParser, data_default: str | None = None, out_default: str | None = None) -> None:
    p.add_argument("--data", required=data_default is None, default=data_default,
                   help="labelled volumes, one subject per case (any finetune --data layout; e.g. the MSD Task04 "
                        "hippocampus folder)")
    p.add_argument("--out", required=out_default is None, default=out_default,
                   help="folder for the split, the pretraining run, every fine-tuning run, transfer.json and "
                        "transfer.png (a second run continues where the first stopped)")
    p.add_argument("--quick", action="store_true", help="the same protocol at toy size (about a minute)")
    p.add_argument("--subjects", type=int, help="use the first N cases by id (default: all)")
    p.add_argument("--n-test", type=int, help="test subjects (default 100)")
    p.add_argument("--n-val", type=int, help="validation subjects (default 20)")
    p.add_argument("--budgets", type=int, nargs="+", help="labelled training subjects per run (default 8 16 32)")
    p.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default 0 1 2)")
    p.add_argument("--width", type=int, help="network width of every run (default 16)")
    p.add_argument("--crop-scale", type=float, help="pretraining crop geometry scale (default 0.4)")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps on the pool (default 2400)")
    p.add_argument("--pretrain-batch", type=int)
    p.add_argument("--pretrain-lr", type=float)
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default 4)")
    p.add_argument("--iters-per-epoch", type=int, help="fine-tuning steps per epoch (default 25)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default 1e-3)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="fine-tuning precision (default bf16)")
    p.add_argument("--class-names", type=lambda t: tuple(v for v in t.split(",") if v), metavar="A,B",
                   help="names of the foreground classes in the reports")
    p.add_argument("--extra-init", type=_init_pair, action="append", metavar="NAME=CKPT",
                   help="also fine-tune from this checkpoint (e.g. PCRLv2 pretrained on other data)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace):
    """The TransferConfig of parsed arguments: --quick's toy sizes or the full protocol, then the options given."""
    from . import TransferConfig

    fields = set(TransferConfig.__dataclass_fields__) - {"data", "out", "extra_inits"}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
                 if k in fields and v is not None}
    overrides["extra_inits"] = dict(args.extra_init or [])
    make = TransferConfig.quick if args.quick else TransferConfig
    return make(data=args.data, out=args.out, **overrides)


def cmd_transfer(args: argparse.Namespace) -> int:
    from . import run_transfer
    from .report import save_transfer_png, summarize, table_text

    result = run_transfer(config_from_args(args))
    png = save_transfer_png(f"{args.out}/transfer.png", result["rows"])
    p = result["pretrain"]
    print(f"\nsplit: {result['split']['test']} test, {result['split']['val']} validation, {result['split']['pool']} "
          f"pool subjects; pretraining: {p['steps']} steps, {p['samples']} samples, loss {p['first_loss']:.3f} -> "
          f"{p['last_loss']:.3f}; validation probe Dice {p['probe_dice'][0]['dice']:.3f} -> "
          f"{p['probe_dice'][-1]['dice']:.3f}")
    print(table_text(summarize(result["rows"])))
    print(f"  transfer_json  {args.out}/transfer.json\n  transfer_png   {png}")
    return 0


def add_transfer_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("transfer", help="does pretraining help? PCRLv2 vs random init at a few labelled-subject "
                              "budgets on a fixed split (label-efficiency benchmark)")
    _add_args(p)
    p.set_defaults(func=cmd_transfer)
    return p
