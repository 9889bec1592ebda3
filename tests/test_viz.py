"""Restoration and loss-curve pictures: valid PNGs with the expected panels, and clear errors on bad input."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from pcrlv2_fast import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPE = (16, 12, 8)  # x, y, z with z the short axis, like the 64x64x32 crops


def _volume(seed, shape=SHAPE):
    """A smooth blob plus noise in [0, 1], so every slice has structure."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = np.exp(-sum(g**2 for g in grids) * 2)
    return np.clip(blob + 0.1 * rng.standard_normal(shape), 0, 1).astype(np.float32)


def _sample(shape=SHAPE):
    gt = _volume(0, shape)
    x1 = (gt - gt.mean()) / gt.std() * 3  # z-normalised input, well outside [0, 1]
    return {
        "x1": torch.from_numpy(x1)[None],
        "gt": torch.from_numpy(gt)[None],
        "restoration": torch.from_numpy(_volume(1, shape))[None],
        "masks": [torch.from_numpy(_volume(s, shape))[None] for s in (2, 3, 4)],
    }


def _read_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


def _images(fig):
    """Panel images row by row (axial, coronal, sagittal), six columns each."""
    return [ax.get_images()[0] for ax in fig.axes]


def test_restoration_png_is_written(tmp_path):
    path = viz.save_restoration_png(tmp_path / "out" / "restoration.png", **_sample(), title="step 100")
    assert path == tmp_path / "out" / "restoration.png"
    pixels = _read_png(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 600
    # Each sixth of the picture (one column of panels) shows content, not one flat colour.
    for column in np.array_split(pixels[..., :3], 6, axis=1):
        assert column.std() > 0.05
    assert [p.name for p in path.parent.iterdir()] == ["restoration.png"]  # no temporary file left


def test_restoration_figure_panels():
    sample = _sample()
    fig = viz.restoration_figure(**sample)
    assert len(fig.axes) == 18
    titles = [ax.get_title() for ax in fig.axes[:6]]
    assert titles == ["input", "target", "restoration", "deep sup. 1/4", "deep sup. 1/2", "deep sup. 1/1"]
    assert [ax.get_ylabel() for ax in fig.axes[::6]] == ["axial z=4", "coronal y=6", "sagittal x=8"]

    images = _images(fig)
    x, y, z = SHAPE
    gt = sample["gt"][0].numpy()
    # Axial slice of the target: the middle z, x across and y down.
    np.testing.assert_array_equal(images[1].get_array(), gt[:, :, z // 2].T)
    np.testing.assert_array_equal(images[7].get_array(), gt[:, y // 2, :].T)
    np.testing.assert_array_equal(images[13].get_array(), gt[x // 2, :, :].T)
    np.testing.assert_array_equal(images[5].get_array(), sample["masks"][2][0].numpy()[:, :, z // 2].T)
    # The input keeps its own range; everything else shares 0..1.
    input_lo, input_hi = images[0].get_clim()
    assert input_lo < -1 and input_hi > 1
    for col in range(1, 6):
        assert images[col].get_clim() == (0.0, 1.0)
        assert images[col].get_cmap().name == "gray"


def test_restoration_accepts_numpy_without_channel_axis(tmp_path):
    sample = {k: v[0].numpy() if k != "masks" else [m[0].numpy() for m in v] for k, v in _sample().items()}
    _read_png(viz.save_restoration_png(tmp_path / "r.png", **sample))


def test_restoration_leaves_pyplot_alone(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    viz.save_restoration_png(tmp_path / "r.png", **_sample())
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("x1", torch.zeros(2, 1, *SHAPE), r"x1 must be one sample .*\(2, 1, 16, 12, 8\)"),
        ("gt", torch.zeros(2, *SHAPE), r"gt must be one sample"),
        ("restoration", torch.zeros(16, 12), r"restoration must be one sample"),
        ("gt", torch.zeros(1, 16, 12, 6), r"x1 has shape \(16, 12, 8\) but gt has \(16, 12, 6\)"),
    ],
)
def test_restoration_rejects_bad_shapes(tmp_path, field, value, match):
    sample = _sample()
    sample[field] = value
    with pytest.raises(ValueError, match=match):
        viz.save_restoration_png(tmp_path / "r.png", **sample)
    assert not (tmp_path / "r.png").exists()


def test_restoration_needs_three_masks(tmp_path):
    sample = _sample()
    sample["masks"] = sample["masks"][:2]
    with pytest.raises(ValueError, match="3 deep-supervision outputs"):
        viz.save_restoration_png(tmp_path / "r.png", **sample)
    sample["masks"] = [torch.zeros(1, 16, 12, 7)] * 3
    with pytest.raises(ValueError, match=r"masks\[0\] has shape"):
        viz.save_restoration_png(tmp_path / "r.png", **sample)


def _metrics_rows(n=40):
    rows = []
    for step in range(0, n * 10, 10):
        decay = np.exp(-step / 150)
        rows.append(
            {
                "step": step,
                "epoch": step // 100,
                "loss_global": -0.9 + 0.5 * decay,
                "loss_local": -0.8 + 0.4 * decay,
                "loss_restore": 0.05 + 0.4 * decay,
                "loss_deep": 0.06 + 0.5 * decay,
                "lr": 1e-3 * min(1.0, step / 50),
                "time_s": 0.1,
            }
        )
        rows[-1]["loss"] = sum(rows[-1][k] for k in ("loss_global", "loss_local", "loss_restore", "loss_deep"))
    return rows


def _write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def test_loss_curve_png_is_written(tmp_path):
    metrics = _write_jsonl(tmp_path / "metrics.jsonl", _metrics_rows())
    path = viz.save_loss_curve_png(metrics, tmp_path / "loss.png", title="demo")
    pixels = _read_png(path)
    top, bottom = np.array_split(pixels[..., :3], [int(pixels.shape[0] * 0.7)], axis=0)
    assert top.std() > 0.05 and bottom.std() > 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_loss_curve_figure_content(tmp_path):
    rows = _metrics_rows()
    extra = ["\n", json.dumps({"step": 5, "val_dice": 0.4}) + "\n", json.dumps(["not", "a", "row"]) + "\n"]
    metrics = _write_jsonl(tmp_path / "metrics.jsonl", rows, extra)
    fig = viz.loss_curve_figure(metrics)
    loss_ax, lr_ax = fig.axes
    curves = {line.get_label(): line for line in loss_ax.get_lines() if not line.get_label().startswith("_")}
    assert sorted(curves) == ["loss", "loss_deep", "loss_global", "loss_local", "loss_restore"]
    assert loss_ax.get_yscale() == "linear"
    np.testing.assert_allclose(curves["loss_global"].get_xdata(), [r["step"] for r in rows])
    np.testing.assert_allclose(curves["loss_global"].get_ydata(), [r["loss_global"] for r in rows])
    assert max(curves["loss_global"].get_ydata()) < 0
    (lr_line,) = lr_ax.get_lines()
    np.testing.assert_allclose(lr_line.get_ydata(), [r["lr"] for r in rows])
    assert lr_ax.get_ylabel() == "lr" and lr_ax.get_xlabel() == "step"


def test_loss_curve_without_lr_has_one_panel(tmp_path):
    rows = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)]
    fig = viz.loss_curve_figure(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert len(fig.axes) == 1


def test_loss_curve_plots_probe_rows_in_their_own_panel(tmp_path):
    probes = [{"step": s, "epoch": 0, "probe_dice": d} for s, d in ((0, 0.4), (200, 0.5), (390, 0.55))]
    fig = viz.loss_curve_figure(_write_jsonl(tmp_path / "m.jsonl", _metrics_rows() + probes))
    loss_ax, lr_ax, probe_ax = fig.axes
    (line,) = probe_ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), [0, 200, 390])
    np.testing.assert_allclose(line.get_ydata(), [0.4, 0.5, 0.55])
    assert probe_ax.get_ylabel() == "probe Dice" and len(loss_ax.get_lines()) == 6  # 5 curves + the zero line


def test_loss_curve_resumed_run_keeps_latest_rows(tmp_path):
    first = [{"step": s, "loss": 1.0} for s in range(0, 6)]
    resumed = [{"step": s, "loss": 2.0} for s in range(3, 8)]
    fig = viz.loss_curve_figure(_write_jsonl(tmp_path / "m.jsonl", first + resumed))
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "loss"]
    assert list(line.get_xdata()) == list(range(8))
    assert list(line.get_ydata()) == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_loss_curve_tolerates_partial_last_line(tmp_path):
    metrics = _write_jsonl(tmp_path / "m.jsonl", _metrics_rows(5), ['{"step": 50, "lo'])
    with pytest.warns(UserWarning, match="incomplete last line"):
        fig = viz.loss_curve_figure(metrics)
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 5


def test_loss_curve_rejects_corrupt_middle_line(tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 0, "loss": 1}\n{broken\n{"step": 1, "loss": 1}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        viz.loss_curve_figure(metrics)


def test_loss_curve_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        viz.save_loss_curve_png(tmp_path / "nope.jsonl", tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


NO_USABLE_ROWS = '{"epoch": 1}\n{"step": 3}\n{"loss": 1.0}\n{"step": 4, "loss": "nan?"}\n{"step": true, "loss": 1}\n'


@pytest.mark.parametrize("content", ["", "\n\n", NO_USABLE_ROWS])
def test_loss_curve_without_rows(tmp_path, content):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(content)
    with pytest.raises(ValueError, match="no rows with numeric 'step' and 'loss'"):
        viz.save_loss_curve_png(metrics, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
