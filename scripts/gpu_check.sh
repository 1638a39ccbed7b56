#!/usr/bin/env bash
# GPU check of the Triton kernels (Mamba-1, Mamba-2 SSD and Mamba-3 SISO): correctness natively
# (including past 2^31 elements) and timings against the other implementations. None of its phases
# has run on a GPU yet (no GPU has been lent). Details, phases and exit statuses: scripts/gpu_check.py.
#
#   scripts/gpu_check.sh OUTPUT_DIR            # needs a CUDA device; writes OUTPUT_DIR/gpu_check.json
#   scripts/gpu_check.sh --smoke OUTPUT_DIR    # tiny sizes on the CPU: tests this script
#
# Exit status: 0 passed, 1 a check failed, 2 usage error, 3 no CUDA device (nothing written).
# Python: $PYTHON if set, else the project's .venv if it has one, else python3 (a GPU machine's own).
set -euo pipefail
usage="usage: $0 [--smoke] [--budget SECONDS] OUTPUT_DIR"
if [ $# -lt 1 ]; then echo "$usage" >&2; exit 2; fi
case "${1:-}" in -h|--help) echo "$usage"; echo "  see scripts/gpu_check.py for what it runs"; exit 0;; esac
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi
# the output folder is relative to where the script was called from; options and --budget's value
# are passed as they are (gpu_check.py refuses what it does not know, exit 2)
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) args+=("$1"); [ $# -gt 1 ] && { args+=("$2"); shift; };;
    -*|/*) args+=("$1");;
    *) args+=("$OLDPWD/$1");;
  esac
  shift
done
exec "$py" scripts/gpu_check.py "${args[@]}"
