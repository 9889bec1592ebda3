"""The preprocessing cache and the checkpoint loaders under hostile files: malformed index.json entries, volume
files truncated or replaced after caching, checkpoints truncated, bit-flipped or holding the wrong types and
shapes, and random safetensors headers."""

from __future__ import annotations

import io
import json
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from pcrlv2_fast.checkpoint import CheckpointError, load_pretrained, read_checkpoint
from pcrlv2_fast.data import ScanError, open_cache, preprocess
from pcrlv2_fast.encoders import PCRLv2Encoder3D
from pcrlv2_fast.models import NonSkipUNet3D
from pcrlv2_fast.utils.safetensors import SafetensorsError, read_safetensors

from ..conftest import ct_phantom
from .isolated import run_isolated

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ENTRY_FIELDS = ["name", "file", "source", "spacing", "shape", "dtype", "modality", "window", "origin", "direction",
                "settings", "source_sha256"]


class Quiet(tuple):
    """A fixture value that hypothesis reports by name instead of printing a megabyte of bytes."""

    def __repr__(self) -> str:
        return "<fixture>"


@pytest.fixture(scope="module")
def cache_files(tmp_path_factory):
    """A real one-scan cache: its index text and its volume file's bytes, restored before each example."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("fuzz_cache")
    sitk.WriteImage(ct_phantom((48, 48, 36), spacing=(1.5, 1.5, 1.0)), str(folder / "a.nii.gz"))
    preprocess(folder / "a.nii.gz", folder / "cache", progress=False)
    volume = next((folder / "cache" / "volumes").iterdir())
    return Quiet(((folder / "cache" / "index.json").read_text(), volume.name, volume.read_bytes()))


def _open(root: Path) -> None:
    volumes = open_cache(root)
    index = json.loads((root / "index.json").read_text())
    assert [list(v.array.shape) for v in volumes] == [e["shape"] for e in index["scans"]]


def check(fn, path: Path, expected: type[Exception], label: str) -> None:
    """``fn()`` either works or raises ``expected`` naming ``path``; anything else (another exception, a crash, a
    hang, an allocation past the bound) fails the example."""
    outcome = run_isolated(fn)
    if outcome.raised(expected):
        assert str(path) in outcome.message, outcome.message
        reason = re.sub(r"\(.*?\)|'.*?'|\".*?\"", "", outcome.message.split(str(path), 1)[1])  # drop quoted values
        event(f"{label}: " + " ".join(reason.split()[:8]))
    elif outcome.kind == "ok":
        event(f"{label}: ok")
    else:
        pytest.fail(f"{path}: {outcome.describe()}")


def check_cache(root: Path) -> None:
    check(lambda: _open(root), root, ScanError, "cache")


@given(field=st.sampled_from(ENTRY_FIELDS), value=json_values, drop=st.booleans())
def test_index_entries(cache_files, field, value, drop):
    index_text, volume_name, volume = cache_files
    index = json.loads(index_text)
    if drop:
        index["scans"][0].pop(field, None)
    else:
        index["scans"][0][field] = value
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "volumes").mkdir()
        (root / "volumes" / volume_name).write_bytes(volume)
        (root / "index.json").write_text(json.dumps(index))
        check_cache(root)


@given(top=json_values)
def test_whole_index(cache_files, top):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "index.json").write_text(json.dumps(top))
        check_cache(Path(folder))


@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=4),
       replacement=st.sampled_from(["cut", "flip", "other_array"]), shape=st.lists(st.integers(0, 50), max_size=4),
       dtype=st.sampled_from(["int16", "float16", "float32", "uint8", "complex64", ">i2"]))
def test_volume_files_changed_after_caching(cache_files, cut, flips, replacement, shape, dtype):
    index_text, volume_name, volume = cache_files
    if replacement == "cut":
        data = volume[:cut]
    elif replacement == "flip":
        data = bytearray(volume)
        for at, mask in flips:
            data[at] ^= mask  # the .npy header lives in the first 128 bytes
        data = bytes(data)
    else:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape, dtype=dtype))
        data = buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "volumes").mkdir()
        (root / "volumes" / volume_name).write_bytes(data)
        (root / "index.json").write_text(index_text)
        check_cache(root)


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint_bytes():
    torch.manual_seed(0)
    model = NonSkipUNet3D(width=2)
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "optimizer": None, "epoch": 1}, buffer)
    return Quiet((buffer.getvalue(), model.state_dict()))


LOADERS = {"load_pretrained": load_pretrained, "encoder": PCRLv2Encoder3D.from_checkpoint}


def check_checkpoint(path: Path, loader: str) -> None:
    check(lambda: type(LOADERS[loader](path)).__name__, path, CheckpointError, loader)


@given(cut=st.integers(0, 100_000), flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), max_size=6),
       mode=st.sampled_from(["cut", "flip"]), loader=st.sampled_from(sorted(LOADERS)))
def test_damaged_checkpoint_files(checkpoint_bytes, cut, flips, mode, loader):
    data = bytearray(checkpoint_bytes[0])
    if mode == "cut":
        data = data[:cut]
    else:
        for at, mask in flips:
            data[at % len(data)] ^= mask
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ckpt.pt"
        path.write_bytes(bytes(data))
        check_checkpoint(path, loader)


tensor_shapes = st.lists(st.integers(0, 6), max_size=6)
odd_values = st.one_of(
    json_values,
    tensor_shapes.map(lambda shape: torch.zeros(shape)),
    st.sampled_from([torch.zeros(3, dtype=torch.complex64), torch.zeros(2, dtype=torch.bool), torch.tensor(1),
                     torch.zeros(2, dtype=torch.int8), torch.zeros(4096, 1, 3, 3, 3)]),
)


@given(changes=st.dictionaries(st.sampled_from(["down_tr64.ops.0.conv1.weight", "out_tr.final_conv.weight",
                                                "down_tr64.ops.0.bn1.running_mean", "up_tr64.ops.0.conv1.weight",
                                                "extra", "state_dict"]), odd_values, min_size=1, max_size=3),
       wrap=st.sampled_from(["state_dict", "model", "bare", "list"]), loader=st.sampled_from(sorted(LOADERS)))
def test_checkpoints_of_wrong_types_and_shapes(checkpoint_bytes, changes, wrap, loader):
    state = dict(checkpoint_bytes[1])
    state.update(changes)
    obj = {"bare": state, "list": list(state.items())}.get(wrap, {wrap: state})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ckpt.pt"
        torch.save(obj, path)
        check_checkpoint(path, loader)


@given(header=json_values, length_delta=st.integers(-20, 20), data=st.binary(max_size=256))
def test_safetensors_headers(header, length_delta, data):
    text = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.safetensors"
        path.write_bytes(struct.pack("<Q", max(0, len(text) + length_delta)) + text + data)
        check(lambda: sorted(read_safetensors(path)[0]), path, SafetensorsError, "safetensors")
        check(lambda: sorted(read_checkpoint(path)), path, CheckpointError, "checkpoint")
