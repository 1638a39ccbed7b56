#!/usr/bin/env bash
# Measure the speed gate's false-alarm and detection rates (docs/gate.md).
#
#   benchmarks/measure_gate.sh OUT_DIR [REPS] [CONDITION ...]   # REPS rounds (default 5) of the conditions
#
# Clones HEAD into OUT_DIR/snap, so edits made meanwhile do not change the code under test, and
# runs `scanbench continuous HEAD --quick` there: BASE is the commit, HEAD its clean working tree,
# the same code. Conditions (all by default, in this order, one round of each per rep):
#   quiet_unchanged, loaded_unchanged         unchanged code, alone and beside two busy processes
#   quiet_2x_parallel, loaded_2x_parallel     SCANBENCH_PLANT=parallel=2 (HEAD's side only)
#   quiet_2x_chunked, loaded_2x_chunked       SCANBENCH_PLANT=chunked=2
#   quiet_1.3x_parallel                       SCANBENCH_PLANT=parallel=1.3
# One line per run in OUT_DIR/summary.tsv: condition, rep, exit status, wall seconds, load average
# at the start, time, continuous's summary line and the points it flagged.
set -u
OUT=$(realpath -m "${1:?usage: benchmarks/measure_gate.sh OUT_DIR [REPS] [CONDITION ...]}")
REPS=${2:-5}
shift $(( $# >= 2 ? 2 : $# ))
CONDITIONS=${*:-quiet_unchanged loaded_unchanged quiet_2x_parallel loaded_2x_parallel quiet_2x_chunked loaded_2x_chunked quiet_1.3x_parallel}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
mkdir -p "$OUT"
[ -d "$OUT/snap" ] || git clone -q "$ROOT" "$OUT/snap"
cd "$OUT/snap"
SUM=$OUT/summary.tsv

run_one() {  # condition rep
  local cond=$1 rep=$2 plant="" loaded=0 pids="" log=$OUT/$1-$2.log
  case $cond in
    loaded_*) loaded=1 ;;
  esac
  case $cond in
    *_2x_parallel) plant=parallel=2 ;;
    *_2x_chunked) plant=chunked=2 ;;
    *_1.3x_parallel) plant=parallel=1.3 ;;
  esac
  if [ "$loaded" = 1 ]; then
    for _ in 1 2; do "$PY" -c "while True: pass" & pids="$pids $!"; done
  fi
  local t0 l0 rc
  t0=$(date +%s); l0=$(cut -d' ' -f1 /proc/loadavg)
  SCANBENCH_PLANT=$plant "$PY" -m reports.cli continuous HEAD --quick --out "$OUT/$1-$2.jsonl" > "$log" 2> "$log.err"
  rc=$?
  for p in $pids; do kill "$p"; done
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$cond" "$rep" "$rc" "$(($(date +%s) - t0))" "$l0" "$(date -u +%H:%M:%S)" \
    "$(grep '^speed:' "$log")" "$(grep '^REGRESSION:' "$log" | cut -d' ' -f2,5 | tr '\n' ' ')" >> "$SUM"
}

for rep in $(seq 1 "$REPS"); do
  for cond in $CONDITIONS; do
    run_one "$cond" "$rep"
  done
done
