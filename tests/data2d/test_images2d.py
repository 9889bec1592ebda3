"""Reading 2D images: 8-bit and 16-bit PNG, JPEG, RGB, DICOM, NIH CSVs, and one clear error per bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from pcrlv2_fast.data.images2d import (
    ImageBank,
    ImageError,
    find_images,
    is_image_source,
    load_images,
    read_csv_rows,
    read_image,
)
from tests.data2d.conftest import xray_like


def test_eight_bit_png_keeps_its_values(tmp_path):
    image = xray_like(64, 80, 0)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and np.array_equal(out, image)


def test_rgb_png_and_jpeg_become_grayscale(tmp_path):
    image = xray_like(64, 64, 1)
    Image.fromarray(np.stack([image] * 3, axis=-1)).save(tmp_path / "rgb.png")
    assert np.array_equal(read_image(tmp_path / "rgb.png"), image)  # equal channels: luminance is the image
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    jpeg = read_image(tmp_path / "a.jpg")
    assert jpeg.shape == (64, 64) and np.abs(jpeg.astype(int) - image).mean() < 6


def test_sixteen_bit_png_is_min_max_scaled(tmp_path):
    values = (np.arange(64 * 64).reshape(64, 64) % 4000 + 100).astype(np.uint16)  # a 12-bit detector
    Image.fromarray(values).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (values - 100.0) / 3999.0, atol=1e-6)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_2d(tmp_path, photometric):
    values = (np.arange(48 * 40).reshape(48, 40) % 1000).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "a.dcm"))
    data = (tmp_path / "a.dcm").read_bytes()  # the writer always says MONOCHROME2: patch the tag's value
    assert data.count(b"MONOCHROME2 ") == 1
    (tmp_path / "a.dcm").write_bytes(data.replace(b"MONOCHROME2 ", photometric.encode() + b" "))
    out = read_image(tmp_path / "a.dcm")
    expected = values / 999.0
    np.testing.assert_allclose(out, 1 - expected if photometric == "MONOCHROME1" else expected, atol=1e-6)


def test_bad_files_name_the_file(tmp_path):
    Image.fromarray(xray_like(64, 64, 2)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((16, 64), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.full((64, 64), 7, np.uint16)).save(tmp_path / "flat16.png")
    for name, words in [("cut.png", "cannot decode"), ("text.png", "cannot decode"), ("small.png", "at least 32"),
                        ("flat16.png", "constant")]:
        with pytest.raises(ImageError, match=words) as info:
            read_image(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(ImageError, match="cut.png"):  # a folder: the first bad file ends the load
        load_images(tmp_path, progress=False)
    (tmp_path / "vol.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(ImageError, match="vol.dcm"):
        read_image(tmp_path / "vol.dcm")


def test_folders_and_csvs(tmp_path, xray_dir):
    files = find_images(xray_dir)
    assert [p.name for p in files] == ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png", "img5.png"]
    assert is_image_source(xray_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not is_image_source(empty)
    with pytest.raises(ImageError, match="no PNG, JPEG or DICOM"):
        find_images(empty)
    csv = xray_dir / "Data_Entry.csv"
    csv.write_text("Image Index,Finding Labels,Patient ID\nimg3.png,No Finding,7\nimg4.png,Pneumonia,8\n")
    assert is_image_source(csv)
    assert [p.name for p in find_images(csv)] == ["img3.png", "img4.png"]  # row order, found in subfolders
    assert read_csv_rows(csv)[1]["Finding Labels"] == "Pneumonia"
    missing = xray_dir / "missing.csv"
    missing.write_text("Image Index\nimg3.png\nnot_here.png\n")
    with pytest.raises(ImageError, match="1 of its 2 images"):
        find_images(missing)
    missing.unlink()
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("file,label\na.png,1\n")
    with pytest.raises(ImageError, match="no column 'Image Index'"):
        read_csv_rows(wrong)
    csv.unlink()


def test_bank_pads_and_keeps_sizes(xray_dir):
    bank = load_images(xray_dir, progress=False)
    assert bank.pixels.shape == (6, 128, 128) and bank.pixels.dtype == np.uint8
    assert bank.sizes.tolist()[:2] == [[128, 112], [96, 128]]
    np.testing.assert_allclose(bank.image(1), xray_like(96, 128, 1) / 255.0, atol=1e-7)
    mixed = ImageBank.from_arrays([np.full((40, 40), 255, np.uint8), np.full((32, 48), 0.5, np.float32)], ["a", "b"])
    assert mixed.pixels.dtype == np.float16 and mixed.image(0).max() == 1.0 and mixed.image(1).shape == (32, 48)


def test_a_bank_larger_than_the_free_memory_is_refused_before_decoding(xray_dir, monkeypatch):
    import pcrlv2_fast.data.images2d as images2d

    decoded = []
    monkeypatch.setattr(images2d, "read_image", lambda p: decoded.append(p))
    monkeypatch.setattr(images2d, "available_memory", lambda: 100_000)  # 6 images of 128 x 128 need 98,304 bytes
    with pytest.raises(ImageError, match=r"6 images need 0\.0 GiB decoded in memory \(up to 128 x 128"):
        load_images(xray_dir, progress=False)
    assert decoded == []
    monkeypatch.setattr(images2d, "available_memory", lambda: 10**9)
    images2d.check_fits_in_memory(find_images(xray_dir), xray_dir)  # fits: no error
