"""Summaries of the label-efficiency rows: mean and spread over seeds per budget and init, the paired difference
to random initialisation (same budget, same seed: same labelled subjects, same split), a text table and the plot
of test Dice against labelled subjects (``transfer.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def summarize(rows: list[dict]) -> dict:
    """{"by_init": {init: {budget: stats of test mean Dice, per class}}, "paired": {init: {budget: stats of
    init - random}}} over seeds."""
    inits = list(dict.fromkeys(r["init"] for r in rows))
    budgets = sorted({r["labelled"] for r in rows})
    by_init: dict = {}
    for init in inits:
        by_init[init] = {}
        for b in budgets:
            mine = [r for r in rows if r["init"] == init and r["labelled"] == b]
            if not mine:
                continue
            classes = mine[0]["test_dice_per_class"]
            by_init[init][b] = {"dice": _stats([r["test_mean_dice"] for r in mine]),
                                "per_class": {k: _stats([r["test_dice_per_class"][k] for r in mine]) for k in classes}}
    paired: dict = {}
    for init in inits:
        if init == "random":
            continue
        paired[init] = {}
        for b in budgets:
            base = {r["seed"]: r["test_mean_dice"] for r in rows if r["init"] == "random" and r["labelled"] == b}
            diffs = [r["test_mean_dice"] - base[r["seed"]] for r in rows
                     if r["init"] == init and r["labelled"] == b and r["seed"] in base]
            if diffs:
                paired[init][b] = {**_stats(diffs), "wins": int(sum(d > 0 for d in diffs))}
    return {"by_init": by_init, "paired": paired}


def table_text(summary: dict) -> str:
    """A Markdown table: test mean Dice (mean +- std over seeds) per init and budget, per-class means, and the
    paired difference to random init."""
    by_init, paired = summary["by_init"], summary["paired"]
    lines = ["| labelled subjects | init | test mean Dice | per class | minus random (paired) |",
             "| --- | --- | --- | --- | --- |"]
    budgets = sorted({b for per in by_init.values() for b in per})
    for b in budgets:
        for init, per in by_init.items():
            if b not in per:
                continue
            s = per[b]
            classes = ", ".join(f"{k} {v['mean']:.3f}" for k, v in s["per_class"].items())
            diff = paired.get(init, {}).get(b)
            delta = (f"{diff['mean']:+.3f} +- {diff['std']:.3f} ({diff['wins']}/{diff['n']} seeds better)"
                     if diff else "")
            lines.append(f"| {b} | {init} | {s['dice']['mean']:.3f} +- {s['dice']['std']:.3f} (n={s['dice']['n']}) "
                         f"| {classes} | {delta} |")
    return "\n".join(lines)


def save_transfer_png(path: str | Path, rows: list[dict], title: str = "") -> Path:
    """Test mean Dice against labelled subjects: one line per init (mean over seeds, +- std), seeds as dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..viz import save_figure

    summary = summarize(rows)["by_init"]
    fig = Figure(figsize=(6.5, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for k, (init, per) in enumerate(summary.items()):
        budgets = sorted(per)
        offset = (k - (len(summary) - 1) / 2) * 0.03  # side by side on the log axis
        xs = [b * (1 + offset) for b in budgets]
        ax.errorbar(xs, [per[b]["dice"]["mean"] for b in budgets], yerr=[per[b]["dice"]["std"] for b in budgets],
                    marker="o", capsize=4, label=init)
        for x, b in zip(xs, budgets, strict=True):
            seeds = [r["test_mean_dice"] for r in rows if r["init"] == init and r["labelled"] == b]
            ax.scatter([x] * len(seeds), seeds, s=10, alpha=0.4, color=ax.lines[-1].get_color())
    ax.set_xscale("log", base=2)
    budgets = sorted({r["labelled"] for r in rows})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("labelled training subjects")
    ax.set_ylabel("test mean Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
