"""README performance tables, generated from the newest result file of each benchmark series.

A series is a result file name without its date: ``data-cpu-2026-11-26-batch8.json`` belongs to
``data-cpu-batch8``. The README holds one block per series between ``<!-- results: SERIES -->`` and
``<!-- /results -->``; this script rewrites those blocks (``--write``) or checks them (``--check``, and
``tests/test_readme_figures.py``), so a figure in the README cannot outlive the measurement it came from.

Usage: python benchmarks/report.py [--write | --check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
_DATED = re.compile(r"^(?P<head>.+?)-(?P<date>\d{4}-\d{2}-\d{2})(?P<tail>-.+)?\.json$")
_BLOCK = re.compile(r"(<!-- results: (?P<series>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def newest_files(results: Path = RESULTS) -> dict[str, Path]:
    """series -> its newest result file (by the date in the name)."""
    newest: dict[str, tuple[str, Path]] = {}
    for path in results.glob("*.json"):
        m = _DATED.match(path.name)
        if m is None:
            continue
        series = m["head"] + (m["tail"] or "")
        if series not in newest or m["date"] > newest[series][0]:
            newest[series] = (m["date"], path)
    return {series: path for series, (_, path) in newest.items()}


def _provenance(path: Path, env: dict) -> str:
    commit = env.get("commit")
    state = "unknown commit" if not commit else f"commit {commit[:10]}" + (", uncommitted changes" if env.get(
        "dirty") else "")
    parts = [state, env.get("device", "?")] + ([f"torch {env['torch']}"] if env.get("torch") else []) + [
        env.get("date", "?")]
    return f"Source: `benchmarks/results/{path.name}` ({'; '.join(parts[:1])}; {', '.join(parts[1:])})."


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_train_step(rows: list[dict], path: Path) -> str:
    base = next(k for k in rows[0] if k.startswith("speedup_vs_"))
    out = []
    for r in rows:
        layout = "channels_last_3d" if r["channels_last"] else "contiguous"
        what = f"{r.get('model', '?')}, {r['precision']}, {layout}" + (", torch.compile" if r["compile"] else "") + (
            ", Triton kernels" if r.get("kernels") == "triton" else "")
        out.append([r["provider"], what, f"{r['s_per_step']:.2f}", f"{r['samples_per_s']:.2f}", f"{r[base]:.2f}x",
                    f"{r['warmup_s']:.1f}"])
    r0 = rows[0]
    note = (f"Batch {r0['batch_size']}, width {r0['width']}, median of {r0['steps']} interleaved steps after "
            f"{r0.get('warmup_steps', 1)} warm-up step(s) each; {r0['gflop_per_sample'] / 1e3:.2f} TFLOP per sample "
            "(forward + backward).")
    header = ["provider", "model, precision, layout", "s/step", "samples/s", base.replace("speedup_vs_", "vs "),
              "warm-up s"]
    return "\n\n".join([_table(header, out), note, _provenance(path, r0)])


def render_data(rows: list[dict], path: Path) -> str:
    base = next(k for k in rows[0] if k.startswith("speedup_vs_"))
    out = [[r["provider"], f"{r['s_per_sample'] * 1e3:.2f}", f"{r[base]:.2f}x"] for r in rows]
    batch = max(r["batch"] for r in rows)
    note = f"{rows[0]['samples']} samples, engine loaders in batches of {batch}, one thread each, round-robin."
    header = ["provider", "ms/sample/core", base.replace("speedup_vs_", "vs ")]
    return "\n\n".join([_table(header, out), note, _provenance(path, rows[0])])


MICRO_OPS = (  # (label, benchmark name of a global view, of a local view)
    ("crop from the memory map", "test_crop_memmap[global]", "test_crop_memmap[local]"),
    ("crop + resize (native)", "test_resize_native[1-global]", "test_resize_native[1-local]"),
    ("flip + affine (native)", "test_affine_native[1-global]", "test_affine_native[1-local]"),
    ("blur + noise + gamma + swap + z-norm (native)", "test_intensity_native[1-global]",
     "test_intensity_native[1-local]"),
    ("whole chain fused per view (native.views)", "test_views_native[global]", "test_views_native[local]"),
)


def render_micro(data: dict, path: Path) -> str:
    per_item = {b["name"]: b["stats"]["median"] / b.get("extra_info", {}).get("items", 1) for b in data["benchmarks"]}
    out = [[label, f"{per_item[g] * 1e3:.3f}", f"{per_item[loc] * 1e3:.3f}"] for label, g, loc in MICRO_OPS]
    info = data["commit_info"]
    env = {"commit": info.get("id"), "dirty": info.get("dirty"), "date": data["datetime"][:10],
           "device": data["machine_info"].get("cpu", {}).get("brand_raw", "?")}
    header = ["op (one view)", "64x64x32 global view, ms", "16^3 local view, ms"]
    return "\n\n".join([_table(header, out), "Median per view, pytest-benchmark (`make bench-micro`).",
                        _provenance(path, env)])


def render_crop_resize(rows: list[dict], path: Path) -> str:
    out = [[r["provider"], r["view"], f"{r['crops_per_s']:,.0f}", f"{r['speedup_vs_torch']:.2f}x"] for r in rows]
    note = (f"{rows[0]['boxes']} boxes per call from a {'x'.join(map(str, rows[0]['volume_shape']))} volume, "
            f"{rows[0]['threads']} threads; `native_out` writes into a reused buffer.")
    return "\n\n".join([_table(["provider", "view", "crops/s", "vs torch"], out), note, _provenance(path, rows[0])])


def render_scaling(rows: list[dict], path: Path) -> str:
    out = []
    for r in rows:
        eff = r.get("weak_scaling_efficiency", r.get("efficiency_ceiling"))
        out.append([r["provider"], str(r["processes"]), str(r["threads_per_process"]), f"{r['samples_per_s']:.2f}",
                    "" if eff is None else f"{eff:.2f}"])
    note = (f"Width {rows[0]['width']}, {rows[0]['precision']}, batch {rows[0]['per_process_batch']} per process, "
            "gloo; `2x1proc-independent` runs two unrelated single-process trainings side by side: its figure is "
            "the ceiling this machine allows.")
    header = ["provider", "processes", "threads each", "samples/s", "efficiency (or ceiling)"]
    return "\n\n".join([_table(header, out), note, _provenance(path, rows[0])])


def render_compile(rows: list[dict], path: Path) -> str:
    kernels: dict[str, list[dict]] = {}
    for r in rows:
        kernels.setdefault(r["kernel"], []).append(r)
    out = [[k, str(len(v)), str(max(r["regs"] for r in v)), str(min(r["warps_per_sm"] for r in v)),
            f"{max(r['shared'] for r in v):,}", str(sum(r["spill_bytes"] for r in v)),
            "yes" if all(r["ok"] for r in v) else "NO"] for k, v in kernels.items()]
    r0 = rows[0]
    note = (f"{len(rows)} configurations (bf16, fp16, fp32, fp32 with TF32) compiled for {r0['arch']} with Triton "
            f"{r0['triton']}; registers per thread, resident warps per SM implied by registers and shared memory.")
    header = ["kernel", "configs", "max regs", "min warps/SM", "max shared B", "spill B", "pass"]
    return "\n\n".join([_table(header, out), note, _provenance(path, r0)])


def render_predictions(rows: list[dict], path: Path) -> str:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["op"] != "train step":
            layer = r["op"].startswith(("conv", "bn_act"))
            groups.setdefault(("conv " if r["op"].startswith("conv") else "") + r["pass"] if layer
                              else f"{r['op']} {r['pass']}", []).append(r)
    out = []
    for name, rs in groups.items():
        ms = sum(r["predicted_ms"] * r["count"] for r in rs)
        memory_bound = sum(r["bytes"] / 3.35e12 > r["flop"] / 989e12 for r in rs)
        out.append([name, str(len(rs)), f"{ms:.2f}", f"{memory_bound}/{len(rs)}"])
    step = next(r for r in rows if r["op"] == "train step")
    total = sum(float(o[2]) for o in out)
    out.append(["sum of the above", "", f"{total:.2f}", ""])
    out.append(["whole step at peak FLOP/s", "", f"{step['predicted_ms']:.2f}",
                f"{step['samples_per_s']:.0f} samples/s"])
    note = ("Predicted, not measured: batch 32, width 32 on an H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s); per row "
            "the larger of FLOPs at peak and least bf16 traffic at full bandwidth, summed over the step's layers.")
    header = ["pass", "rows", "predicted ms per step", "memory-bound rows"]
    return "\n\n".join([_table(header, out), note, _provenance(path, rows[0])])


def render_profile(rows: list[dict], path: Path) -> str:
    prof = next(r for r in rows if r["kind"] == "profile")
    comp = next(r for r in rows if r["kind"] == "compare")
    step_ms = prof["step"]["mean_s"] * 1e3
    phases = [[name, f"{v['mean_s'] * 1e3:.1f}", f"{v['share']:.1%}"] for name, v in prof["phases"].items()]
    t = prof["throughput"]
    mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "-"
    note = (f"`{prof['config']}`, width {prof['width']}, batch {prof['batch_size']}: {step_ms:.0f} ms per step "
            f"({t['samples_per_s']:.2f} samples/s); phases add up to the measured step within "
            f"{prof['phase_check']['max_gap']:.1%}. Model {t['model_flops_per_step'] / 1e12:.2f} TFLOP per step, "
            f"{t['achieved_tflops']:.3f} TFLOP/s achieved against {t['peak_tflops']:.3f} peak ({t['peak_source']}): "
            f"MFU {mfu}.")
    layers = [[r["layer"], f"{r['flops'] / 1e9:.1f}", f"{(r['fwd_s'] + r['bwd_s']) * 1e3:.0f}",
               f"{r['tflops']:.3f}" if r["tflops"] is not None else "-", f"{r['share']:.1%}"]
              for r in prof["layers"][:5]]
    compare = [[r["config"] + (" (baseline)" if r["baseline"] else ""), f"{r['samples_per_s']:.2f}",
                f"{r['speedup']:.2f}x"] for r in comp["rows"]]
    return "\n\n".join([_table(["phase", "ms per step", "share"], phases), note,
                         _table(["slowest layers", "GFLOP", "ms", "TFLOP/s", "share"], layers),
                         _table(["--compare", "samples/s", "speed-up"], compare) + f"\n\nFastest: `{comp['fastest']}`.",
                         f"Command: `{prof['command']}`.", _provenance(path, prof)])


def render_end_to_end(rows: list[dict], path: Path) -> str:
    out = [[r["provider"], f"{r['s_per_step']:.2f}", f"{r['samples_per_s']:.3f}", f"{r['speedup_vs_official']:.2f}x"]
           for r in rows]
    r0 = rows[0]
    note = (f"Width {r0['width']}, batch {r0['batch']}, {r0['steps']} timed steps each, alternating; the official "
            f"DataLoader with {r0['workers']} workers; {r0['threads']} torch threads. Command: `{r0['command']}`.")
    return "\n\n".join([_table(["pipeline", "s/step", "samples/s", "vs official"], out), note, _provenance(path, r0)])


def render_transfer(rows: list[dict], path: Path) -> str:
    pre = next(r for r in rows if r["kind"] == "pretrain")
    summary = next(r for r in rows if r["kind"] == "summary")
    by_init, paired = summary["by_init"], summary["paired"].get("pcrlv2", {})
    classes = list(next(iter(by_init["random"].values()))["per_class"])

    def cell(stats: dict) -> str:
        return f"{stats['mean']:.3f} ± {stats['std']:.3f}"

    out = []
    for budget in sorted(by_init["random"], key=int):
        rand, pcrl, diff = by_init["random"][budget], by_init["pcrlv2"][budget], paired[budget]
        per_class = " / ".join(f"{rand['per_class'][c]['mean']:.3f} vs {pcrl['per_class'][c]['mean']:.3f}"
                               for c in classes)
        out.append([budget, cell(rand["dice"]), cell(pcrl["dice"]), f"{diff['mean']:+.3f} ± {diff['std']:.3f}",
                    f"{diff['wins']}/{diff['n']}", per_class])
    cfg, probe = pre["config"], pre["probe_dice"]
    note = (f"Test mean Dice over {pre['split']['test']} test subjects, mean ± standard deviation over "
            f"{len(cfg['seeds'])} seeds; model selection on {pre['split']['val']} validation subjects. PCRLv2: "
            f"{pre['steps']} steps ({pre['samples']} samples) on the {pre['split']['pool']} pool subjects' images, "
            f"width {cfg['width']}, crop scale {cfg['crop_scale']}, loss {pre['first_loss']:.3f} -> "
            f"{pre['last_loss']:.3f}, validation probe Dice {probe[0]['dice']:.3f} -> {probe[-1]['dice']:.3f}. "
            f"Fine-tuning: {cfg['epochs']} x {cfg['iters_per_epoch']} steps, batch {cfg['batch_size']}, patch "
            f"{'x'.join(map(str, cfg['patch_size']))}, {cfg['precision']}. Command: "
            f"`python benchmarks/benchmark_transfer.py`.")
    header = ["labelled subjects", "random", "PCRLv2", "PCRLv2 - random (paired)", "seeds better",
              f"per class, random vs PCRLv2 ({' / '.join(classes)})"]
    return "\n\n".join([_table(header, out), note, _provenance(path, pre)])


def render_data2d(rows: list[dict], path: Path) -> str:
    out = [[r["provider"], f"{r['s_per_sample'] * 1e3:.2f}", f"{r['samples_per_s']:.1f}",
            f"{r['speedup_vs_official']:.2f}x"] for r in rows]
    r0 = rows[0]
    note = (f"{r0['samples']} samples per provider from {r0['images']} NIH ChestX-ray14 images (512 x 512 PNG); one "
            "sample = 2 global 224-pixel views, their target and 6 local 96-pixel views; one thread each, "
            f"round-robin; `torch` builds batches of {r0['batch']}. Command: `{r0['command']}`.")
    header = ["provider", "ms/sample/core", "samples/s", "vs official_file"]
    return "\n\n".join([_table(header, out), note, _provenance(path, r0)])


def render_train_step2d(rows: list[dict], path: Path) -> str:
    out = [[r["provider"], r["precision"] + (", channels_last" if r["channels_last"] else ""),
            f"{r['s_per_step']:.3f}", f"{r['samples_per_s']:.2f}", f"{r['speedup_vs_eager_fp32']:.2f}x"] for r in rows]
    r0 = rows[0]
    note = (f"Batch {r0['batch_size']} (2 x 224 + 6 x 96 pixel views per sample), {r0['steps']} timed steps each, "
            f"round-robin, {r0['threads']} torch threads. Command: `{r0['command']}`.")
    header = ["provider", "settings", "s/step", "samples/s", "vs eager fp32"]
    return "\n\n".join([_table(header, out), note, _provenance(path, r0)])


def render_xray(rows: list[dict], path: Path) -> str:
    pre = next(r for r in rows if r["kind"] == "pretrain")
    summary = next(r for r in rows if r["kind"] == "summary")
    runs = [r for r in rows if r["kind"] == "finetune"]
    out = []
    for s in summary["by_fraction"].values():
        mode, fraction = s.get("mode", "full"), s.get("label_fraction")
        labelled = next(r["labelled_images"] for r in runs if r["label_fraction"] == fraction)
        d = s["paired"]
        out.append([mode, f"{fraction:.0%} ({labelled} images)",
                    f"{s['random']['mean']:.3f} ± {s['random']['std']:.3f}",
                    f"{s['pcrlv2']['mean']:.3f} ± {s['pcrlv2']['std']:.3f}", f"{d['mean']:+.3f} ± {d['std']:.3f}",
                    f"{d['wins']}/{d['n']}"])
    r0 = runs[0]
    lrs = " / ".join(sorted({"{:g} ({})".format(r.get("lr", 1e-4), r.get("mode", "full")) for r in runs}))
    note = (f"Test ROC AUC of {'/'.join(summary['findings'])} vs no finding on {r0['test_images']} test images "
            f"(patients split 60/20/20, seed 0), mean ± standard deviation over {d['n']} seeds, the epoch of the "
            f"best validation AUC. PCRLv2: {pre['steps']} steps, batch {pre['batch_size']}, SGD lr {pre['lr']:g}, "
            f"bf16, on the {pre['images']} training-patient images (no labels), loss {pre['first_loss']:.3f} -> "
            f"{pre['last_loss']:.3f}. Fine-tuning: {r0['epochs']} x {r0['iters_per_epoch']} steps, batch "
            f"{r0['batch_size']}, {r0['image_size']}-pixel input, Adam, lr {lrs}. Command: `{summary['command']}`.")
    header = ["fine-tuning", "labels", "random init", "PCRLv2 init", "PCRLv2 - random (paired)", "seeds better"]
    return "\n\n".join([_table(header, out), note, _provenance(path, pre)])


RENDERERS = {"train_step": render_train_step, "profile": render_profile, "end_to_end": render_end_to_end,
             "data": render_data, "micro": render_micro,
             "crop_resize": render_crop_resize, "scaling": render_scaling, "compile": render_compile,
             "predictions": render_predictions, "transfer": render_transfer, "data2d": render_data2d,
             "train_step2d": render_train_step2d, "xray": render_xray}


def render(series: str, path: Path) -> str:
    name = series.split("-")[0]
    if name not in RENDERERS:
        raise KeyError(f"no README table for result series {series!r} ({path.name})")
    return RENDERERS[name](json.loads(path.read_text()), path)


def blocks(text: str) -> list[tuple[str, str]]:
    """(series, body) of every results block in the README text."""
    return [(m["series"], m["body"]) for m in _BLOCK.finditer(text)]


def updated(text: str, files: dict[str, Path]) -> str:
    def fill(m: re.Match) -> str:
        series = m["series"]
        if series not in files:
            raise KeyError(f"README block {series!r} has no result file in {RESULTS}")
        return m.group(1) + render(series, files[series]) + "\n" + m.group(4)

    return _BLOCK.sub(fill, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the README's results blocks")
    mode.add_argument("--check", action="store_true", help="exit 1 when a block differs from its newest results")
    args = p.parse_args(argv)
    text = README.read_text()
    new = updated(text, newest_files())
    if args.write:
        README.write_text(new)
        print(f"{README}: {len(blocks(new))} results blocks written")
    elif args.check:
        stale = [s for (s, body), (_, fresh) in zip(blocks(text), blocks(new)) if body != fresh]
        if stale:
            print(f"README results blocks out of date: {', '.join(stale)} (run python benchmarks/report.py --write)")
            return 1
        print("README results blocks match the newest results")
    else:
        for series, body in blocks(new):
            print(f"## {series}\n{body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
