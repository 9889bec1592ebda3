"""Finding image/label cases in every supported layout, loading them, refusing bad inputs, sampling patches."""

import json

import numpy as np
import pytest

from pcrlv2_fast.data import ScanError
from pcrlv2_fast.finetune.data import (
    PatchSampler,
    Preprocessing,
    finalize_labels,
    find_cases,
    load_case,
    load_cases,
)
from tests.finetune.phantoms import sphere_phantom, write_pairs, write_volume


def _pair(folder, name="a", shape=(20, 18, 12), label=None, label_kwargs=None, suffix=".nii.gz"):
    image, default_label = sphere_phantom(shape, seed=len(name))
    img = write_volume(image, folder / f"{name}_image{suffix}")
    lab = write_volume(default_label if label is None else label, folder / f"{name}_label{suffix}",
                       **(label_kwargs or {}))
    return img, lab


def test_suffix_pairs_found_recursively(tmp_path):
    write_pairs(tmp_path / "x", n=2, shape=(16, 16, 8))
    write_pairs(tmp_path / "y" / "deeper", n=1, shape=(16, 16, 8), seed=5, suffix=".nrrd")
    (tmp_path / "y" / "deeper" / "case000_image.nrrd").rename(tmp_path / "y" / "deeper" / "case009_image.nrrd")
    (tmp_path / "y" / "deeper" / "case000_label.nrrd").rename(tmp_path / "y" / "deeper" / "case009_label.nrrd")
    cases, names = find_cases(tmp_path, "seg")
    assert [c.case_id for c in cases] == ["case000", "case001", "case009"] and names is None
    assert cases[2].images[0].name == "case009_image.nrrd" and cases[2].patient == "case009"


def test_unpaired_file_is_named(tmp_path):
    write_pairs(tmp_path, n=2, shape=(16, 16, 8))
    (tmp_path / "case001_label.nii.gz").unlink()
    with pytest.raises(ScanError, match="case001_image"):
        find_cases(tmp_path, "seg")


def test_decathlon_layout_with_channel_files(tmp_path):
    image, label = sphere_phantom((16, 16, 8))
    for case in ("la_001", "la_002"):
        for ch in range(2):
            write_volume(image + 10 * ch, tmp_path / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        write_volume(label, tmp_path / "labelsTr" / f"{case}.nii.gz")
    cases, _ = find_cases(tmp_path, "seg")
    assert [len(c.images) for c in cases] == [2, 2]
    loaded = load_case(cases[0], Preprocessing())
    assert loaded.image.shape == (2, 16, 16, 8) and loaded.image.dtype == np.float32
    assert abs(float(loaded.image[0].mean())) < 1e-4 and abs(float(loaded.image[0].std()) - 1) < 1e-3


def test_csv_and_json_lists_with_patients(tmp_path):
    img_a, lab_a = _pair(tmp_path / "d", "a")
    img_b, lab_b = _pair(tmp_path / "d", "b")
    (tmp_path / "list.csv").write_text(f"image,label,patient\nd/{img_a.name},d/{lab_a.name},P1\n"
                                       f"{img_b},{lab_b},P1\n")
    cases, _ = find_cases(tmp_path / "list.csv", "seg")
    assert [c.patient for c in cases] == ["P1", "P1"] and cases[0].images[0] == img_a
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [
        {"image": f"./d/{img_a.name}", "label": f"./d/{lab_a.name}"},
        {"image": [str(img_b), str(img_b)], "label": str(lab_b), "id": "bee"}]}))
    cases, _ = find_cases(tmp_path / "dataset.json", "seg")
    assert [c.case_id for c in cases] == ["a_label", "bee"] and len(cases[1].images) == 2
    (tmp_path / "cls.csv").write_text(f"image,label\n{img_a},tumour\n{img_b},normal\n")
    cases, names = find_cases(tmp_path / "cls.csv", "cls")
    assert names == ["normal", "tumour"] and [c.label for c in cases] == [1, 0]


def test_class_folders(tmp_path):
    for cls, n in (("absent", 2), ("present", 3)):
        for i in range(n):
            write_volume(sphere_phantom((16, 16, 8), seed=i)[0], tmp_path / cls / f"s{i}.nii.gz")
    cases, names = find_cases(tmp_path, "cls")
    assert names == ["absent", "present"] and [c.label for c in cases] == [0, 0, 1, 1, 1]


