"""The label-efficiency benchmark: the protocol at toy size on the real hippocampus data, and its summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pcrlv2_fast.cli import main as cli_main
from pcrlv2_fast.transfer import TransferConfig, run_transfer
from pcrlv2_fast.transfer.report import summarize, table_text


@pytest.fixture(scope="module")
def quick(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    # The class names the benchmark script gives this data set, so that its test below reuses every stage.
    assert cli_main(["transfer", "--quick", "--data", str(shared_data / "msd-hippocampus"), "--out", str(out),
                     "--class-names", "anterior,posterior", "--no-progress"]) == 0
    return out, json.loads((out / "transfer.json").read_text())


def test_quick_protocol_runs_every_init_budget_and_seed(quick):
    out, result = quick
    rows = result["rows"]
    assert sorted((r["init"], r["labelled"], r["seed"]) for r in rows) == sorted(
        (i, b, s) for i in ("random", "pcrlv2") for b in (2, 4) for s in (0, 1))
    assert all(0 <= r["test_mean_dice"] <= 1 and set(r["test_dice_per_class"]) == {"anterior", "posterior"}
               for r in rows)
    assert result["split"] == {"test": 4, "val": 2, "pool": 10}
    p = result["pretrain"]
    assert p["steps"] == 4 and p["samples"] == 16 and [q["step"] for q in p["probe_dice"]][0] == 0
    assert (out / "transfer.png").stat().st_size > 10_000


def test_pretraining_sees_the_pool_only_and_labels_are_nested(quick):
    out, result = quick
    split = json.loads((out / "split.json").read_text())
    pool = set(split["train"]) | set(split["unlabelled"])
    cases = {c["id"]: c for c in json.loads((out / "cases.json").read_text())}
    pool_images = {cases[i]["image"][0] for i in pool}
    cached = {e["source"] for e in json.loads((out / "pretrain" / "cache" / "index.json").read_text())["scans"]}
    assert cached == pool_images  # no validation or test subject's image was pretrained on
    probed = {c["id"] for c in json.loads((out / "val_cases.json").read_text())}
    assert probed == set(split["val"])
    for seed in (0, 1):
        subsets = {r["init"] + str(r["labelled"]): set(r["train_subjects"])
                   for r in result["rows"] if r["seed"] == seed}
        assert subsets["random2"] == subsets["pcrlv22"] < subsets["random4"] == subsets["pcrlv24"] <= pool
    # The fine-tuning seed draws the labelled subjects: the two seeds label different ones.
    assert len({frozenset(r["train_subjects"]) for r in result["rows"] if r["labelled"] == 2}) == 2


def test_a_second_run_reuses_every_finished_stage(quick, shared_data):
    out, result = quick
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("best.pt")} | {out / "pretrain" / "checkpoint.pt": (
        out / "pretrain" / "checkpoint.pt").stat().st_mtime_ns}
    again = run_transfer(TransferConfig.quick(data=str(shared_data / "msd-hippocampus"), out=str(out), progress=False,
                                              class_names=("anterior", "posterior")))
    assert again["rows"] == result["rows"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_benchmark_script_writes_rows_the_readme_renders(quick, shared_data, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out, _ = quick  # every stage is reused: the script only gathers, writes and renders
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("best.pt")}
    results = tmp_path / "transfer-cpu-2026-01-01.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "benchmark_transfer.py"), "--quick", "--data",
                           str(shared_data / "msd-hippocampus"), "--out", str(out), "--results", str(results),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    rows = json.loads(results.read_text())
    assert [r["kind"] for r in rows] == ["pretrain"] + ["finetune"] * 8 + ["summary"]
    assert all("commit" in r and "device" in r for r in rows)
    sys.path.insert(0, str(root / "benchmarks"))
    import report

    text = report.render_transfer(rows, results)
    assert "PCRLv2 - random (paired)" in text and "| 2 |" in text and "| 4 |" in text


def _row(init, labelled, seed, dice):
    return {"init": init, "labelled": labelled, "seed": seed, "test_mean_dice": dice,
            "test_dice_per_class": {"a": dice - 0.1, "b": dice + 0.1}}


def test_summary_pairs_each_seed_with_random_init():
    rows = [_row("random", 8, 0, 0.5), _row("random", 8, 1, 0.7), _row("pcrlv2", 8, 0, 0.6), _row("pcrlv2", 8, 1, 0.6)]
    s = summarize(rows)
    assert s["by_init"]["random"][8]["dice"]["mean"] == pytest.approx(0.6)
    assert s["by_init"]["random"][8]["dice"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert s["by_init"]["pcrlv2"][8]["per_class"]["b"]["mean"] == pytest.approx(0.7)
    paired = s["paired"]["pcrlv2"][8]
    assert paired["mean"] == pytest.approx(0.0) and paired["wins"] == 1 and paired["n"] == 2
    assert paired["std"] == pytest.approx(np.std([0.1, -0.1], ddof=1))
    assert "1/2 seeds better" in table_text(s)
