#!/usr/bin/env bash
# GPU latency of original vs compressed models (benchmarks/gpu.py): the one entry point for a borrowed GPU machine.
#   bash benchmarks/gpu.sh [--minutes 5] [--dry-run] [--cases DIR ...]
# Results and the log go to $OUT (default runs/gpu): gpu.md, gpu.json, log.txt. Compress output folders under
# gpu_inputs/ are measured beside a built-in case. The driver stops itself within --minutes; a hard timeout one
# minute later ends it in any case, and every row measured by then is already on disk.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/runs/gpu}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
minutes=5
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --minutes) minutes="${args[i + 1]:-5}" ;;
    --minutes=*) minutes="${args[i]#--minutes=}" ;;
  esac
done
limit=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 60 }' 2>/dev/null || echo 420)
cd "$ROOT" || exit 1
timeout -k 10 "$limit" "$PYTHON" benchmarks/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
