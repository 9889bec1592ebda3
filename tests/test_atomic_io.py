"""atomic_write: the target is either untouched or complete, and no temporary file outlives the write."""

import hashlib
import os
import pickle

import pytest
import torch

from pcrlv2_fast.utils.io import atomic_torch_save, atomic_write, sha256_file


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_bytes_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_write(target) as fh:
        fh.write(b"hello")
    assert target.read_bytes() == b"hello"
    assert _leftovers(target.parent) == []


def test_text_mode(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_write(target, "w") as fh:
        fh.write("grüße\n")
    assert target.read_text(encoding="utf-8") == "grüße\n"


def test_temp_file_is_hidden_next_to_target_until_done(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_write(target) as fh:
        fh.write(b"partial")
        temps = [p for p in tmp_path.iterdir() if p != target]
        assert len(temps) == 1
        assert temps[0].name.startswith(".out.bin.") and temps[0].name.endswith(".tmp")
        assert not target.exists()
    assert not temps[0].exists()


def test_exception_keeps_old_content_and_removes_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(target) as fh:
            fh.write(b"new but incomplete")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_exception_creates_no_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as fh:
            fh.write(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_rejects_non_write_modes(tmp_path):
    for mode in ("r", "ab", "r+b"):
        with pytest.raises(ValueError, match="write modes"):
            with atomic_write(tmp_path / "x", mode):
                pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="umask is POSIX")
def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "out.bin") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644


def test_atomic_torch_save_round_trip(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    target = tmp_path / "ckpt.pt"
    atomic_torch_save(state, target)
    loaded = torch.load(target)
    assert loaded["step"] == 7 and torch.equal(loaded["w"], state["w"])
    assert _leftovers(tmp_path) == []


def test_atomic_torch_save_failure_keeps_previous_checkpoint(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1}, target)
    # Older Pythons report an unpicklable lambda as AttributeError, newer ones as PicklingError.
    with pytest.raises((pickle.PicklingError, AttributeError)):
        atomic_torch_save({"step": 2, "bad": lambda: None}, target)
    assert torch.load(target) == {"step": 1}
    assert _leftovers(tmp_path) == []


def test_sha256_file(tmp_path):
    data = os.urandom(3 << 20)  # spans several read chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
