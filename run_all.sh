#!/usr/bin/env bash
# Every Table 1 cell of [N&O]: {cifar10, cifar100} x {4, 25 labels/class} x METHODS
# for each seed in SEEDS, then the tables (OUT_DIR/table1.md).
# A finished run (result.json present) is skipped; an unfinished one resumes from its checkpoint.
#
#   bash run_all.sh                               # the paper's protocol, base and entropy, seed 0
#   SEEDS="0 1 2" bash run_all.sh                 # three seeds
#   METHODS="fixmatch ccssl simmatch base entropy" bash run_all.sh   # the peers too
#   EPOCHS=16 EXTRA_ARGS="--compile" bash run_all.sh
#   DRY_RUN=1 bash run_all.sh                     # print the commands only
#   GPUS="0 1 2 3" bash run_all.sh                # one run per GPU in parallel (gpu_jobs.sh)
# Relative paths (OUT_DIR, DATA_DIR, paths in EXTRA_ARGS) are taken from the current directory,
# and the commands DRY_RUN prints work there. Every setting is checked before anything trains.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # the scripts; relative paths stay relative to the caller
DRIVER=run_all.sh

SEEDS=${SEEDS:-0}                 # seeds to run
METHODS=${METHODS:-base entropy}  # --loss values: base entropy fixmatch ccssl simmatch semi
EPOCHS=${EPOCHS:-256}             # epochs of 1024 steps (the paper: 256)
DATA_DIR=${DATA_DIR:-data}        # CIFAR is downloaded here on first use
OUT_DIR=${OUT_DIR:-results}       # one sub-directory per run, plus table1.md
EXTRA_ARGS=${EXTRA_ARGS:-}        # passed to every train.py call (split on spaces)
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

# shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags: split on purpose (no globbing)
set -f; extra=($EXTRA_ARGS); set +f
# shellcheck source=checks.sh
. "$HERE/checks.sh"
check_dry_run
check_counts SEEDS "$SEEDS" 0
check_counts EPOCHS "$EPOCHS" 1
check_own_flags EXTRA_ARGS "--dataset --labels-per-class --loss --seed --epochs --data-dir --out" \
  "${extra[@]}"

show() {  # print a command with every argument shell-quoted, so it can be pasted back
  printf '%q ' "$@"
  echo
}
# shellcheck source=gpu_jobs.sh
. "$HERE/gpu_jobs.sh"
LOSSES=$(methods_list)  # the --loss names of methods.STEPS
check_words METHODS "$METHODS" "$LOSSES"

for seed in $SEEDS; do
  for dataset in cifar10 cifar100; do
    for n in 4 25; do
      for loss in $METHODS; do
        out="$OUT_DIR/${dataset}_${n}_${loss}_s${seed}"
        cmd=("$PYTHON" "$HERE/train.py" --dataset "$dataset" --labels-per-class "$n" --loss "$loss"
             --seed "$seed" --epochs "$EPOCHS" --data-dir "$DATA_DIR" --out "$out" "${extra[@]}")
        run_job "$out" "${cmd[@]}"
      done
    done
  done
done

status=0
drain || status=1
table=("$PYTHON" "$HERE/evaluate.py" --table "$OUT_DIR")
if [ "$DRY_RUN" = 1 ]; then
  show "${table[@]}"
else
  "${table[@]}"
fi
exit $status
