"""Atomic file writes: a kill at any moment leaves the old file or the new one, never a partial one.

A file gets the permissions of any file the user writes: the temporary file is created with mode 0666 and
the kernel takes the umask (and a default ACL) off it, where tempfile.mkstemp would make it 0600 and hide
results from the group. Reading the umask instead would mean setting it, and it is shared by all threads.
A write that fails (a full disk, a read-only folder) is one UserError naming the file and the cause; the
old file stays as it was and no temporary file is left behind."""
import contextlib
import json
import os
from pathlib import Path

from .errors import UserError


def file_mode() -> int:
    """0666 less the umask: the mode a new file of this user gets. Read from /proc (Linux), which leaves
    the umask alone; elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _cannot_write(path, e: OSError) -> UserError:
    return UserError(f"{path}: cannot write ({e.strerror or e})")


def _open_temp(path: Path):
    """(name, fd) of a new file beside path; O_EXCL: never an existing file, nor a link planted there."""
    while True:
        tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _replace_with(path, write):
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _open_temp(path)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise


def write_stream(path, write):
    """write(f) fills a binary file written atomically: for output made piece by piece (predictions)."""
    _replace_with(path, write)


def write_bytes(path, data: bytes):
    _replace_with(path, lambda f: f.write(data))


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class _KeepError:
    """A file for torch.save that remembers an OSError from write: torch's writer turns it into a
    RuntimeError that no longer says the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def torch_save(path, obj):
    import torch

    def write(f):
        out = _KeepError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise

    _replace_with(path, write)


def append_line(path, line: str):
    """Append one line; a torn last line (kill mid-write) is dropped by the readers."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
    except OSError as e:
        raise _cannot_write(path, e) from None
