#!/usr/bin/env bash
# Measure the regression gate's false-alarm and detection rates (README, "The regression gate").
#
#   benchmarks/measure_gate.sh OUT_DIR [REPS]      # REPS rounds of five conditions (default 5)
#
# Runs a snapshot of HEAD (git archive into OUT_DIR/snap), so edits made meanwhile do not change
# the code under test. Makes a baseline from two quick sweeps, then, REPS times: unchanged code
# quiet and beside two busy processes, a planted 2x slowdown of parallel (SCANBENCH_PLANT) quiet and
# loaded, and a planted 1.3x quiet; each a quick sweep then `scanbench check`. One line per run in
# OUT_DIR/summary.tsv: condition, rep, exit status, sweep seconds, load average, time, check's line.
set -u
OUT=$(realpath -m "${1:?usage: benchmarks/measure_gate.sh OUT_DIR [REPS]}")
REPS=${2:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
SWEEPS="--sweep scan_grid --sweep time_per_token"   # the sweeps with gated ratios
mkdir -p "$OUT/snap"
git -C "$ROOT" archive HEAD | tar -x -C "$OUT/snap"
cd "$OUT/snap"
BASE=$OUT/baseline.json
SUM=$OUT/summary.tsv

run_one() {  # condition rep plant loaded
  local cond=$1 rep=$2 plant=$3 loaded=$4 out=$OUT/$1-$2.jsonl pids=""
  if [ "$loaded" = 1 ]; then
    for _ in 1 2; do "$PY" -c "while True: pass" & pids="$pids $!"; done
  fi
  local t0 l0
  t0=$(date +%s); l0=$(cut -d' ' -f1 /proc/loadavg)
  SCANBENCH_PLANT=$plant "$PY" -m reports.cli sweep --quick $SWEEPS --out "$out" > "$OUT/$1-$2.sweep.log" 2>&1
  local t1; t1=$(date +%s)
  "$PY" -m reports.cli check --baseline "$BASE" --results "$out" > "$OUT/$1-$2.check.log" 2>&1
  local rc=$?
  for p in $pids; do kill "$p"; done
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$cond" "$rep" "$rc" "$((t1 - t0))" "$l0" "$(date -u +%H:%M:%S)" \
    "$(grep '^speed:' "$OUT/$1-$2.check.log")" >> "$SUM"
}

if [ ! -f "$BASE" ]; then
  for i in 1 2; do "$PY" -m reports.cli sweep --quick $SWEEPS --out "$OUT/base-$i.jsonl" > "$OUT/base-$i.log" 2>&1; done
  "$PY" -m reports.cli check --baseline "$BASE" --update-baseline --results "$OUT/base-1.jsonl" "$OUT/base-2.jsonl"
fi
for rep in $(seq 1 "$REPS"); do
  run_one quiet_unchanged "$rep" "" 0
  run_one loaded_unchanged "$rep" "" 1
  run_one quiet_2x "$rep" "parallel=2" 0
  run_one loaded_2x "$rep" "parallel=2" 1
  run_one quiet_1.3x "$rep" "parallel=1.3" 0
done
