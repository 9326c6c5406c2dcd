"""Atomic writes: the user's usual permissions, and a full disk or read-only folder is one clear error
that leaves the old file whole and no temporary file behind."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakd import atomic
from lorakd.errors import UserError


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_users_usual_permissions(tmp_path, umask, mask, mode):
    umask(mask)
    atomic.write_json(tmp_path / "eval.json", {"a": 1})
    atomic.torch_save(tmp_path / "state.pt", {"w": torch.zeros(3)})
    atomic.append_line(tmp_path / "metrics.jsonl", "{}")
    for name in ("eval.json", "state.pt", "metrics.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert atomic.file_mode() == mode


def test_saved_adapter_files_get_the_users_usual_permissions(tmp_path, umask):
    """save_pretrained writes through a 0700 temporary folder, and safetensors files as 0600."""
    from transformers import BertConfig, BertForSequenceClassification

    from lorakd.model import save_trained

    umask(0o022)
    model = BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=1, intermediate_size=8))
    save_trained(model, tmp_path / "run" / "model", full_finetune=True)
    files = list((tmp_path / "run" / "model").iterdir())
    assert {f.name for f in files} >= {"config.json", "model.safetensors"}
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)
    assert (tmp_path / "run" / "model").stat().st_mode & 0o777 == 0o755
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["model"]  # the temporary folder is gone


def leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    path = tmp_path / "eval.json"
    atomic.write_json(path, {"old": True})
    before = path.read_bytes()

    def fsync(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(UserError) as exc:
        atomic.write_json(path, {"new": True})
    assert str(exc.value) == f"{path}: cannot write ({os.strerror(code)})"
    assert path.read_bytes() == before and not leftovers(tmp_path)


class FullAfter:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_mid_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    """torch.save's writer turns the write error into a RuntimeError: the message still says the disk is full."""
    ckpt = tmp_path / "checkpoint" / "state.pt"
    atomic.torch_save(ckpt, {"step": 7, "w": torch.arange(10.0)})
    before = ckpt.read_bytes()
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullAfter(real(fd, *a, **k), 1000))
    with pytest.raises(UserError, match=r"state.pt: cannot write \(No space left on device\)"):
        atomic.torch_save(ckpt, {"step": 14, "w": torch.zeros(10_000)})
    assert ckpt.read_bytes() == before and not leftovers(ckpt.parent)
    assert torch.load(ckpt, weights_only=True)["step"] == 7


def test_remove_takes_the_temporary_file_a_killed_write_left(tmp_path):
    """A write killed between its temporary file and the rename never runs its clean-up: the temporary file
    stays beside the target. remove() takes the target and that file, and nothing else in the folder."""
    ckpt = tmp_path / "checkpoint" / "state.pt"
    atomic.torch_save(ckpt, {"step": 7})
    killed = ("import os, sys, torch; from lorakd import atomic; os.fsync = lambda fd: os._exit(9); "
              "atomic.torch_save(sys.argv[1], {'step': 14})")
    assert subprocess.run([sys.executable, "-c", killed, str(ckpt)]).returncode == 9
    assert len(leftovers(ckpt.parent)) == 1 and torch.load(ckpt, weights_only=True)["step"] == 7
    keep = [ckpt.parent / "other.pt", ckpt.parent / ".state.pt.notours.tmp"]
    for f in keep:
        f.write_text("x")
    atomic.remove(ckpt)
    assert sorted(ckpt.parent.iterdir()) == sorted(keep)


def test_read_only_folder(tmp_path, monkeypatch):
    """Simulated (the tests run as root, for whom a 0555 folder is writable); the real one below."""
    real = os.open

    def ro(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", ro)
    monkeypatch.setattr(atomic, "open", lambda *a, **k: ro(a[0], os.O_CREAT), raising=False)  # append_line's
    with pytest.raises(UserError, match=r"p.csv: cannot write \(Read-only file system\)"):
        atomic.write_text(tmp_path / "p.csv", "ID,Label\n")
    with pytest.raises(UserError, match=r"m.jsonl: cannot write \(Read-only file system\)"):
        atomic.append_line(tmp_path / "m.jsonl", "{}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 folder")
def test_read_only_folder_for_real(tmp_path):
    (tmp_path / "out").mkdir(mode=0o555)
    with pytest.raises(UserError, match="Permission denied"):
        atomic.write_text(tmp_path / "out" / "p.csv", "x")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, where the machine lets us mount one (root with the capability), else skipped."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_really_full_disk_keeps_the_last_good_checkpoint(small_disk):
    ckpt = small_disk / "checkpoint" / "state.pt"
    atomic.torch_save(ckpt, {"step": 7, "w": torch.zeros(2_000)})  # 8 KB
    before = ckpt.read_bytes()
    with pytest.raises(UserError, match=r"state.pt: cannot write \(No space left on device\)"):
        atomic.torch_save(ckpt, {"step": 14, "w": torch.zeros(20_000)})  # 80 KB
    assert ckpt.read_bytes() == before and not leftovers(ckpt.parent)
    with pytest.raises(UserError, match=r"big.bin: cannot write \(No space left on device\)"):
        atomic.write_bytes(small_disk / "big.bin", bytes(100_000))
    assert not (small_disk / "big.bin").exists() and not leftovers(small_disk)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path, umask):
    """replace_folder: the new folder takes the old one's place whole, with the user's usual permissions; a fill
    that fails, or a refusal, leaves the old folder as it was; a link in its place is refused; nothing is left
    beside it."""
    umask(0o022)
    out = tmp_path / "out"

    def fill(files):
        def write(tmp):
            for name in files:
                (tmp / name).write_text(name)
                os.chmod(tmp / name, 0o600)  # as safetensors writes
        return write

    atomic.replace_folder(out, fill(["a", "b"]))
    atomic.replace_folder(out, fill(["c"]))
    assert sorted(p.name for p in out.iterdir()) == ["c"]  # b of the old folder is gone with it
    assert (out / "c").stat().st_mode & 0o777 == 0o644 and out.stat().st_mode & 0o777 == 0o755

    def broken(tmp):
        (tmp / "d").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=r"out: cannot write \(No space left on device\)"):
        atomic.replace_folder(out, broken)

    def refuse(path):
        raise UserError(f"{path}: not mine")

    with pytest.raises(UserError, match="out: not mine"):
        atomic.replace_folder(out, fill(["e"]), refuse)
    assert sorted(p.name for p in out.iterdir()) == ["c"]
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    with pytest.raises(UserError, match="link: a symbolic link"):
        atomic.replace_folder(link, fill(["f"]))
    assert sorted(p.name for p in out.iterdir()) == ["c"] and link.is_symlink()
    assert not leftovers(tmp_path)
