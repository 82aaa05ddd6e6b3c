# A job queue over GPUs for the driver scripts (sourced by run_all.sh and run_lt.sh).
#
# GPUS="0 1 2 3" (or "0,1,2,3"): jobs run in parallel, at most one per listed GPU at a time
# (CUDA_VISIBLE_DEVICES set per job), the next one starting as soon as one ends; each job's
# output goes to its own log file; a failed job does not stop the others and is reported at the
# end with its log path. Without GPUS, each job runs in the foreground as before.
# Needs: show (prints a command shell-quoted) and DRY_RUN from the sourcing script.

GPUS=${GPUS:-}
FREE_GPUS=()
if [ -n "$GPUS" ]; then  # ids separated by commas and/or white space; anything else is refused
  read -r -a FREE_GPUS <<< "${GPUS//[$'\n\t,']/ }"
  if [ ${#FREE_GPUS[@]} -eq 0 ]; then
    echo "${DRIVER:-gpu_jobs.sh}: GPUS='$GPUS' names no GPU; give ids such as GPUS=\"0 1\" or" \
      "GPUS=0,1, or leave GPUS unset to run one job at a time" >&2
    exit 2
  fi
  for g in "${FREE_GPUS[@]}"; do
    if ! [[ $g =~ ^([0-9]+|GPU-[0-9a-fA-F-]+|MIG-[0-9A-Za-z/-]+)$ ]]; then
      echo "${DRIVER:-gpu_jobs.sh}: GPUS: '$g' is not a GPU id; give ids (0, 1, ... or GPU-/MIG-" \
        "UUIDs) separated by spaces or commas, e.g. GPUS=\"0 1\" or GPUS=0,1" >&2
      exit 2
    fi
  done
  GPUS="${FREE_GPUS[*]}"
fi
declare -A JOB_GPU=() JOB_LOG=()
FAILED=()
DRY_NEXT=0  # round-robin GPU for the commands DRY_RUN prints

submit() {  # submit LOG CMD...: run CMD now, or on the next free GPU with its output in LOG
  local log=$1
  shift
  if [ -z "$GPUS" ]; then
    if [ "$DRY_RUN" = 1 ]; then show "$@"; else "$@"; fi
    return
  fi
  local gpus
  read -r -a gpus <<< "$GPUS"
  if [ "$DRY_RUN" = 1 ]; then
    echo "CUDA_VISIBLE_DEVICES=${gpus[DRY_NEXT % ${#gpus[@]}]} $(show "$@")"
    DRY_NEXT=$((DRY_NEXT + 1))
    return
  fi
  while [ ${#FREE_GPUS[@]} -eq 0 ]; do
    reap_one
  done
  local gpu=${FREE_GPUS[0]}
  FREE_GPUS=("${FREE_GPUS[@]:1}")
  mkdir -p "$(dirname "$log")"
  echo "GPU $gpu: $(show "$@")> $log"
  CUDA_VISIBLE_DEVICES=$gpu "$@" > "$log" 2>&1 &
  JOB_GPU[$!]=$gpu
  JOB_LOG[$!]=$log
}

reap_one() {  # wait until one running job has ended; give its GPU back
  while true; do
    local pid
    for pid in "${!JOB_GPU[@]}"; do
      if ! kill -0 "$pid" 2> /dev/null; then
        if ! wait "$pid"; then
          FAILED+=("${JOB_LOG[$pid]}")
        fi
        FREE_GPUS+=("${JOB_GPU[$pid]}")
        unset "JOB_GPU[$pid]" "JOB_LOG[$pid]"
        return
      fi
    done
    sleep 1
  done
}

run_job() {  # run_job OUT CMD...: skip a finished run (OUT/result.json), else submit it
  local out=$1
  shift
  if [ "$DRY_RUN" != 1 ] && [ -f "$out/result.json" ]; then
    echo "skip (finished): $out"
  else
    [ "$DRY_RUN" = 1 ] || [ -n "$GPUS" ] || echo "run: $(show "$@")"
    submit "$out.log" "$@"
  fi
}

drain() {  # wait for every job; list the failed ones; return 1 if any failed
  while [ ${#JOB_GPU[@]} -gt 0 ]; do
    reap_one
  done
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "${#FAILED[@]} job(s) failed; see their logs:" >&2
    printf '  %s\n' "${FAILED[@]}" >&2
    return 1
  fi
}
