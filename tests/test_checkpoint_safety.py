"""Checkpoints never run code: weights-only loading with an allow-list, the explicit opt-in, safetensors."""

import argparse
import fractions
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcrlv2_fast import CheckpointError, NonSkipUNet3D, load_pretrained, save_checkpoint
from pcrlv2_fast.checkpoint import (
    UntrustedCheckpointError,
    UntrustedCheckpointWarning,
    read_checkpoint,
    read_training_checkpoint,
)
from pcrlv2_fast.encoders import PCRLv2Encoder3D, encoder_state_dict, export_encoder
from pcrlv2_fast.finetune.evaluate import load_finetuned
from pcrlv2_fast.finetune.model import build_model
from pcrlv2_fast.utils.safetensors import SafetensorsError, read_safetensors, write_safetensors
from tests import requirements

ROOT = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this runs a shell command that leaves a marker file: the side effect the tests look for."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(tmp_path, weights=None) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": weights if weights is not None else {}, "x": Evil(marker)}, path)
    return path, marker


def pretrained_state(width=2) -> dict:
    torch.manual_seed(0)
    return NonSkipUNet3D(width=width).state_dict()


LOADERS = {
    "read_checkpoint": read_checkpoint,
    "load_pretrained": load_pretrained,
    "resume": read_training_checkpoint,
    "encoder": encoder_state_dict,
    "finetune --init": lambda p: build_model("seg", "full", 2, 1, init=str(p)),
    "evaluate": load_finetuned,
}


@pytest.mark.parametrize("loader", LOADERS)
def test_malicious_pickle_is_refused_without_running(tmp_path, loader):
    path, marker = evil_checkpoint(tmp_path, pretrained_state())
    with pytest.raises(UntrustedCheckpointError) as err:
        LOADERS[loader](path)
    assert not marker.exists(), "the pickle's command ran"
    msg = str(err.value)
    assert str(path) in msg and "system" in msg and "--trust-checkpoint" in msg and "trusted=True" in msg


