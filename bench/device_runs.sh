#!/usr/bin/env bash
# The reference runs of the closing notes, in one GPU call, from the repo root:
#   bash bench/device_runs.sh BACKBONE DATA OUT
# BACKBONE: the embedded MiniLM (embedded:minilm, or the folder .device-carry/minilm on the lent GPU);
# DATA: the AG News sample folder. Writes runs under OUT/runs and packs the small files (no weights
# of full fine-tunes, no checkpoints) into OUT/runs.tar.gz.
set -euo pipefail
# EXTRA: key=value overrides for every run (a smoke test: EXTRA="train.max_steps=5")
BACKBONE=${1:-embedded:minilm}; DATA=${2:-../shared/data/ag_news}; OUT=${3:-runs}
LORAKD="python3 -m lorakd.cli"
W=/tmp/lorakd-device-runs; rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1; EXTRA=${EXTRA:-}
step() { echo; echo "=== $* ($(date +%T))"; }

step "issue 2: reference student recipe (also the student without distillation)"
time $LORAKD train --config agnews-minilm --data "$DATA" \
  --out "$W/student-ce" model.backbone="$BACKBONE" $EXTRA

step "issue 3: pipeline: full-FT teacher -> cached logits -> distilled student -> eval -> predictions"
python3 - "$DATA" "$W/unlabelled.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1] + "/train.csv", encoding="utf-8")))[:2000]
with open(sys.argv[2], "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f); w.writerow(["id", "text"]); w.writerows([i, r[1] + " " + r[2]] for i, r in enumerate(rows))
PY
time $LORAKD pipeline --config pipeline-minilm --data "$DATA" \
  --out "$W/pipeline" --predict "$W/unlabelled.csv" model.backbone="$BACKBONE" $EXTRA
step "issue 3: the pipeline again: every stage skipped"
time $LORAKD pipeline --config pipeline-minilm --data "$DATA" \
  --out "$W/pipeline" --predict "$W/unlabelled.csv" model.backbone="$BACKBONE" $EXTRA
step "issue 3: another student from the same teacher: logits from the cache (T=4)"
time $LORAKD train --config agnews-minilm --data "$DATA" \
  --out "$W/student-kd-t4" model.backbone="$BACKBONE" "distill.teachers=[$W/pipeline/teacher]" \
  distill.alpha=0.5 distill.temperature=4.0 $EXTRA

step "issue 4: sweep over ranks and placements"
time $LORAKD sweep minilm-ranks --data "$DATA" --out "$W/sweep-minilm-ranks" \
  --set model.backbone="$BACKBONE" $EXTRA

step "pack"
mkdir -p "$OUT"
tar -C "$W" -czf "$OUT/runs.tar.gz" --exclude='*/model' --exclude='checkpoint' --exclude='*.pt' .
ls -la "$OUT"
