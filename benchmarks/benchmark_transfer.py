"""Does PCRLv2 pretraining help when labels are scarce? The label-efficiency benchmark on the MSD Task04 hippocampus
MR (260 subjects): a fixed split (100 test, 20 validation, 140 pool), PCRLv2 pretrained on the pool's images only,
then fine-tuning from random and from PCRLv2 initialisation with 8, 16 and 32 labelled subjects, 3 seeds each
(protocol: ``pcrlv2_fast/transfer/protocol.py``; what the numbers show: docs/transfer.md).

Usage: python benchmarks/benchmark_transfer.py [--data ../shared/data/msd-hippocampus] [--out runs/transfer]
       [--quick] [--results FILE] [any option of ``pcrlv2-fast transfer``]
Writes OUT/transfer.json, OUT/transfer.png and (unless --quick) benchmarks/results/transfer-<device>-<date>.json, one
row per fine-tuning run plus the pretraining row, each with the environment and commit; prints the table. A second
run with the same options continues where an interrupted one stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import ROOT, environment, write_rows  # noqa: E402

from pcrlv2_fast.transfer import TransferConfig, run_transfer  # noqa: E402
from pcrlv2_fast.transfer.cli import _add_args, config_from_args  # noqa: E402
from pcrlv2_fast.transfer.report import save_transfer_png, summarize, table_text  # noqa: E402
from pcrlv2_fast.utils.device import resolve_device  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd-hippocampus"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _add_args(p, data_default=str(DEFAULT_DATA), out_default="runs/transfer")
    p.add_argument("--results", help="where to write the result rows (default: benchmarks/results/transfer-<device>-"
                   "<date>.json; with --quick, only when given)")
    args = p.parse_args(argv)
    if args.class_names is None and Path(args.data).name == "msd-hippocampus":
        args.class_names = ("anterior", "posterior")  # MSD Task04 labels 1 and 2
    cfg: TransferConfig = config_from_args(args)
    env = environment(resolve_device(cfg.device))  # the commit that runs, before any later change to the tree
    result = run_transfer(cfg)
    save_transfer_png(Path(cfg.out) / "transfer.png", result["rows"],
                      title=f"MSD hippocampus, {result['split']['test']} test subjects")
    summary = summarize(result["rows"])
    print(table_text(summary))
    if args.results or not args.quick:
        rows = [{"kind": "pretrain", **result["pretrain"], "split": result["split"], "config": result["config"], **env}]
        rows += [{"kind": "finetune", **row, **env} for row in result["rows"]]
        rows.append({"kind": "summary", "by_init": summary["by_init"], "paired": summary["paired"], **env})
        print(f"wrote {write_rows(rows, 'transfer', torch.device(resolve_device(cfg.device)), out=args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
