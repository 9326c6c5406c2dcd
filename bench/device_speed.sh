#!/usr/bin/env bash
# Issue 14's speed call on a 2-GPU host, from the repo root:
#   bash bench/device_speed.sh BACKBONE DATA OUT [PARTS]     (PARTS default: cli,levers)
# GPU 0 runs bench/cuda_start.py (the CUDA start-up A/B), then bench/bench.py's PARTS one after another, with
# nothing else on that GPU; GPU 1 runs the peer's reference recipe (Trainer + peft) at the same time, so the
# CLI's speed-up is against a peer of the same call. OUT gets one speed-summary.json: the committed one with
# these parts replaced (parts not run are kept as they were, with their own date inside).
set -u
backbone=$1 data=$2 out=$3 parts=${4:-cli,levers}
mkdir -p "$out/peer"
cp bench/results/speed-summary.json "$out/"
CUDA_VISIBLE_DEVICES=1 PYTHONPATH=. python bench/bench.py --only speed --parts peer_ref --backbone "$backbone" \
  --data "$data" --out "$out/peer" > "$out/peer.log" 2>&1 &
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=. python bench/cuda_start.py --backbone "$backbone" --out "$out" > "$out/cuda-start.log" 2>&1
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=. python bench/bench.py --only speed --parts "$parts" --backbone "$backbone" \
  --data "$data" --out "$out" > "$out/speed.log" 2>&1
wait
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
res, peer = (json.loads(p.read_text()) for p in (out / "speed-summary.json", out / "peer" / "speed-summary.json"))
res["peer_ref"] = {**peer["peer_ref"], "gpu": "the host's second GPU, during the CLI runs"}
res["cli_train_speedup"] = {k: round(res["peer_ref"]["train_time_s"] / v["train_time_s"], 2)
                            for k, v in res.get("cli", {}).items()}
(out / "speed-summary.json").write_text(json.dumps(res, indent=1))
print(json.dumps({k: res.get(k) for k in ("cli_wall_s", "cli_train_speedup", "phases_s", "levers")}, indent=1))
PY
