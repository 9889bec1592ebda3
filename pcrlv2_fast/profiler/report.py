"""What the profile shows: the printed summary, profile.png (phases and layers) and compare.png (the matrix)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..viz import save_figure


def save_profile_png(path: Path, result: dict, top_layers: int = 20) -> Path:
    """Left: mean time per phase of a step; right: the slowest layers, forward and backward."""
    fig = Figure(figsize=(13, 6), constrained_layout=True)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=(1, 1.6))
    phases = result["phases"]
    names = list(phases)[::-1]
    left.barh(names, [phases[n]["mean_s"] * 1e3 for n in names], color="#4c72b0")
    left.set_xlabel("ms per step (mean)")
    left.set_title(f"{result['config']}: {result['step']['mean_s'] * 1e3:.1f} ms/step, "
                   f"{result['throughput']['samples_per_s']:.2f} samples/s")
    rows = result.get("layers", [])[:top_layers][::-1]
    if rows:
        labels = [r["layer"] for r in rows]
        fwd = [r["fwd_s"] * 1e3 for r in rows]
        right.barh(labels, fwd, color="#55a868", label="forward")
        right.barh(labels, [r["bwd_s"] * 1e3 for r in rows], left=fwd, color="#c44e52", label="backward")
        right.legend(loc="lower right")
        right.set_xlabel("ms per step (torch.profiler ranges)")
        right.set_title(f"slowest {len(rows)} layers")
        right.tick_params(axis="y", labelsize=7)
    else:
        right.set_axis_off()
    return save_figure(fig, path)


def save_compare_png(path: Path, compare: dict) -> Path:
    """Samples/s per configuration, with the speed-up over the official-equivalent step on each bar."""
    rows = compare["rows"]
    fig = Figure(figsize=(9, 1.2 + 0.45 * len(rows)), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = [r["config"] + (" (baseline)" if r["baseline"] else "") for r in rows][::-1]
    values = [r["samples_per_s"] for r in rows][::-1]
    colors = ["#c44e52" if r["config"] == compare["fastest"] else "#4c72b0" for r in rows][::-1]
    bars = ax.barh(labels, values, color=colors)
    for bar, row in zip(bars, rows[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row['speedup']:.2f}x", va="center")
    ax.set_xlabel("samples/s")
    ax.set_title(f"fastest: {compare['fastest']}")
    return save_figure(fig, path)


def summary_text(result: dict) -> str:
    """The printed summary of a profile or a comparison."""
    if "compare" in result:
        c = result["compare"]
        lines = [f"{'configuration':<36} {'samples/s':>10} {'ms/step':>9} {'speed-up':>9}"]
        for r in c["rows"]:
            name = r["config"] + (" (baseline)" if r["baseline"] else "")
            lines.append(f"{name:<36} {r['samples_per_s']:>10.2f} {r['step_s'] * 1e3:>9.1f} {r['speedup']:>8.2f}x")
        lines.append(f"fastest: {c['fastest']}")
        return "\n".join(lines)
    t, step = result["throughput"], result["step"]
    lines = [f"{result['config']} on {result['device']}: {step['mean_s'] * 1e3:.1f} ms/step (p90 "
             f"{step['p90_s'] * 1e3:.1f}), {t['samples_per_s']:.2f} samples/s",
             f"{'phase':<16} {'mean ms':>9} {'p90 ms':>9} {'share':>7}"]
    for name, p in result["phases"].items():
        lines.append(f"{name:<16} {p['mean_s'] * 1e3:>9.2f} {p['p90_s'] * 1e3:>9.2f} {p['share']:>7.1%}")
    check = result["phase_check"]
    lines.append(f"phases add up to the step within {check['max_gap']:.1%} "
                 f"({'ok' if check['ok'] else 'NOT within'} {check['tolerance']:.0%})")
    mfu = f", MFU {t['mfu']:.1%}" if t["mfu"] is not None else ""
    peak = f" of {t['peak_tflops']:.1f} peak ({t['peak_source']})" if t["peak_tflops"] else f" ({t['peak_source']})"
    lines.append(f"model {t['model_flops_per_step'] / 1e12:.3f} TFLOP/step: {t['achieved_tflops']:.3f} TFLOP/s"
                 f"{peak}{mfu}")
    lines.append("memory: " + ", ".join(f"{k} {v:.2f}" for k, v in result["memory"].items()))
    if result.get("layers"):
        lines.append(f"{'layer':<34} {'GFLOP':>9} {'fwd ms':>8} {'bwd ms':>8} {'TFLOP/s':>8} {'share':>7}")
        for r in result["layers"][:12]:
            rate = f"{r['tflops']:.3f}" if r["tflops"] is not None else "-"
            lines.append(f"{r['layer']:<34} {r['flops'] / 1e9:>9.3f} {r['fwd_s'] * 1e3:>8.2f} {r['bwd_s'] * 1e3:>8.2f} "
                         f"{rate:>8} {r['share']:>7.1%}")
        lines.append("top kernels: " + "; ".join(f"{k['name']} {k['s_per_step'] * 1e3:.2f} ms"
                                                  for k in result["top_kernels"][:5]))
    return "\n".join(lines)
