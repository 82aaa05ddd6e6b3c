#!/usr/bin/env bash
# Active learning on top of the semi-supervised model (README: active learning).
# For each seed: round 0 trains on INIT labels per class (the seeded split); then, for each
# strategy, ROUNDS times: query.py picks N_QUERY more images with the last round's model and
# train.py trains again from scratch (same --seed, so the same initialisation, for every
# strategy) on the grown labeled set. Ends with OUT_DIR/al_table.md and al_table.csv: final test
# accuracy per (strategy, round, labeled count), mean ± std over seeds, and the area under each
# curve. Finished rounds and written queries are skipped, so running it again resumes; a rerun
# with other INIT, N_QUERY, DATASET, LOSS, ENTROPY_RATIO, EXTRA_ARGS or QUERY_ARGS is refused
# (OUT_DIR/al_settings.txt). Relative paths are taken from the current directory.
#
#   bash al.sh                                                   # CIFAR-10, 4 labels/class to start
#   DRY_RUN=1 ROUNDS=2 SEEDS="0 1" bash al.sh                    # print the commands
#   DATASET=npz:my.npz INIT=2 N_QUERY=20 LOSS=base EXTRA_ARGS="--epochs 5" bash al.sh
#
# Layout: OUT_DIR/sSEED/r0 (round 0), OUT_DIR/sSEED/STRATEGY/rR.txt (labeled set of round R, with
# the .csv of the images chosen and the .json of the query) and OUT_DIR/sSEED/STRATEGY/rR (run).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # the scripts; relative paths stay relative to the caller
DRIVER=al.sh

ROUNDS=${ROUNDS:-3}
N_QUERY=${N_QUERY:-40}
STRATEGIES=${STRATEGIES:-random entropy typical}
SEEDS=${SEEDS:-0}
INIT=${INIT:-4}                       # labels per class of round 0
DATASET=${DATASET:-cifar10}
LOSS=${LOSS:-entropy}
ENTROPY_RATIO=${ENTROPY_RATIO:-}      # beta of --loss entropy; default: the paper's for CIFAR, INIT 4 / 25
DATA_DIR=${DATA_DIR:-data}
OUT_DIR=${OUT_DIR:-results_al}
EXTRA_ARGS=${EXTRA_ARGS:-}            # more train.py flags, e.g. "--epochs 16 --arch wrn-10-1"
QUERY_ARGS=${QUERY_ARGS:-}            # more query.py flags, e.g. "--device cpu"
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

for v in ROUNDS N_QUERY INIT; do
  if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -lt 1 ]; then
    echo "al.sh: $v must be a whole number >= 1, got '${!v}'" >&2
    exit 2
  fi
done

# shellcheck disable=SC2206  # EXTRA_ARGS / QUERY_ARGS are lists of flags: split on purpose
set -f; extra=($EXTRA_ARGS); set +f
# shellcheck disable=SC2206
set -f; qextra=($QUERY_ARGS); set +f
# shellcheck source=checks.sh
. "$HERE/checks.sh"
check_dry_run
check_counts SEEDS "$SEEDS" 0
check_own_flags EXTRA_ARGS "--dataset --data-dir --loss --entropy-ratio --out --labels-per-class \
  --labeled-idx --seed" "${extra[@]}"
check_own_flags QUERY_ARGS "--n --strategy --seed --out" "${qextra[@]}"
if [ -n "${GPUS:-}" ]; then
  echo "al.sh: warning: GPUS is not used (the rounds depend on each other); to use several GPUs," \
    "start one al.sh per seed with CUDA_VISIBLE_DEVICES" >&2
