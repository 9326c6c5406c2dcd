#!/usr/bin/env bash
# Issue 30's GPU runs (bench/distill_gain.py's 50k regimes), in the background on the lent GPU so that the calls
# which bring the mpnet teacher over (five parts) overlap them. Run from the repo root there:
#   bash bench/device_scale.sh ce        # CE twins of every regime (no teacher needed) + memory_scale
#   bash bench/device_scale.sh kd        # teachers (2-teacher ensemble, round 2) and distilled students (MiniLM
#                                        # filling the budget, mpnet r6 q/k/v), 3 seeds; /tmp/mpnet needed
#   bash bench/device_scale.sh time N    # bench/trainer_way.py, then bench/pipeline_way.py (lorakd pipeline), with
#                                        # data.labelled=N (0 = all labels), one after the other, the GPU otherwise
#                                        # idle; /tmp/mpnet needed; runs in the foreground
#   bash bench/device_scale.sh ce-lr1e3 SEED...  # the all-label CE twin at lr 1e-3 for these seeds, side by side
#   bash bench/device_scale.sh more A B  # seeds added to the arms with fewer than 3: seed A of the 8,791-label round 2
#                                        # and mpnet r6 students, seed B of the all-label students; three processes
# Results: /tmp/res (raw JSONs and logs); `tar czf $OUT/res.tgz -C /tmp res` brings them back.
# Poll with back-to-back calls (the machine is given back after 30 s idle, and /tmp with it): start each call with
# `ls /tmp/mpnet | wc -l` (11) and stop at once if not; wait on the jobs by a pid file, not `pgrep -f NAME`
# (which matches the polling command itself).
set -u
mkdir -p /tmp/res /tmp/d50
[ -s /tmp/d50/train.csv ] || gunzip -c .device-carry/data/train50k.csv.gz > /tmp/d50/train.csv
S=$PWD/.device-carry/minilm
G="python bench/distill_gain.py --students minilm-fill --seeds ${SEEDS:-42,43,44} --student-backbone $S --data /tmp/d50"
G="$G --out /tmp/res --deadline-s ${DEADLINE:-560}"
K="--teacher-backbone /tmp/mpnet --kd-set train.lr=1e-3 --students minilm-fill,mpnet-r6-qkv"  # the KD runs
K="$K --student-set mpnet-r6-qkv:train.lr=5e-4"  # the base-size student's lr (preset pipeline-mpnet-r6)
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
if [ "$1" = kd ]; then  # two streams side by side (six at once slowed the mpnet teacher ~4x): 8,791 labels; all, then 1,000
  setsid nohup $G $K --teachers 2 --round2 --regimes 50k-8791 --tag=-kd8791 --deadline-s ${DEADLINE_A:-1100} \
    --arms minilm-fill:kd_transfer,minilm-fill:kd_ens,minilm-fill:kd_r2,mpnet-r6-qkv:kd_ens > /tmp/res/kd8791.log 2>&1 &
  setsid nohup bash -c "$G $K --regimes 50k-all --tag=-kdall --deadline-s ${DEADLINE_B1:-480} \
    --arms minilm-fill:kd_transfer,minilm-fill:ce_e6 > /tmp/res/kdall.log 2>&1;
    $G $K --regimes 50k-1000 --tag=-kd1000 --deadline-s ${DEADLINE_B2:-560} \
    --arms minilm-fill:kd_transfer,mpnet-r6-qkv:kd_transfer > /tmp/res/kd1000.log 2>&1" > /dev/null 2>&1 &
fi
if [ "$1" = time ]; then  # the same preset, rows and overrides both ways: pipeline-mpnet without augmentation
  W="--teacher-backbone /tmp/mpnet --student-backbone $S --data /tmp/d50 --labelled $2 --out /tmp/res"
  [ "${TRAINER:-1}" = 0 ] ||  # TRAINER=0: lorakd's side alone (a re-timing after a change to lorakd)
    python bench/trainer_way.py $W --max-steps 1500 --deadline-s 300 distill.augment=0 > /tmp/res/trainer-way-$2.log 2>&1
  python bench/pipeline_way.py $W distill.augment=0 > /tmp/res/pipeline-way-$2.log 2>&1
  tail -n 2 /tmp/res/trainer-way-$2.log /tmp/res/pipeline-way-$2.log
  exit
fi
if [ "$1" = ce-lr1e3 ]; then  # the all-label CE twin at lr 1e-3 (3 epochs) for more seeds, side by side, foreground
  for seed in ${@:2}; do
    $G --seeds $seed --teachers 0 --regimes 50k-all --tag=-ceall-s$seed --variants ce_lr1e3:train.lr=1e-3 \
      --arms minilm-fill:ce_lr1e3 > /tmp/res/ceall-s$seed.log 2>&1 &
  done
  wait
  exit
fi
if [ "$1" = more ]; then
  setsid nohup $G $K --seeds $2 --teachers 2 --round2 --regimes 50k-8791 --tag=-kd8791-s$2 --deadline-s 900 \
    --arms minilm-fill:kd_r2,mpnet-r6-qkv:kd_ens > /tmp/res/kd8791-s$2.log 2>&1 &
  echo $! >> /tmp/res/more.pids  # to wait on: `for p in $(cat /tmp/res/more.pids); do while kill -0 $p...`
  for seed in ${@:3}; do
    setsid nohup $G $K --seeds $seed --regimes 50k-all --tag=-kdall-s$seed --deadline-s 900 \
      --arms minilm-fill:kd_transfer,minilm-fill:ce_e6 > /tmp/res/kdall-s$seed.log 2>&1 &
    echo $! >> /tmp/res/more.pids
  done
fi
sleep 2; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
