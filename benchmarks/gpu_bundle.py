"""What the GPU visit needs besides the checkout, prepared here (``make gpu-bundle``): a small real preprocessed
cache from ../shared/data and the commit it goes with, in an ignored folder carried with the working tree.

The GPU machine has torch and Triton but no SimpleITK, no shared data and maybe no ``.git``: the cache lets
``make gpu-check`` run real ``pretrain`` steps there, and ``commit.json`` stamps its result rows.

Usage: python benchmarks/gpu_bundle.py [--out gpu_bundle] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import ROOT, source_state  # noqa: E402

# Two real CT crops at their native 1.5 mm: a few MB each as int16, larger than the official global crops.
SCANS = ("totalseg-examples/aorta_ct_cropped.nii.gz", "totalseg-examples/pulmonary_ct_cropped.nii.gz")
SPACING = 1.5
LIMIT_MB = 40


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "gpu_bundle"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args(argv)
    from pcrlv2_fast.data import preprocess

    data, out = Path(args.data), Path(args.out)
    sources = [data / s for s in SCANS]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        sys.exit(f"error: the bundle's scans are missing: {', '.join(missing)} (the shared data beside the checkout)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    report = preprocess(sources, tmp / "cache", spacing=(SPACING,) * 3, progress=False)
    if len(report.names) != len(sources):
        sys.exit(f"error: preprocessing failed:\n{report.table()}")
    (tmp / "commit.json").write_text(json.dumps(source_state(), indent=1) + "\n")
    size = folder_mb(tmp)
    if size > LIMIT_MB:
        sys.exit(f"error: the bundle takes {size:.1f} MB, over the {LIMIT_MB} MB the GPU visit may carry")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"{out}: {len(report.names)} volumes ({', '.join(report.names)}), {size:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
