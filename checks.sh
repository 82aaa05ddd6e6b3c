# Checks the drivers (run_all.sh, run_lt.sh, al.sh) make before anything trains, so that a typo
# costs seconds, not the first hours of runs. Sourced; every failure is one line and exit 2.
# Needs: DRIVER (the script's name for the messages).

refuse() {  # refuse MESSAGE...: one line on stderr, exit 2
  echo "$DRIVER: $*" >&2
  exit 2
}

check_words() {  # check_words NAME "VALUE" "VALID WORDS": every word of VALUE is a valid one
  local name=$1 value=$2 valid=$3 w seen=" "
  [ -n "${value//[[:space:]]/}" ] || refuse "$name is empty; one or more of: $valid"
  for w in $value; do
    case " $valid " in
      *" $w "*) ;;
      *) refuse "unknown entry '$w' in $name; use one or more of: $valid" ;;
    esac
    case $seen in *" $w "*) refuse "'$w' appears twice in $name" ;; esac
    seen+="$w "
  done
}

check_counts() {  # check_counts NAME "VALUE" MIN: VALUE is one or more whole numbers >= MIN
  local name=$1 value=$2 min=$3 w seen=" "
  [ -n "${value//[[:space:]]/}" ] || refuse "$name is empty; give whole numbers >= $min"
  for w in $value; do
    if ! [[ $w =~ ^[0-9]+$ ]] || [ "${#w}" -gt 9 ] || [ "$w" -lt "$min" ]; then
      refuse "$name must be whole numbers >= $min, got '$w'"
    fi
    case $seen in *" $((10#$w)) "*) refuse "$w appears twice in $name (the same runs twice)" ;; esac
    seen+="$((10#$w)) "
  done
}

check_fraction() {  # check_fraction NAME VALUE [open]: VALUE empty or a number in [0, 1] ((0, 1])
  local name=$1 value=$2 open=${3:-}
  [ -z "$value" ] && return 0
  if ! [[ $value =~ ^[0-9]*\.?[0-9]+$ ]] ||
    ! awk -v v="$value" -v o="$open" 'BEGIN { exit !((o == "open" ? v > 0 : v >= 0) && v <= 1) }'; then
    refuse "$name must be a number in $([ -n "$open" ] && echo '(0, 1]' || echo '[0, 1]'), got '$value'"
  fi
}

check_dry_run() {
  case $DRY_RUN in
    0 | 1) ;;
    *) refuse "DRY_RUN must be 0 or 1 (1 prints the commands only), got '$DRY_RUN'" ;;
  esac
}

# the --loss values train.py accepts: the keys of methods.STEPS, read from methods.py's source
# when STEPS is a literal dict (no torch import: a second), else by importing methods
METHODS_PY='import ast, re, sys
src = open(sys.argv[1] + "/methods.py").read()
changed = re.search(r"STEPS\s*\[.*\]\s*=|STEPS\s*[|+]=|STEPS\.(update|setdefault|pop)", src)
for node in ast.parse(src).body if not changed else []:
    if (isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["STEPS"]
            and isinstance(node.value, ast.Dict)
            and all(isinstance(k, ast.Constant) for k in node.value.keys)):
        print(*[k.value for k in node.value.keys])
        break
else:  # STEPS is built or changed by code: ask the module itself
    sys.path.insert(0, sys.argv[1])
    import methods
    print(*methods.STEPS)'

methods_list() {
  "$PYTHON" -c "$METHODS_PY" "$HERE" 2> /dev/null || refuse "$PYTHON cannot read the methods" \
    "of $HERE/methods.py (set PYTHON to the interpreter of the project's environment)"
}

check_own_flags() {  # check_own_flags VAR "FLAGS THE DRIVER SETS" ARGS...: none of ARGS sets them
  local var=$1 own=$2 a name f
  shift 2
  for a in "$@"; do
    [[ $a == --?* ]] || continue
    name=${a%%=*}
    for f in $own; do  # argparse also takes an unambiguous prefix (--labels for --labels-per-class)
      if [ "$name" = "$f" ] || { [ "${#name}" -ge 4 ] && [[ $f == "$name"* ]]; }; then
        refuse "$var must not set $f (given as $name): $DRIVER sets it itself; use its own" \
          "variable instead"
      fi
    done
  done
}
