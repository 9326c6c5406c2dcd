#!/usr/bin/env bash
# The distillation bench (bench/distill_gain.py) in one call on a 2-GPU host: one process per (seed, regime),
# half of them on each GPU, each its own raw JSON; then one summary from all of them.
#   bash bench/device_distill.sh TEACHER_BACKBONE STUDENT_BACKBONE DATA OUT [DEADLINE_S] [-- extra args]
# e.g. on the lent nvidia-h200-x2 (after the five mpnet carry calls; see ../shared/tools/device-carry-mpnet.sh):
#   bash bench/device_distill.sh /tmp/mpnet .device-carry/minilm .device-carry/data "$OUT" 450
# Every process starts no new run after DEADLINE_S seconds and is stopped at DEADLINE_S + 110; a stopped
# process keeps the runs it finished (its JSON is rewritten after each). $FEW_ARGS / $ALL_ARGS: extra arguments
# for one regime's processes only (e.g. ALL_ARGS="--arms ce,kd_ens,ce_e10"); $SEEDS: the seeds (default 42 43 44 45),
# one process per seed and regime; $REGIMES: the regimes (default few all).
set -u
teacher=$1 student=$2 data=$3 out=$4 deadline=${5:-450}
shift $(( $# < 5 ? $# : 5 )); [ "${1:-}" = "--" ] && shift
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # eight processes share the host's cores
gpus=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
tag=-$(date +%H%M)
raw=$out/raw$tag  # per-process JSON and logs, packed into one archive at the end (few files come back)
mkdir -p "$raw"
i=0
for seed in ${SEEDS:-42 43 44 45}; do
  for regime in ${REGIMES:-few all}; do
    CUDA_VISIBLE_DEVICES=$((i % gpus)) PYTHONPATH=. timeout $((deadline + 110)) python bench/distill_gain.py \
      --teacher-backbone "$teacher" --student-backbone "$student" --data "$data" --seeds $seed --regimes $regime \
      --deadline-s "$deadline" --tag="$tag-$regime-s$seed" --out "$raw" "$@" $( [ $regime = few ] && echo "${FEW_ARGS:-}" || echo "${ALL_ARGS:-}" ) > "$raw/distill$tag-$regime-s$seed.log" 2>&1 &
    i=$((i + 1))
  done
done
wait
PYTHONPATH=. python bench/distill_gain.py --out "$out" --merge "$raw"/scratch/distill-gain"$tag"-*.json
tar czf "$out/distill$tag.tgz" -C "$out" "raw$tag" && rm -rf "$raw"
