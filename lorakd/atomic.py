"""Atomic file writes: a kill at any moment leaves the old file or the new one, never a partial one."""
import json
import os
import tempfile
from pathlib import Path


def _replace_with(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes):
    _replace_with(path, lambda f: f.write(data))


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save(path, obj):
    import torch

    _replace_with(path, lambda f: torch.save(obj, f))


def append_line(path, line: str):
    """Append one line; a torn last line (kill mid-write) is dropped by the readers."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
