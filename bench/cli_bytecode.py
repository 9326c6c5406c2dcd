"""What a user's `lorakd train` costs, command to exit, with and without a bytecode cache.

The lent GPU machine sets PYTHONDONTWRITEBYTECODE=1, so every fresh process compiles transformers', torch's and
peft's sources again; a user's machine keeps the compiled files after the first run. This runs fresh
`lorakd train --config agnews-minilm` processes (bench.cli_run) as that machine does, then with
bytecode written to a private cache (PYTHONPYCACHEPREFIX; the first of those compiles and writes, the next ones
read it), prints a table and writes JSON. --also adds arms with an override each on the same cache, --also-path
arms whose imports look in a folder first (another transformers installed there with pip --target, say): one
process fills the cache, then the cache arms take turns, run by run:
    python bench/cli_bytecode.py --backbone .device-carry/minilm --data .device-carry/data --out "$OUT" \
        [--cache-only] [--also data.pad_multiple=32] [--also-path DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (bench.cli_run: one fresh process, its wall time and phases)
from result_files import result_paths, write_result  # noqa: E402



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:minilm")
    ap.add_argument("--data", default="../shared/data/ag_news")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per arm")
    ap.add_argument("--cache-only", action="store_true", help="only the bytecode-cache arm")
    ap.add_argument("--also", nargs="*", default=[], metavar="key=value",
                    help="then one more bytecode-cache arm per override (data.pad_multiple=32, say), same cache")
    ap.add_argument("--also-path", nargs="*", default=[], metavar="DIR",
                    help="then one more bytecode-cache arm per folder, put first on the imports' path (PYTHONPATH)")
    ap.add_argument("--tag", default="", help="suffix of the JSON's name")
    ap.add_argument("--out", default=str(bench.REPO / "bench" / "results"))
    args = ap.parse_args()
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="lorakd-cli-"))
    res = {"device": dev, "date": date.today().isoformat(), "torch": torch.__version__,
           "machine_sets_PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"), "arms": {}}
    saved = dict(os.environ)
    arms = ["as the machine is (no bytecode written)", "bytecode cache (PYTHONPYCACHEPREFIX)"]

    def env_for(arm):
        os.environ.clear()
        os.environ.update(saved)
        if arm.startswith("bytecode"):
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
            os.environ["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        if ", path " in arm:  # bench.cli_run puts the repo first, then this
            first = arm.split(", path ")[1]
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [first, saved.get("PYTHONPATH")]))
            return []
        return arm.split(", ")[1:]  # the arm's overrides

    def run(arm, i):
        return bench.cli_run(args.backbone, args.data, tmp, f"{arms.index(arm)}-{i}", env_for(arm))

    if not args.cache_only:
        res["arms"][arms[0]] = [run(arms[0], i) for i in range(args.runs)]
    cache_arms = arms[1:] + [f"bytecode cache, {o}" for o in args.also] + [f"bytecode cache, path {d}"
                                                                           for d in args.also_path]
    arms += cache_arms[1:]
    if args.also or args.also_path:  # side by side: one process fills the cache, then the arms take turns
        res["cold_process"] = run(cache_arms[0], "cold")
    for i in range(args.runs):
        for arm in cache_arms:
            res["arms"].setdefault(arm, []).append(run(arm, i))
    for arm, runs in res["arms"].items():
        print(f"{arm}: wall " + " / ".join(f"{r['wall_s']:.1f}" for r in runs) + " s; start+build "
              + " / ".join(f"{r['phases_s']['start'] + r['phases_s']['build']:.1f}" for r in runs) + "; train loop "
              + " / ".join(f"{r['phases_s']['train_loop']:.1f}" for r in runs), flush=True)
    os.environ.clear()
    os.environ.update(saved)
    warm = [r["wall_s"] for r in res["arms"][arms[1]][0 if args.also or args.also_path else 1:]]
    res["wall_s_with_bytecode_cache"] = {"mean": round(statistics.mean(warm), 2), "runs": warm} if warm else None
    paths = result_paths(f"cli-bytecode{args.tag}", args.out, dev)
    write_result(paths, res)
    print(f"wrote {paths[0]}")


if __name__ == "__main__":
    main()
