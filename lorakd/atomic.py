"""Atomic file writes: a kill at any moment leaves the old file or the new one, never a partial one.

A file gets the permissions of any file the user writes: the temporary file is created with mode 0666 and
the kernel takes the umask (and a default ACL) off it, where tempfile.mkstemp would make it 0600 and hide
results from the group. Reading the umask instead would mean setting it, and it is shared by all threads.
A write that fails (a full disk, a read-only folder) is one UserError naming the file and the cause; the
old file stays as it was and no temporary file is left behind.

A run folder may come from someone else: every write lands in a real folder (folder() refuses a symbolic link
or anything else in its place) and never follows a link planted at the file's own name (os.replace swaps the
link itself; appends open with O_NOFOLLOW)."""
import contextlib
import errno
import json
import os
import re
import shutil
import stat
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
    if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link
        return UserError(f"{path}: a symbolic link; lorakd does not write through links (remove it)")
    return UserError(f"{path}: cannot write ({e.strerror or e})")


def folder(path) -> Path:
    """path as a real folder lorakd may write into, made (with its parents) when missing. A symbolic link there,
    or anything else that is not a folder, is refused: a shared run folder with `checkpoint -> ~/elsewhere`
    would have lorakd write, and delete, in ~/elsewhere."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file, or a link to no folder, in the way
        pass
    except OSError as e:
        raise _cannot_write(path, e) from None
    st = os.lstat(path)  # FileNotFoundError: removed meanwhile, for the caller to retry or report
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{path}: a symbolic link; lorakd writes only into real folders (give the folder it "
                        f"points to, or remove the link)")
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: exists and is not a folder")
    return path


def _beside(path: Path, make, kind="tmp"):
    """(name, make(name)) for a new hidden name beside path; make must refuse an existing one (O_EXCL, mkdir):
    never an existing file, nor a link planted there."""
    while True:
        tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.{kind}"
        try:
            return tmp, make(tmp)
        except FileExistsError:
            continue


def remove(path):
    """path gone, and with it every temporary file that a write of it killed mid-way (SIGKILL, power loss) left
    beside it: its finally never ran, so only the writer's name for it (_beside's) can find it."""
    path = Path(path)
    path.unlink(missing_ok=True)
    left = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.tmp")
    with contextlib.suppress(FileNotFoundError):
        for tmp in path.parent.iterdir():
            if left.fullmatch(tmp.name):
                tmp.unlink(missing_ok=True)


def _open_temp(path: Path):
    """(name, fd) of a new file beside path."""
    return _beside(path, lambda tmp: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _replace_with(path, write):
    path = Path(path)
    tmp = None
    try:
        folder(path.parent)
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


def replace_folder(path, fill, may_replace=None):
    """fill(tmp) writes a new folder beside path, which then takes path's place whole: a reader never sees half
    of it, and a failure leaves the old folder as it was. may_replace(path) may refuse (a UserError) what is
    already at path; a link there, or a file, is refused. The folder and its files get the user's usual
    permissions (0777/0666 less the umask), where save_pretrained writes safetensors files 0600."""
    path = Path(path)
    tmp = None
    try:
        folder(path.parent)
        tmp, _ = _beside(path, lambda name: os.mkdir(name, 0o777))  # the kernel takes the umask off
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, file_mode())
        if os.path.lexists(path):
            folder(path)
            if may_replace:
                may_replace(path)
            _swap(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        raise _cannot_write(path, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _swap(new: Path, path: Path):
    """new in path's place; the old folder goes aside first (two renames: a kill between them leaves it whole in
    .NAME.*.old), then away."""
    old, _ = _beside(path, lambda name: os.mkdir(name, 0o700), "old")
    os.replace(path, old / path.name)
    try:
        os.replace(new, path)
    except OSError:
        os.replace(old / path.name, path)  # back in place; should this fail too, it stays whole in old
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    folder(Path(path).parent)
    try:  # O_NOFOLLOW: a link planted at the file's name is refused (ELOOP), not appended through
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"{path}: not a regular file; lorakd appends only to its own files")
            f.write(line.rstrip("\n") + "\n")
            f.flush()
    except OSError as e:
        raise _cannot_write(path, e) from None


# a cell a spreadsheet would run as a formula (OWASP's list); a plain number such as -1 stays a number
_FORMULA = re.compile(r"[=+\-@\t\r]")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value):
    """A CSV cell a spreadsheet shows as text: a string starting with =, +, -, @, tab or CR gets a leading
    single quote (unless it is a plain number); numbers and other values pass unchanged."""
    if isinstance(value, str) and _FORMULA.match(value) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value
