"""One writer per folder (pcrlv2_fast.utils.lock)."""

import threading

import pytest

from pcrlv2_fast.utils.lock import FolderBusyError, folder_lock
from tests.helpers import hold_folder_lock


def test_a_held_folder_is_refused_naming_the_holder_then_free_when_it_dies(tmp_path):
    child = hold_folder_lock(tmp_path / "run")
    try:
        with pytest.raises(FolderBusyError, match=f"run: in use by pretrain \\(pid {child.pid}\\).*choose another"):
            with folder_lock(tmp_path / "run", "finetune"):
                pass
    finally:
        child.kill()
        child.wait()
    with folder_lock(tmp_path / "run", "finetune") as path:  # the kernel released the dead holder's lock
        assert path.read_text() == f"finetune (pid {__import__('os').getpid()})\n"


def test_wait_takes_the_lock_once_the_holder_ends(tmp_path):
    child = hold_folder_lock(tmp_path, seconds=1)
    with folder_lock(tmp_path, "preprocess", wait=60):
        assert child.wait(timeout=60) == 0


def test_a_failed_block_removes_the_folder_it_created_only(tmp_path):
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path / "new", "pretrain"):
            raise RuntimeError("refused before writing")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path / "old", "pretrain"):
            raise RuntimeError("x")
    assert (tmp_path / "old").is_dir()


def test_threads_of_one_process_are_excluded_too(tmp_path):
    """flock locks belong to the open file, so a second open in the same process is refused as well."""
    errors = []
    with folder_lock(tmp_path, "pretrain"):
        def second():
            try:
                with folder_lock(tmp_path, "pretrain"):
                    pass
            except FolderBusyError as error:
                errors.append(error)
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
    assert len(errors) == 1


def test_finetune_refuses_a_run_folder_in_use(tmp_path):
    from pcrlv2_fast.finetune.train import FinetuneConfig, finetune

    child = hold_folder_lock(tmp_path / "ft", what="finetune")
    try:
        cfg = FinetuneConfig(task="seg", data=str(tmp_path / "data"), out=str(tmp_path / "ft"), init="random")
        with pytest.raises(FolderBusyError, match=f"in use by finetune \\(pid {child.pid}\\)"):
            finetune(cfg)
    finally:
        child.kill()
        child.wait()
