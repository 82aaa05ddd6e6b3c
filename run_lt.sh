#!/usr/bin/env bash
# The long-tailed protocol of SeMi / USB's CISSL benchmark (README: long-tailed), for every method in METHODS:
#   CIFAR-10-LT  N1 1500 / M1 3000 / gamma 100, unlabeled consistent (100) and reversed (-100)
#   CIFAR-100-LT N1 150  / M1 300  / gamma 10
# then OUT_DIR/lt_table.md (overall and head / medium / tail accuracy, raw and logit-adjusted).
# USB runs these 262,144 steps with mu = 2 (EPOCHS=256, MU=2 here).
#
#   bash run_lt.sh                                   # base entropy fixmatch, seed 0
#   METHODS="fixmatch" HARD_WEIGHT=0.75 bash run_lt.sh   # SeMi's entropy hard-example weighting
#   METHODS="base entropy fixmatch semi" bash run_lt.sh  # SeMi in full beside them
#   DRY_RUN=1 SEEDS="0 1 2" bash run_lt.sh
#   GPUS="0 1" bash run_lt.sh                        # one run per GPU in parallel (gpu_jobs.sh)
# Relative paths (OUT_DIR, DATA_DIR, paths in EXTRA_ARGS) are taken from the current directory,
# and the commands DRY_RUN prints work there. Every setting is checked before anything trains.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # the scripts; relative paths stay relative to the caller
DRIVER=run_lt.sh

SEEDS=${SEEDS:-0}
METHODS=${METHODS:-base entropy fixmatch}
EPOCHS=${EPOCHS:-256}
MU=${MU:-2}
ENTROPY_RATIO=${ENTROPY_RATIO:-0.2}   # beta for --loss entropy (the paper gives none for LT)
HARD_WEIGHT=${HARD_WEIGHT:-}          # --hard-weight S for fixmatch / ccssl / simmatch (semi has its own)
DATA_DIR=${DATA_DIR:-data}
OUT_DIR=${OUT_DIR:-results_lt}
EXTRA_ARGS=${EXTRA_ARGS:-}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

# shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags: split on purpose (no globbing)
set -f; extra=($EXTRA_ARGS); set +f
# shellcheck source=checks.sh
. "$HERE/checks.sh"
check_dry_run
check_counts SEEDS "$SEEDS" 0
check_counts EPOCHS "$EPOCHS" 1
check_counts MU "$MU" 0
check_own_flags EXTRA_ARGS "--dataset --lt-labeled --lt-unlabeled --imb-ratio-l --imb-ratio-u \
  --loss --mu --seed --epochs --data-dir --out --entropy-ratio --hard-weight" "${extra[@]}"
check_fraction ENTROPY_RATIO "$ENTROPY_RATIO" open
check_fraction HARD_WEIGHT "$HARD_WEIGHT"
if [ -n "$HARD_WEIGHT" ] && [ "$EPOCHS" -le 5 ] && awk -v v="$HARD_WEIGHT" 'BEGIN { exit !(v > 0) }'; then
  refuse "HARD_WEIGHT has no effect with EPOCHS $EPOCHS: the weighting starts after epoch 5"
fi
show() { printf '%q ' "$@"; echo; }
run() {
  if [ "$DRY_RUN" = 1 ]; then show "$@"; else "$@"; fi
}
# shellcheck source=gpu_jobs.sh
. "$HERE/gpu_jobs.sh"
LOSSES=$(methods_list)  # the --loss names of methods.STEPS
check_words METHODS "$METHODS" "$LOSSES"

#        dataset  N1   M1   gamma_l gamma_u
SETTINGS="cifar10  1500 3000 100     100
          cifar10  1500 3000 100     -100
          cifar100 150  300  10      10"

for seed in $SEEDS; do
  while read -r dataset n1 m1 gl gu; do
    for loss in $METHODS; do
      flags=()
      [ "$loss" = entropy ] && flags+=(--entropy-ratio "$ENTROPY_RATIO")
      tag=$loss
      if [ -n "$HARD_WEIGHT" ] && [ "$loss" != base ] && [ "$loss" != entropy ] && [ "$loss" != semi ]; then
        flags+=(--hard-weight "$HARD_WEIGHT")
        tag="${loss}_hw$HARD_WEIGHT"
      fi
      out="$OUT_DIR/${dataset}_lt${n1}-${m1}-${gl}-${gu}_${tag}_s${seed}"
      cmd=("$PYTHON" "$HERE/train.py" --dataset "$dataset" --lt-labeled "$n1" --lt-unlabeled "$m1"
           --imb-ratio-l "$gl" --imb-ratio-u "$gu" --loss "$loss" --mu "$MU" --seed "$seed"
           --epochs "$EPOCHS" --data-dir "$DATA_DIR" --out "$out" "${flags[@]}" "${extra[@]}")
      run_job "$out" "${cmd[@]}"
    done
  done <<< "$SETTINGS"
done

status=0
drain || status=1
run "$PYTHON" "$HERE/evaluate.py" --lt-table "$OUT_DIR"
exit $status