def test_malicious_pickle_refused_by_the_cli(tmp_path):
    path, marker = evil_checkpoint(tmp_path)
    out = tmp_path / "e.pt"
    result = subprocess.run([sys.executable, "-m", "pcrlv2_fast", "export-encoder", str(path), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr
    assert not marker.exists() and not out.exists()
    assert str(path) in result.stderr and "posix.system" in result.stderr and "--trust-checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_legacy_format_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": {}, "x": Evil(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedCheckpointError, match="system"):
        read_checkpoint(path)
    assert not marker.exists()


def test_official_layout_with_namespace_and_numpy_loads(tmp_path):
    path = tmp_path / "official.pt"
    args = argparse.Namespace(lr=1e-3, b=16, epochs=240, gpus="0,1", workers=np.int64(8))
    torch.save({"opt": args, "state_dict": pretrained_state(), "optimizer": {"state": {}, "param_groups": []},
                "epoch": 240, "best": np.float64(0.5), "hist": np.arange(4.0)}, path)
    ckpt = read_checkpoint(path)
    assert ckpt["opt"].lr == 1e-3 and ckpt["opt"].workers == 8 and float(ckpt["best"]) == 0.5
    assert np.array_equal(ckpt["hist"], np.arange(4.0))
    assert load_pretrained(path).width == 2


def test_other_globals_refused_then_trusted_with_a_warning(tmp_path):
    path = tmp_path / "counter.pt"
    torch.save({"state_dict": pretrained_state(), "counts": fractions.Fraction(1, 3)}, path)
    with pytest.raises(UntrustedCheckpointError, match="fractions.Fraction"):
        load_pretrained(path)
    with pytest.warns(UntrustedCheckpointWarning, match="full unpickling"):
        model = load_pretrained(path, trusted=True)
    assert model.width == 2


def test_cli_opt_in_loads_and_warns(tmp_path):
    path = tmp_path / "counter.pt"
    torch.save({"state_dict": pretrained_state(), "counts": fractions.Fraction(1, 3)}, path)
    out = tmp_path / "enc.pt"
    cmd = [sys.executable, "-m", "pcrlv2_fast", "export-encoder", str(path), "--out", str(out)]
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert refused.returncode == 2 and "fractions.Fraction" in refused.stderr and not out.exists()
    trusted = subprocess.run(cmd + ["--trust-checkpoint"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert trusted.returncode == 0, trusted.stderr
    assert "full unpickling" in trusted.stderr and out.is_file()


def test_project_checkpoints_need_nothing_beyond_weights_only(tmp_path):
    """Every file this project writes loads with torch's default weights-only unpickler, no allow-list."""
    model = NonSkipUNet3D(width=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ours = save_checkpoint(tmp_path / "ckpt.pt", model, opt, epoch=1, step=3, config={"out": tmp_path},
                           versions={"torch": torch.__version__}, loss=np.float32(0.5), flag=np.bool_(True))
    ckpt = torch.load(ours, weights_only=True)
    assert ckpt["config"]["out"] == str(tmp_path) and type(ckpt["versions"]["torch"]) is str
    assert type(ckpt["loss"]) is float and ckpt["flag"] is True
    exported = export_encoder(ours, tmp_path / "enc.pt")
    assert set(torch.load(exported, weights_only=True)) == set(encoder_state_dict(ours))


# ------------------------------------------------------------------------------------------ safetensors
def test_export_safetensors_loads_everywhere(tmp_path):
    st = requirements.importorskip("safetensors.torch", "safetensors")
    model = NonSkipUNet3D(width=2)
    ours = save_checkpoint(tmp_path / "ckpt.pt", model, epoch=1)
    out = export_encoder(ours, tmp_path / "enc.safetensors")
    reference = st.load_file(str(out))
    mine, metadata = read_safetensors(out)
    expected = encoder_state_dict(ours)
    assert set(reference) == set(mine) == set(expected)
    assert all(torch.equal(reference[k], expected[k]) and torch.equal(mine[k], expected[k]) for k in expected)
    assert metadata["width"] == "2" and metadata["format"] == "pcrlv2_fast-encoder"
    encoder = PCRLv2Encoder3D.from_checkpoint(out)
    assert all(torch.equal(v, expected[k]) for k, v in encoder.state_dict().items())
    unet, _ = build_model("seg", "full", 2, 1, init=str(out))
    assert torch.equal(unet.encoder.state_dict()[next(iter(expected))], expected[next(iter(expected))])


def test_reference_written_safetensors_load_as_pretrained(tmp_path):
    st = requirements.importorskip("safetensors.torch", "safetensors")
    state = pretrained_state()
    path = tmp_path / "full.safetensors"
    st.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = load_pretrained(path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_safetensors_round_trip_of_every_dtype(tmp_path):
    st = requirements.importorskip("safetensors.torch", "safetensors")
    tensors = {
        "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(2).double(), "i64": torch.arange(7), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([250, 1], dtype=torch.uint8), "b": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3), "strided": torch.arange(12.0).reshape(3, 4).t(),
    }
    path = write_safetensors(tmp_path / "all.safetensors", tensors, {"note": "x"})
    for loaded in (read_safetensors(path)[0], st.load_file(str(path))):
        assert set(loaded) == set(tensors)
        for k, v in tensors.items():
            assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    back = tmp_path / "back.safetensors"
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(back))
    assert all(torch.equal(read_safetensors(back)[0][k], v) for k, v in tensors.items())


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize("header, data, length, match", [
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 4, None, "truncated"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 12, None, "trailing"),
    (b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8, None, "needs 12 bytes"),
    (b'{"a":{"dtype":"X9","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8, None, "unsupported dtype"),
    (b'{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', b"\0" * 8, None, "non-negative"),
    (b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}',
     b"\0" * 6, None, "overlap"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}', b"", None, "not valid JSON"),
    (b'[1,2]', b"", None, "not an object"),
    (b'{"a":{}}', b"", 1 << 60, "header claims"),
    (b'{"__metadata__":{"k":3}}', b"", None, "strings to strings"),
])
def test_damaged_safetensors_give_one_clear_error(tmp_path, header, data, length, match):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(SafetensorsError, match=match) as err:
        read_safetensors(path)
    assert str(path) in str(err.value)
    if length is None:  # a header that does not start like safetensors is sniffed as a pickle instead
        with pytest.raises(CheckpointError, match=str(path)):
            read_checkpoint(path)
