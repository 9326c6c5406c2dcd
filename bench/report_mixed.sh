#!/usr/bin/env bash
# docs/report-mixed.png: `lorakd report` over a sweep of 2 members, a pipeline and a run of its own (embedded
# MiniLM, a few CPU steps each: the figures mean nothing, the page's layout is the point), rendered by headless
# Chromium in a 1,400-px window. Usage: bench/report_mixed.sh AG_NEWS_DIR OUT_DIR
set -euo pipefail
data=$1 out=$2
quick="data.max_train_samples=240 data.val_fraction=0.03 data.max_length=48 train.max_steps=12 train.eval_every=6
       train.log_every=3 train.batch_size=16 train.checkpoint_every=0 train.lr=1e-3"
mkdir -p "$out"
cat > "$out/sweep.yaml" <<YAML
name: minilm-ranks
base: agnews-minilm
grid: {model.r: [2, 8], model.targets: [[query, value]]}
out: $out/sweep-minilm-ranks
YAML
lorakd sweep "$out/sweep.yaml" --data "$data" --set $quick
lorakd pipeline --config pipeline-minilm --data "$data" --out "$out/pipeline-minilm" $quick teacher.train.lr=5e-5
lorakd train --config agnews-minilm --data "$data" --out "$out/agnews-minilm-single" $quick model.targets=[query,key,value,dense]
lorakd report "$out/sweep-minilm-ranks" "$out/pipeline-minilm" "$out/agnews-minilm-single" --out "$out/report"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1250 \
    --screenshot="$out/report-mixed.png" "file://$(realpath "$out/report/report.html")"
