"""The README's performance tables are the newest benchmark results, rendered by benchmarks/report.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


def test_every_results_block_equals_its_newest_result_file():
    text = report.README.read_text()
    fresh = dict(report.blocks(report.updated(text, report.newest_files())))
    found = report.blocks(text)
    assert found, "README has no results blocks"
    for series, body in found:
        assert body == fresh[series], (f"README table {series!r} differs from the newest result file; run "
                                       "python benchmarks/report.py --write")


def test_every_result_series_with_a_table_is_in_the_readme():
    in_readme = {series for series, _ in report.blocks(report.README.read_text())}
    for series in report.newest_files():
        if series.split("-")[0] in report.RENDERERS:
            assert series in in_readme, f"{series}: newest results are not shown in the README"


def test_newest_rows_record_the_commit_that_produced_them():
    for path in report.newest_files().values():
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else [data["commit_info"] | {"commit": data["commit_info"].get("id")}]
        for row in rows:
            assert row.get("commit") and "dirty" in row, f"{path.name}: a row without its commit"


def test_a_changed_figure_is_caught(tmp_path):
    text = report.README.read_text()
    series, body = report.blocks(text)[0]
    altered = text.replace(body, body.replace("|", "| 9.99 |", 3), 1)
    stale = [s for (s, b), (_, f) in zip(report.blocks(altered), report.blocks(report.updated(altered,
                                                                                                report.newest_files())))
             if b != f]
    assert stale == [series]


def test_series_names_drop_the_date(tmp_path):
    for name in ("data-cpu-2026-11-26.json", "data-cpu-2026-11-27.json", "data-cpu-2026-11-26-batch8.json"):
        (tmp_path / name).write_text("[]")
    files = report.newest_files(tmp_path)
    assert {k: v.name for k, v in files.items()} == {"data-cpu": "data-cpu-2026-11-27.json",
                                                      "data-cpu-batch8": "data-cpu-2026-11-26-batch8.json"}
    with pytest.raises(KeyError, match="no README table"):
        report.render("mystery-cpu", tmp_path / "data-cpu-2026-11-27.json")
