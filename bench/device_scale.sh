#!/usr/bin/env bash
# Issue 30's GPU runs (bench/distill_gain.py's 50k regimes), in the background on the lent GPU so that the calls
# which bring the mpnet teacher over (five parts) overlap them. Run from the repo root there:
#   bash bench/device_scale.sh ce        # CE twins of every regime (no teacher needed) + memory_scale
#   bash bench/device_scale.sh kd        # teachers (round 1, round 2) and distilled students, /tmp/mpnet needed
# Results: /tmp/res (raw JSONs and logs); `tar czf $OUT/res.tgz -C /tmp res` brings them back.
set -u
mkdir -p /tmp/res /tmp/d50
[ -s /tmp/d50/train.csv ] || gunzip -c .device-carry/data/train50k.csv.gz > /tmp/d50/train.csv
S=$PWD/.device-carry/minilm
G="python bench/distill_gain.py --students minilm-fill --seeds ${SEEDS:-42,43,44} --student-backbone $S --data /tmp/d50"
G="$G --out /tmp/res --deadline-s ${DEADLINE:-560}"
if [ "$1" = ce ]; then
  setsid nohup $G --teachers 0 --regimes 50k-1000 --tag=-ce1000 \
    --variants ce_lr1e3_e10:train.lr=1e-3,train.epochs=10 ce_lr1e3_e30:train.lr=1e-3,train.epochs=30 \
    > /tmp/res/ce1000.log 2>&1 &
  setsid nohup $G --teachers 0 --regimes 50k-8791 --tag=-ce8791 \
    --variants ce_lr1e3:train.lr=1e-3 ce_lr1e3_e9:train.lr=1e-3,train.epochs=9 > /tmp/res/ce8791.log 2>&1 &
  setsid nohup $G --teachers 0 --regimes 50k-all --tag=-ceall \
    --variants ce_lr1e3:train.lr=1e-3 ce_lr1e3_e6:train.lr=1e-3,train.epochs=6 > /tmp/res/ceall.log 2>&1 &
  setsid nohup python bench/memory_scale.py --backbone $S --data /tmp/d50 --repeats 1,10 --out /tmp/res \
    > /tmp/res/memory.log 2>&1 &
fi
if [ "$1" = kd ]; then
  K="--teacher-backbone /tmp/mpnet --round2 --kd-set train.lr=1e-3"
  for r in 50k-1000 50k-8791; do
    setsid nohup $G $K --regimes $r --tag=-kd$r --arms kd_transfer,kd_r2 > /tmp/res/kd$r.log 2>&1 &
  done
  setsid nohup $G --teacher-backbone /tmp/mpnet --kd-set train.lr=1e-3 --regimes 50k-all --tag=-kdall \
    --arms kd_transfer > /tmp/res/kdall.log 2>&1 &
fi
sleep 2; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