fi
LOSSES=$(methods_list)  # the --loss names of methods.STEPS
check_words LOSS "$LOSS" "$LOSSES"
[ "${LOSS//[[:space:]]/}" = "$LOSS" ] || refuse "LOSS must be one method, got '$LOSS'"
show() { printf '%q ' "$@"; echo; }
run() {
  if [ "$DRY_RUN" = 1 ]; then show "$@"; else "$@"; fi
}
train() {  # train OUT FLAGS...: a round, unless it has finished (train.py resumes a stopped one)
  local out=$1
  shift
  [ -f "$out/result.json" ] && [ "$DRY_RUN" != 1 ] && return 0
  run "$PYTHON" "$HERE/train.py" --dataset "$DATASET" --data-dir "$DATA_DIR" --loss "$LOSS" "${method[@]}" \
    --out "$out" "$@" "${extra[@]}"
  # recorded once a round has trained, so a first attempt that fails at once binds nothing
  if [ "$DRY_RUN" != 1 ] && [ ! -f "$OUT_DIR/al_settings.txt" ]; then
    printf '%s\n' "$conf" > "$OUT_DIR/al_settings.txt.tmp"  # then renamed: never half a file
    mv "$OUT_DIR/al_settings.txt.tmp" "$OUT_DIR/al_settings.txt"
  fi
}

for s in $STRATEGIES; do  # before any training: a typo must not cost the first rounds
  case " random entropy margin least-confident balanced-entropy typical " in
    *" $s "*) ;;
    *)
      echo "al.sh: unknown strategy '$s' in STRATEGIES; use random, entropy, margin," \
        "least-confident, balanced-entropy or typical" >&2
      exit 2
      ;;
  esac
done

method=()
if [ "$LOSS" = entropy ]; then
  if [ -z "$ENTROPY_RATIO" ]; then  # [N&O] section 4.3, as train.py's PAPER_BETA
    case "$DATASET:$INIT" in
      cifar10:4 | cifar100:25) ENTROPY_RATIO=0.2 ;;
      cifar10:25) ENTROPY_RATIO=0.4 ;;
      cifar100:4) ENTROPY_RATIO=0.1 ;;
      *)
        echo "al.sh: set ENTROPY_RATIO (beta of --loss entropy): the paper gives it for CIFAR-10/100" \
          "with INIT 4 or 25 only, and every round needs it" >&2
        exit 2
        ;;
    esac
  fi
  method=(--entropy-ratio "$ENTROPY_RATIO")
fi

# the settings every round of OUT_DIR must share: a rerun with others would mix them silently
# (arguments compared as the words they split into: extra white space is no other setting)
conf="INIT=$INIT N_QUERY=$N_QUERY DATASET=$DATASET LOSS=$LOSS ENTROPY_RATIO=$ENTROPY_RATIO EXTRA_ARGS=${extra[*]} QUERY_ARGS=${qextra[*]}"
normalised() { tr -s '[:space:]' ' ' | sed -e 's/= /=/g' -e 's/^ //' -e 's/ $//'; }
if [ "$DRY_RUN" != 1 ]; then
  if [ -f "$OUT_DIR/al_settings.txt" ]; then
    if [ "$(normalised < "$OUT_DIR/al_settings.txt")" != "$(printf '%s' "$conf" | normalised)" ]; then
      echo "al.sh: $OUT_DIR holds rounds made with other settings:" >&2
      echo "  then: $(cat "$OUT_DIR/al_settings.txt")" >&2
      echo "  now:  $conf" >&2
      echo "use a new OUT_DIR (ROUNDS, STRATEGIES and SEEDS may change; these may not)" >&2
      exit 2
    fi
  fi
fi

for seed in $SEEDS; do
  base="$OUT_DIR/s$seed"
  train "$base/r0" --labels-per-class "$INIT" --seed "$seed"
  for strategy in $STRATEGIES; do
    prev="$base/r0"
    for r in $(seq 1 "$ROUNDS"); do
      idx="$base/$strategy/r$r.txt"
      if [ ! -f "$idx" ] || [ "$DRY_RUN" = 1 ]; then
        run "$PYTHON" "$HERE/query.py" "$prev" --n "$N_QUERY" --strategy "$strategy" --seed "$seed" \
          --out "$idx" "${qextra[@]}"
      fi
      train "$base/$strategy/r$r" --labeled-idx "$idx" --seed "$seed"
      prev="$base/$strategy/r$r"
    done
  done
done
run "$PYTHON" "$HERE/evaluate.py" --al-table "$OUT_DIR"