def test_shape_mismatch_names_both_files(tmp_path):
    img, lab = _pair(tmp_path, label=np.zeros((20, 18, 11), np.uint8))
    cases, _ = find_cases(tmp_path, "seg")
    with pytest.raises(ScanError, match="shape") as err:
        load_case(cases[0], Preprocessing())
    assert str(lab) in str(err.value) and str(img) in str(err.value) and "\n" not in str(err.value)


def test_spacing_and_origin_mismatch(tmp_path):
    _, lab = _pair(tmp_path / "s", label_kwargs={"spacing": (1.5, 1.5, 3.0)})
    with pytest.raises(ScanError, match="spacing") as err:
        load_case(find_cases(tmp_path / "s", "seg")[0][0], Preprocessing())
    assert str(lab) in str(err.value)
    _pair(tmp_path / "o", label_kwargs={"origin": (5.0, 0.0, 0.0)})
    with pytest.raises(ScanError, match="origin"):
        load_case(find_cases(tmp_path / "o", "seg")[0][0], Preprocessing())


def test_unexpected_and_sparse_classes(tmp_path):
    label = sphere_phantom((20, 18, 12), seed=1)[1]
    label[0, 0, 0] = 7
    _, lab = _pair(tmp_path, label=label)
    loaded = load_cases(find_cases(tmp_path, "seg")[0], Preprocessing(), progress=False)
    with pytest.raises(ScanError, match=r"unexpected label values \[7\]") as err:
        finalize_labels(loaded, Preprocessing(num_classes=2))
    assert str(lab) in str(err.value)
    with pytest.raises(ScanError, match="--keep-labels"):
        finalize_labels(loaded, Preprocessing())  # values {0, 1, 7}: sparse
    n = finalize_labels(loaded, Preprocessing(keep_labels=(7,)))
    assert n == 2 and loaded[0].label.sum() == 1


def test_empty_label_map(tmp_path):
    _, lab = _pair(tmp_path, label=np.zeros((20, 18, 12), np.uint8))
    loaded = load_cases(find_cases(tmp_path, "seg")[0], Preprocessing(), progress=False)
    with pytest.raises(ScanError, match="no foreground") as err:
        finalize_labels(loaded, Preprocessing(num_classes=2))
    assert str(lab) in str(err.value) and "--allow-empty-labels" in str(err.value)
    assert finalize_labels(loaded, Preprocessing(num_classes=2, allow_empty=True)) == 2


def test_non_integer_labels_refused(tmp_path):
    label = sphere_phantom((20, 18, 12), seed=1)[1].astype(np.float32) * 0.5
    _, lab = _pair(tmp_path, label=label)
    with pytest.raises(ScanError, match="non-integer") as err:
        load_case(find_cases(tmp_path, "seg")[0][0], Preprocessing())
    assert str(lab) in str(err.value)


def test_resampling_keeps_labels_on_the_image_grid(tmp_path):
    _pair(tmp_path, shape=(20, 18, 12))
    loaded = load_case(find_cases(tmp_path, "seg")[0][0], Preprocessing(spacing=(3.0, 3.0, 3.0)))
    # 20 x 1.5 mm, 18 x 1.5 mm, 12 x 2 mm at 3 mm: (10, 9, 8) voxels.
    assert loaded.image.shape == (1, 10, 9, 8) and loaded.label.shape == (10, 9, 8)
    assert set(np.unique(loaded.label)) <= {0, 1} and loaded.label.any()


def test_patch_sampler_foreground_bias_and_padding(tmp_path):
    write_pairs(tmp_path, n=2, shape=(20, 18, 12))
    loaded = load_cases(find_cases(tmp_path, "seg")[0], Preprocessing(), progress=False)
    finalize_labels(loaded, Preprocessing())
    sampler = PatchSampler(loaded, (24, 8, 16), np.random.default_rng(0), fg_prob=1.0)
    x, y = sampler.batch(6)
    assert x.shape == (6, 1, 24, 8, 16) and y.shape == (6, 1, 24, 8, 16) and x.dtype == np.float32
    assert all(y[i].any() for i in range(6))
    a = PatchSampler(loaded, (8, 8, 8), np.random.default_rng(3)).batch(2)
    b = PatchSampler(loaded, (8, 8, 8), np.random.default_rng(3)).batch(2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
