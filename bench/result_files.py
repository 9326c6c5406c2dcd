"""Where a bench script writes its result: the current file under a fixed name, bench/results/NAME.json (the
one the docs cite; commit it when a call replaces the last one), and a timestamped copy of every call under
bench/results/scratch/ (git-ignored: A/B arms, smoke runs, superseded calls). A --tag names a kept variant
(profile-step-minilm); to keep an arm out of bench/results altogether, pass --out bench/results/scratch."""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lorakd import atomic  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def result_paths(name: str, out=RESULTS, device: str = "") -> tuple[Path, Path]:
    """(current, scratch): OUT/NAME.json and OUT/scratch/NAME-DEVICE-YYYYMMDD-HHMMSS.json."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    dev = f"-{device.replace(' ', '_')}" if device else ""
    out = ROOT / out  # a relative --out is from the repo root (an absolute one stays as given)
    return out / f"{name}.json", out / "scratch" / f"{name}{dev}-{stamp}.json"


def write_result(paths, result: dict):
    """Each path, atomically (a result rewritten after each part replaces the last one whole)."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, result)
