"""Run folders: one writer at a time, and a killed writer never leaves the folder locked."""
import os
import signal

import pytest

from lorakd.errors import UserError
from lorakd.runs import run_lock


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError) as exc:
            with run_lock(run):
                pass
        assert str(exc.value) == (f"{run}: another lorakd process is writing to this run folder (pid {os.getpid()}); "
                                  "wait for it or use another --out")
        (run / "run.json").write_text("{}")
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]  # the lock file goes with the writer
    with run_lock(run):  # and the folder is free again
        pass


def test_a_folder_made_for_nothing_is_removed(tmp_path):
    """A run refused before it writes (a bad option, say) leaves no empty folder behind."""
    with pytest.raises(ValueError):
        with run_lock(tmp_path / "a" / "run"):
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_a_killed_holder_leaves_the_folder_free(tmp_path, lock_holder):
    run = tmp_path / "run"
    proc = lock_holder(run)
    with pytest.raises(UserError, match=f"pid {proc.pid}"):
        with run_lock(run):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / ".lock").exists()  # a SIGKILL runs no clean-up: the file stays, the kernel dropped the lock
    with run_lock(run):
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"


def test_only_rank_0_of_a_torchrun_job_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with run_lock(tmp_path / "run"):
        assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    with run_lock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").exists()


def test_a_folder_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        with run_lock(tmp_path / "file" / "run"):
            pass
